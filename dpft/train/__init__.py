"""Entry point of every run: `train_and_evaluate(config, workdir)`.

The config's sections pick the driver; each driver writes the same workdir contract
(config.json, metrics.jsonl, TensorBoard events, checkpoints, summary.json, plots):

* ``config.federated`` present: the federated driver (`dpft.federated.cli`), which wraps the
  same train step to simulate clients;
* ``config.linear`` present: a feature-based method on cached backbone features
  (`dpft.linear.cli`: single full-batch step, DP-GD, DP least squares, DP-Newton, DP-FC);
* otherwise the centralized DP trainer (`dpft.train.trainer`).
"""

from __future__ import annotations

import pathlib


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
    """Runs the experiment ``config`` in ``workdir`` (resuming if it holds one) -> summary."""
    if "federated" in config:
        from dpft.federated.cli import train_and_evaluate as run
    elif "linear" in config:
        from dpft.linear.cli import train_and_evaluate as run
    else:
        from dpft.train.trainer import train_and_evaluate as run
    return run(config, workdir)


__all__ = ["train_and_evaluate"]
