"""Full-batch releases of a linear head on features: row clipping, clipped sums, dense noise.

The feature methods (`dpft.linear`) release noisy full-batch sums over the rows of a feature
matrix X [N, d] (one row per example) with labels y [N] in [0, K). This module holds everything
their privacy depends on:

* **clipping** of rows (`row_norms`, `row_clip_factors`, `clip_rows`);
* **the clipped sums** whose sensitivities the methods account: the per-example clipped gradient
  sum of the softmax head (`clipped_head_grad_sum`, in closed form), the Gram matrix
  (`gram_sum`), the feature-target products (`xty_sum`) and the weighted Gram matrix of the
  Newton curvature (`curvature_sum`);
* **the noise** (`gaussian`, `symmetric_gaussian`) and the noisy sums (`noisy_*`).

Every contraction that forms a released sum runs at ``Precision.HIGHEST``: at the default
precision of TPUs (bf16 passes) a rounded per-example term can exceed its bound. The contractions
go through ``jnp.matmul`` (``lax.dot_general``).

Keys: the noise of one release comes from one key (the method derives it per release with
``keys.derive(key, "release", j)``); inside a release, chunk i of the flattened noise array is
drawn from ``keys.derive(release_key, "chunk", i)``, so no two chunks, and no two releases,
share a key.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dpft.privacy import keys

__all__ = [
    "HIGHEST",
    "NOISE_CHUNK",
    "augment",
    "clip_rows",
    "clipped_head_grad_sum",
    "curvature_sum",
    "gaussian",
    "gram_sum",
    "noisy_curvature_sum",
    "noisy_gram_sum",
    "noisy_head_grad_sum",
    "noisy_xty_sum",
    "row_clip_factors",
    "row_norms",
    "symmetric_gaussian",
    "xty_sum",
]

HIGHEST = jax.lax.Precision.HIGHEST


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full float32 precision (the contraction of a released sum)."""
    return jnp.matmul(a, b, precision=HIGHEST)


# ------------------------------------------------------------------------------------------------
# Clipping
# ------------------------------------------------------------------------------------------------


def row_norms(A: jax.Array) -> jax.Array:
    """L2 norms of the rows of A, computed without overflow for huge entries."""
    scale = jnp.max(jnp.abs(A), axis=-1)
    safe = jnp.where(scale > 0, scale, 1.0)
    return scale * jnp.linalg.norm(A / safe[..., None], axis=-1)


def row_clip_factors(norms: jax.Array, bound) -> jax.Array:
    """min(1, bound / norm), with 1 for a zero norm (and for bound = inf).

    Privacy:
        A row scaled by its factor has L2 norm <= ``bound`` (up to float32 rounding of the
        division, relative 1e-7); the factor of a row depends on that row alone, so clipping
        does not couple neighbouring (add/remove-one) datasets.
    """
    return jnp.where(norms > bound, bound / jnp.where(norms > 0, norms, 1.0), 1.0)


@jax.jit
def clip_rows(X: jax.Array, bound) -> jax.Array:
    """Each row rescaled to L2 norm at most ``bound`` (rows already inside are unchanged).

    Privacy:
        Every clipped row has L2 norm <= ``bound`` and depends on its own example only: a sum
        of a function f of clipped rows has add/remove-one sensitivity ``max ||f(x)||`` over
        ``||x|| <= bound``.
    """
    return X * row_clip_factors(row_norms(X), bound)[:, None]


@jax.jit
def augment(X: jax.Array) -> jax.Array:
    """[x, 1]: a constant feature, so that a bias is a row of the stacked parameters."""
    return jnp.concatenate([X, jnp.ones((X.shape[0], 1), X.dtype)], axis=1)


def _clipped_augmented(X: jax.Array, feature_clip, append_one: bool) -> jax.Array:
    Xc = clip_rows(X, feature_clip)
    return augment(Xc) if append_one else Xc


# ------------------------------------------------------------------------------------------------
# Clipped sums
# ------------------------------------------------------------------------------------------------


