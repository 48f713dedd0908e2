"""Max pooling as a maximum of strided slices.

``flax.linen.max_pool`` lowers to ``lax.reduce_window``, whose gradient is XLA's
``select_and_scatter``. On XLA:CPU that scatter is the slowest op of a small CNN's step, and
under ``jax.vmap(jax.grad(...))`` (per-example gradients) slower still: for the Opacus MNIST
network's first pool (256 x 14 x 14 x 16, window 2, stride 1) it is more than an order of
magnitude slower (figures: docs/benchmarks.md) than the same pool written as

    out = max over the kh * kw window offsets (o_h, o_w) of x[:, o_h::s_h, o_w::s_w, :]

whose forward is elementwise maxima of slices and whose gradient is elementwise selects and
pads, which XLA fuses on every backend.

The forward value equals ``flax.linen.max_pool`` exactly. The gradient is the same wherever the
maximum of a window is unique; on a tie, ``jnp.maximum`` splits the gradient between the tied
inputs (each gets a share, the shares sum to the window's gradient) where ``select_and_scatter``
gives all of it to the first. Both are valid subgradients; after a ReLU, ties at zero carry no
gradient through the ReLU either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["max_pool"]


def max_pool(
    x: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """``flax.linen.max_pool(x, window_shape, strides, padding)`` as a maximum of slices.

    Args:
      x: ``[..., *spatial, features]``: any leading batch axes (or none), then one spatial axis
        per window dimension, then the feature axis.
      window_shape: the window size per spatial axis.
      strides: per spatial axis (default 1).
      padding: ``'VALID'``, ``'SAME'`` or one ``(low, high)`` pair per spatial axis; padded
        positions never win the maximum (they hold ``-inf``).

    Returns:
      The pooled array, ``[..., *out_spatial, features]``.
    """
    window = tuple(int(k) for k in window_shape)
    nd = len(window)
    strides = tuple(int(s) for s in strides) if strides is not None else (1,) * nd
    if len(strides) != nd:
        raise ValueError(f"max_pool: strides {strides} do not match window {window}")
    if x.ndim < nd + 1:
        raise ValueError(f"max_pool: input of shape {x.shape} has no feature axis")
    lead = x.ndim - nd - 1
    spatial = x.shape[lead : lead + nd]
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(spatial, window, strides, padding)
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if len(pads) != nd:
            raise ValueError(f"max_pool: padding {padding} does not match window {window}")
    if any(lo or hi for lo, hi in pads):
        fill = jnp.array(-jnp.inf, x.dtype)
        x = lax.pad(x, fill, [(0, 0, 0)] * lead + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
    padded = x.shape[lead : lead + nd]
    out_sizes = tuple((n - k) // s + 1 for n, k, s in zip(padded, window, strides, strict=True))
    out = None
    for offsets in itertools.product(*(range(k) for k in window)):
        start = (0,) * lead + offsets + (0,)
        ends = zip(offsets, out_sizes, strides, strict=True)
        limit = x.shape[:lead] + tuple(o + (m - 1) * s + 1 for o, m, s in ends) + x.shape[-1:]
        piece = lax.slice(x, start, limit, (1,) * lead + strides + (1,))
        out = piece if out is None else jnp.maximum(out, piece)
    return out
