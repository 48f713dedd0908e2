"""dpft: differentially private training and fine-tuning in JAX."""

__version__ = "0.1.0"