@jax.jit
def clipped_head_grad_sum(WB: jax.Array, Xa: jax.Array, y: jax.Array, clip_norm) -> jax.Array:
    """Sum over examples of the per-example softmax cross-entropy gradients w.r.t. ``[W; b]``
    [d + 1, K], each clipped to Frobenius norm ``clip_norm``. ``Xa`` is augmented ([x, 1]).

    For logits ``z = x~ @ [W; b]`` and probabilities p, one example's gradient is the outer
    product ``x~ (p - e_y)^T`` of norm ``||x~|| ||p - e_y||``, so the clipped sum is one matmul
    ``Xa^T (c * (P - Y))`` with per-example factors c: the [N, d + 1, K] per-example gradients
    are never formed. An example whose gradient is not finite (overflowing logits) contributes
    zero. The logits are formed at the default precision: the factors are computed from the very
    rows of ``P - Y`` that enter the sum, so the bound holds whatever their rounding.

    Privacy:
        Each example contributes one term of Frobenius norm <= ``clip_norm`` that depends on
        that example only, so under add/remove-one neighbouring the sum has L2 sensitivity
        ``clip_norm`` (for any ``WB`` and any ``Xa``).
    """
    P = jax.nn.softmax(Xa @ WB, axis=-1)
    G = P - jax.nn.one_hot(y, WB.shape[1], dtype=P.dtype)
    norms = row_norms(Xa) * row_norms(G)
    finite = jnp.isfinite(norms) & jnp.all(jnp.isfinite(G), axis=1)
    factors = jnp.where(finite, row_clip_factors(norms, clip_norm), 0.0)
    G = jnp.where(finite[:, None], G, 0.0)
    Xa = jnp.where(jnp.isfinite(Xa), Xa, 0.0)
    return _matmul(Xa.T, G * factors[:, None])


@functools.partial(jax.jit, static_argnames="append_one")
def gram_sum(X: jax.Array, feature_clip, append_one: bool = False) -> jax.Array:
    """sum_i x_i x_i^T over rows clipped to L2 norm ``feature_clip`` (then augmented to
    ``[x, 1]`` with ``append_one``).

    Privacy:
        One example changes the sum by ``x x^T`` with ``||x x^T||_F = ||x||^2``: the L2
        (Frobenius) sensitivity under add/remove-one is ``feature_clip^2``, or
        ``feature_clip^2 + 1`` with ``append_one`` (also for the upper triangle, which is what
        `noisy_gram_sum` releases).
    """
    Xc = _clipped_augmented(X, feature_clip, append_one)
    return _matmul(Xc.T, Xc)


@jax.jit
def xty_sum(X: jax.Array, Y: jax.Array, feature_clip) -> jax.Array:
    """sum_i x_i y_i^T over rows x_i clipped to L2 norm ``feature_clip``; Y [N, K] targets.

    With one-hot targets the columns are the per-class sums of the clipped features.

    Privacy:
        One example changes the sum by ``x y^T`` with Frobenius norm ``||x|| ||y||``, so the L2
        sensitivity under add/remove-one is ``feature_clip * max ||y_row||`` (1 for one-hot,
        sqrt(K) for +-1 targets).
    """
    return _matmul(clip_rows(X, feature_clip).T, Y)


@functools.partial(jax.jit, static_argnames="adaptive")
def curvature_sum(WB: jax.Array, X: jax.Array, feature_clip, adaptive: bool = True) -> jax.Array:
    """sum_i c_i x~_i x~_i^T over ``x~ = [clip(x), 1]`` with c_i = max_k 2 p_ik (1 - p_ik)
    (adaptive; p_i the softmax of ``x~_i @ WB``) or c_i = 1/2 (Boehning's bound).

    Privacy:
        One example changes the sum by ``c x~ x~^T`` with c in [0, 1/2] and ``||x~||^2 <=
        feature_clip^2 + 1``: L2 (Frobenius) sensitivity ``(feature_clip^2 + 1) / 2`` under
        add/remove-one (also for the upper triangle that `noisy_curvature_sum` releases).
    """
    Xa = _clipped_augmented(X, feature_clip, True)
    if adaptive:
        P = jax.nn.softmax(Xa @ WB, axis=-1)
        c = jnp.max(2 * P * (1 - P), axis=-1)
        c = jnp.clip(jnp.where(jnp.isfinite(c), c, 0.5), 0.0, 0.5)
    else:
        c = jnp.full(Xa.shape[:1], 0.5, Xa.dtype)
    return _matmul(Xa.T, c[:, None] * Xa)


