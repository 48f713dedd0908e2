"""Shared pieces of the linear-head methods: parameters, input checks, PSD solves, metrics.

Shapes: features X [N, d] float32, labels y [N] int in [0, K), weights [d, K], bias [K]. Methods
with a bias work on augmented features ``[x, 1]`` and stacked parameters ``[W; b]`` [d + 1, K].
Everything that touches the private data before the noise (clipping, the clipped sums, the
noise) is in the DP core, `dpft.privacy.rows`; what is here is post-processing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpft.privacy import accounting

__all__ = [
    "LinearParams",
    "accuracy",
    "check_data",
    "check_delta",
    "eig_solve",
    "logits",
    "predict",
    "psd_eig",
]


class LinearParams(NamedTuple):
    """A linear softmax head: ``logits = X @ weights + bias``."""

    weights: jax.Array  # [d, K]
    bias: jax.Array  # [K]

    @classmethod
    def from_stacked(cls, wb: jax.Array) -> LinearParams:
        """From stacked [W; b] [d + 1, K]."""
        return cls(*_unstack(wb))


@jax.jit
def _unstack(wb: jax.Array) -> tuple[jax.Array, jax.Array]:
    return wb[:-1], wb[-1]


def check_data(X, y, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Validates and converts (X [N, d] float32, y [N] int32 in [0, num_classes))."""
    X = jnp.asarray(X, jnp.float32)
    y_np = np.asarray(y)
    if X.ndim != 2 or y_np.shape != (X.shape[0],):
        raise ValueError(f"need X [N, d] and y [N], got {X.shape} and {y_np.shape}")
    if not (isinstance(num_classes, int | np.integer) and num_classes >= 2):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not np.issubdtype(y_np.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y_np.dtype}")
    if not bool(_all_finite(X)):
        raise ValueError("features must be finite")
    if y_np.size and (y_np.min() < 0 or y_np.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return X, jnp.asarray(y_np.astype(np.int32))


@jax.jit
def _all_finite(X: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(X))


def check_delta(delta: float, X) -> float:
    """``delta`` if it lies in (0, 1/N) for the N = len(X) examples (or N = X for an int), else a
    one-line ValueError."""
    n = int(X) if isinstance(X, int | np.integer) else int(X.shape[0])
    return accounting.check_delta(delta, n, name="delta")


def check_bound(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (inf allowed only with epsilon=inf), got {value!r}")
    return float(value)


@jax.jit
def psd_eig(M: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposition of the symmetric part of M with eigenvalues clipped at 0.

    Returns (clipped eigenvalues [d], eigenvectors [d, d]): the projection of M onto the PSD cone
    in Frobenius norm is ``V diag(lam) V^T``.
    """
    lam, V = jnp.linalg.eigh(0.5 * (M + M.T))
    return jnp.maximum(lam, 0.0), V


@jax.jit
def eig_solve(lam: jax.Array, V: jax.Array, reg: float, B: jax.Array) -> jax.Array:
    """(V diag(lam) V^T + reg I)^{-1} B."""
    return V @ ((V.T @ B) / (lam + reg)[:, None])


def logits(params: LinearParams, X) -> jax.Array:
    """X @ weights + bias."""
    return jnp.asarray(X, jnp.float32) @ params.weights + params.bias


def predict(params: LinearParams, X) -> jax.Array:
    """Predicted class per row: argmax of the logits."""
    return jnp.argmax(logits(params, X), axis=-1)


def accuracy(params: LinearParams, X, y) -> float:
    """Fraction of rows whose predicted class equals y."""
    return float(jnp.mean(predict(params, X) == jnp.asarray(y)))


def check_key(key) -> jax.Array:
    if isinstance(key, int):
        raise TypeError("pass a jax PRNG key (e.g. jax.random.key(seed)), not an int")
    return key
