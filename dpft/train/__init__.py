"""The centralized DP trainer."""

from dpft.train.trainer import train_and_evaluate

__all__ = ["train_and_evaluate"]
