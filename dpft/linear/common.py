"""Shared pieces of the linear-head methods: parameters, clipping, noise, PSD solves, metrics.

Shapes: features X [N, d] float32, labels y [N] int in [0, K), weights [d, K], bias [K]. Methods
with a bias work on augmented features ``[x, 1]`` and stacked parameters ``[W; b]`` [d + 1, K].
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LinearParams",
    "accuracy",
    "augment",
    "clip_rows",
    "gaussian",
    "logits",
    "predict",
    "psd_eig",
    "release_key",
    "row_norms",
    "symmetric_gaussian",
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


def check_bound(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (inf allowed only with epsilon=inf), got {value!r}")
    return float(value)


def row_norms(A: jax.Array) -> jax.Array:
    """L2 norms of the rows of A, computed without overflow for huge entries."""
    scale = jnp.max(jnp.abs(A), axis=-1)
    safe = jnp.where(scale > 0, scale, 1.0)
    return scale * jnp.linalg.norm(A / safe[..., None], axis=-1)


def clip_factors(norms: jax.Array, bound: float) -> jax.Array:
    """min(1, bound / norm), with 1 for a zero norm (and for bound = inf)."""
    return jnp.where(norms > bound, bound / jnp.where(norms > 0, norms, 1.0), 1.0)


@jax.jit
def clip_rows(X: jax.Array, bound: float) -> jax.Array:
    """Each row rescaled to L2 norm at most ``bound`` (rows already inside are unchanged)."""
    return X * clip_factors(row_norms(X), bound)[:, None]


@jax.jit
def augment(X: jax.Array) -> jax.Array:
    """[x, 1]: a constant feature, so that a bias is a row of the stacked parameters."""
    return jnp.concatenate([X, jnp.ones((X.shape[0], 1), X.dtype)], axis=1)


# Noise is drawn in chunks of a fixed size, so that the random-number program is compiled once
# per process and not once per array shape (compiling threefry dominates small problems on CPU).
NOISE_CHUNK = 1 << 18


@jax.jit
def _normal_chunk(key: jax.Array, i) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(key, i), (NOISE_CHUNK,), jnp.float32)


@functools.partial(jax.jit, static_argnames="shape")
def _assemble(chunks: tuple, std, shape: tuple) -> jax.Array:
    flat = jnp.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    return std * flat[: math.prod(shape)].reshape(shape)


def gaussian(key: jax.Array, shape, std: float) -> jax.Array:
    """N(0, std^2) float32 noise of ``shape``, independent across every element.

    Chunk i of the flattened array comes from ``fold_in(key, i)``: distinct chunks use
    independent streams, and so do distinct keys. ``std = 0`` gives zeros without drawing.
    """
    shape = tuple(int(s) for s in shape)
    if std == 0:
        return jnp.zeros(shape, jnp.float32)
    n = max(1, -(-math.prod(shape) // NOISE_CHUNK))
    return _assemble(tuple(_normal_chunk(key, i) for i in range(n)), std, shape)


@jax.jit
def _symmetrize(Z: jax.Array) -> jax.Array:
    return jnp.triu(Z) + jnp.triu(Z, 1).T


def symmetric_gaussian(key: jax.Array, dim: int, std: float) -> jax.Array:
    """Symmetric [dim, dim] noise: the upper triangle (with the diagonal) i.i.d. N(0, std^2),
    mirrored to the lower triangle.

    Privacy:
        Adding it to a symmetric matrix releases the dim (dim + 1) / 2 upper-triangle entries with
        independent Gaussian noise; mirroring is post-processing. The L2 sensitivity of the upper
        triangle of ``x x^T`` is at most ``||x x^T||_F = ||x||^2``.
    """
    if std == 0:
        return jnp.zeros((dim, dim), jnp.float32)
    return _symmetrize(gaussian(key, (dim, dim), std))


def release_key(key: jax.Array, *path: int) -> jax.Array:
    """The key of one release: ``key`` folded with each integer of ``path`` in turn."""
    for i in path:
        key = jax.random.fold_in(key, i)
    return key


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


def softmax_ce_grad(WB: jax.Array, Xa: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax probabilities P [N, K] and output gradients P - onehot(y) of the linear head."""
    P = jax.nn.softmax(Xa @ WB, axis=-1)
    return P, P - jax.nn.one_hot(y, WB.shape[1], dtype=P.dtype)


def check_key(key) -> jax.Array:
    if isinstance(key, int):
        raise TypeError("pass a jax PRNG key (e.g. jax.random.key(seed)), not an int")
    return key