# ------------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------------

# Noise is drawn in chunks of a fixed size, so that the random-number program is compiled once
# per process and not once per array shape (compiling threefry dominates small problems on CPU).
NOISE_CHUNK = 1 << 18


@jax.jit
def _normal_chunk(key: jax.Array, i) -> jax.Array:
    return jax.random.normal(keys.derive(key, "chunk", i), (NOISE_CHUNK,), jnp.float32)


@functools.partial(jax.jit, static_argnames="shape")
def _assemble(chunks: tuple, std, shape: tuple) -> jax.Array:
    flat = jnp.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    return std * flat[: math.prod(shape)].reshape(shape)


def gaussian(key: jax.Array, shape, std: float) -> jax.Array:
    """N(0, std^2) float32 noise of ``shape``, independent across every element.

    Chunk i of the flattened array comes from ``keys.derive(key, "chunk", i)``. ``std = 0``
    gives zeros without drawing.

    Privacy:
        Added to a sum of L2 sensitivity S under add/remove-one neighbouring, this is the
        Gaussian mechanism with noise multiplier ``std / S``: every element gets its own draw
        (distinct chunks have distinct keys, elements of a chunk are independent). ``key`` must
        be used for one release only.
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
        triangle of ``x x^T`` under add/remove-one is at most ``||x x^T||_F = ||x||^2``.
    """
    if std == 0:
        return jnp.zeros((dim, dim), jnp.float32)
    return _symmetrize(gaussian(key, (dim, dim), std))


# ------------------------------------------------------------------------------------------------
# Noisy sums: one Gaussian release each
# ------------------------------------------------------------------------------------------------


def noisy_head_grad_sum(WB, Xa, y, clip_norm: float, std: float, key: jax.Array) -> jax.Array:
    """``clipped_head_grad_sum(WB, Xa, y, clip_norm) + Z``, Z [d + 1, K] i.i.d. N(0, std^2).

    Privacy:
        A Gaussian mechanism with noise multiplier ``std / clip_norm`` under add/remove-one
        neighbouring (full batch: no amplification), independent noise for every element of
        W and b.
    """
    total = clipped_head_grad_sum(WB, Xa, y, clip_norm)
    return total + gaussian(key, total.shape, std)


def noisy_gram_sum(
    X, feature_clip: float, std: float, key: jax.Array, append_one: bool = False
) -> jax.Array:
    """``gram_sum(X, feature_clip, append_one) + E``, E symmetric with its upper triangle
    i.i.d. N(0, std^2).

    Privacy:
        A Gaussian mechanism with noise multiplier ``std / feature_clip^2`` (``std /
        (feature_clip^2 + 1)`` with ``append_one``) under add/remove-one neighbouring.
    """
    X = jnp.asarray(X, jnp.float32)
    G = gram_sum(X, feature_clip, append_one)
    return G + symmetric_gaussian(key, G.shape[0], std)


def noisy_xty_sum(X, Y, feature_clip: float, std: float, key: jax.Array) -> jax.Array:
    """``xty_sum(X, Y, feature_clip) + Z``, Z [d, K] i.i.d. N(0, std^2): independent in every
    element, in particular across the K class columns (one draw of the whole matrix, never one
    shared vector per class).

    Privacy:
        A Gaussian mechanism with noise multiplier ``std / (feature_clip * ||y_row||)`` under
        add/remove-one neighbouring.
    """
    X = jnp.asarray(X, jnp.float32)
    Y = jnp.asarray(Y, jnp.float32)
    return xty_sum(X, Y, feature_clip) + gaussian(key, (X.shape[1], Y.shape[1]), std)


def noisy_curvature_sum(
    WB, X, feature_clip: float, std: float, key: jax.Array, adaptive: bool = True
) -> jax.Array:
    """``curvature_sum(WB, X, feature_clip, adaptive) + E``, E symmetric Gaussian (upper
    triangle i.i.d. N(0, std^2)).

    Privacy:
        A Gaussian mechanism with noise multiplier ``std / ((feature_clip^2 + 1) / 2)`` under
        add/remove-one neighbouring.
    """
    H = curvature_sum(WB, X, feature_clip, adaptive)
    return H + symmetric_gaussian(key, H.shape[0], std)
