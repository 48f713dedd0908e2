"""The full-batch releases of `dpft.privacy.rows`, accumulated block by block (out of core).

When the features X [N, d] do not fit in memory they are read a block (a shard) at a time. Each
function here takes ``blocks``, an iterable of ``(X_block, y_block)`` pairs that together hold
every row of the dataset exactly once, computes the clipped sum of each block with the very
function of `dpft.privacy.rows` that the in-memory path applies to the whole X (clipping per row,
contraction at ``Precision.HIGHEST``), adds the block sums in float32, sums the result over the
processes of a multi-process run (`process_sum`; the identity with one process) and adds the
noise ONCE to the total, drawn exactly as the in-memory release draws it (`rows.gaussian` /
`rows.symmetric_gaussian` from the same key): with the same key a streamed release differs from
the in-memory one only by the float32 rounding of the summation order.

Every row enters exactly one block, and every clipped term depends on its own row only, so a
streamed sum has the same add/remove-one sensitivity as the in-memory sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dpft.privacy import rows

__all__ = [
    "noisy_streamed_curvature_sum",
    "noisy_streamed_gram_sum",
    "noisy_streamed_head_grad_sum",
    "noisy_streamed_xty_sum",
    "process_sum",
    "streamed_curvature_sum",
    "streamed_gram_sum",
    "streamed_head_grad_sum",
    "streamed_xty_sum",
]

Blocks = Iterable[tuple]


@jax.jit
def _add(a: jax.Array, b: jax.Array) -> jax.Array:
    return a + b


def process_sum(x: jax.Array) -> jax.Array:
    """``x`` summed over the processes of a multi-process run (each passes its own partial sum).

    With one process this is ``x``. With several, every process must call it with an array of
    the same shape (a process without rows passes zeros); the partial sums are gathered with
    `jax.experimental.multihost_utils.process_allgather` and added in float32.

    Privacy:
        The processes hold disjoint rows, so the total of their clipped partial sums is the
        clipped sum over all rows, with that sum's add/remove-one sensitivity. The partial sums
        are exchanged before any noise: they must stay inside the run (never logged).
    """
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(jnp.asarray(x, jnp.float32))
    return jnp.sum(jnp.asarray(gathered), axis=0)


def _accumulate(part: Callable, blocks: Blocks, shape: tuple) -> jax.Array:
    """sum over blocks of ``part(X_block, y_block)`` (zeros [shape] without blocks), then over
    processes."""
    total = jnp.zeros(shape, jnp.float32)
    for xb, yb in blocks:
        if np.shape(xb)[0] == 0:
            continue
        total = _add(total, part(jnp.asarray(xb, jnp.float32), yb))
    return process_sum(total)


def _augmented(X: jax.Array, feature_clip) -> jax.Array:
    return rows.augment(X if feature_clip is None else rows.clip_rows(X, feature_clip))


def streamed_head_grad_sum(WB, blocks: Blocks, clip_norm, feature_clip=None) -> jax.Array:
    """sum over all rows of the clipped softmax head gradients w.r.t. ``[W; b]`` [d + 1, K]:
    `rows.clipped_head_grad_sum` of each block's augmented rows ``[x, 1]`` (``x`` first clipped to
    L2 norm ``feature_clip`` unless it is None), summed over blocks and processes.

    Privacy:
        Each example contributes one term of Frobenius norm <= ``clip_norm`` depending on that
        example only, and each example is in exactly one block: under add/remove-one
        neighbouring the streamed sum has L2 sensitivity ``clip_norm``, as the in-memory sum.
    """
    WB = jnp.asarray(WB, jnp.float32)

    def part(X, y):
        return rows.clipped_head_grad_sum(
            WB, _augmented(X, feature_clip), jnp.asarray(y), clip_norm
        )

    return _accumulate(part, blocks, WB.shape)


def streamed_gram_sum(blocks: Blocks, dim: int, feature_clip, append_one: bool = False):
    """sum_i x_i x_i^T over all rows clipped to ``feature_clip`` (augmented with ``append_one``):
    `rows.gram_sum` per block, summed over blocks and processes. ``dim`` is d (features); the
    labels of the blocks are ignored.

    Privacy:
        Under add/remove-one one example changes the sum by ``x x^T`` (it is in exactly one
        block): L2 (Frobenius) sensitivity ``feature_clip^2``, or ``feature_clip^2 + 1`` with
        ``append_one``, as `rows.gram_sum`.
    """
    n = dim + int(append_one)
    return _accumulate(lambda X, _: rows.gram_sum(X, feature_clip, append_one), blocks, (n, n))


def streamed_xty_sum(blocks: Blocks, dim: int, num_targets: int, feature_clip) -> jax.Array:
    """sum_i x_i y_i^T [dim, num_targets] over all rows x_i clipped to ``feature_clip``; the
    blocks hold ``(X_block, Y_block)`` with target rows Y [rows, num_targets] (`rows.xty_sum`
    per block).

    Privacy:
        One example changes the sum by ``x y^T`` (it is in exactly one block): L2 sensitivity
        ``feature_clip * max ||y_row||`` under add/remove-one, as `rows.xty_sum`.
    """

    def part(X, Y):
        return rows.xty_sum(X, jnp.asarray(Y, jnp.float32), feature_clip)

    return _accumulate(part, blocks, (dim, num_targets))


def streamed_curvature_sum(WB, blocks: Blocks, feature_clip, adaptive: bool = True) -> jax.Array:
    """sum_i c_i x~_i x~_i^T over all rows (`rows.curvature_sum` per block, which clips each row
    to ``feature_clip`` and appends 1), summed over blocks and processes.

    Privacy:
        One example changes the sum by ``c x~ x~^T`` with c in [0, 1/2] (it is in exactly one
        block): L2 sensitivity ``(feature_clip^2 + 1) / 2`` under add/remove-one, as
        `rows.curvature_sum`.
    """
    WB = jnp.asarray(WB, jnp.float32)

    def part(X, _):
        return rows.curvature_sum(WB, X, feature_clip, adaptive)

    return _accumulate(part, blocks, (WB.shape[0], WB.shape[0]))


def noisy_streamed_head_grad_sum(
    WB, blocks: Blocks, clip_norm: float, std: float, key: jax.Array, feature_clip=None
) -> jax.Array:
    """``streamed_head_grad_sum(...) + Z``, Z [d + 1, K] i.i.d. N(0, std^2) drawn once, as
    `rows.noisy_head_grad_sum` draws it from ``key``.

    Privacy:
        A Gaussian mechanism with noise multiplier ``std / clip_norm`` under add/remove-one
        neighbouring (full batch), noise added once to the total over blocks and processes.
    """
    total = streamed_head_grad_sum(WB, blocks, clip_norm, feature_clip)
    return total + rows.gaussian(key, total.shape, std)


def noisy_streamed_gram_sum(
    blocks: Blocks, dim: int, feature_clip: float, std: float, key, append_one: bool = False
) -> jax.Array:
    """``streamed_gram_sum(...) + E``, E symmetric with its upper triangle i.i.d. N(0, std^2)
    (`rows.symmetric_gaussian` of ``key``), added once.

    Privacy:
        A Gaussian mechanism with noise multiplier ``std / feature_clip^2`` (``std /
        (feature_clip^2 + 1)`` with ``append_one``) under add/remove-one neighbouring.
    """
    G = streamed_gram_sum(blocks, dim, feature_clip, append_one)
    return G + rows.symmetric_gaussian(key, G.shape[0], std)


def noisy_streamed_xty_sum(
    blocks: Blocks, dim: int, num_targets: int, feature_clip: float, std: float, key: jax.Array
) -> jax.Array:
    """``streamed_xty_sum(...) + Z``, Z [d, K] i.i.d. N(0, std^2) in every element, added once.

    Privacy:
        A Gaussian mechanism with noise multiplier ``std / (feature_clip * ||y_row||)`` under
        add/remove-one neighbouring.
    """
    B = streamed_xty_sum(blocks, dim, num_targets, feature_clip)
    return B + rows.gaussian(key, B.shape, std)


def noisy_streamed_curvature_sum(
    WB, blocks: Blocks, feature_clip: float, std: float, key: jax.Array, adaptive: bool = True
) -> jax.Array:
    """``streamed_curvature_sum(...) + E``, E symmetric Gaussian (upper triangle i.i.d.
    N(0, std^2)), added once.

    Privacy:
        A Gaussian mechanism with noise multiplier ``std / ((feature_clip^2 + 1) / 2)`` under
        add/remove-one neighbouring.
    """
    H = streamed_curvature_sum(WB, blocks, feature_clip, adaptive)
    return H + rows.symmetric_gaussian(key, H.shape[0], std)
