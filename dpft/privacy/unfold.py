"""Unfolded convolution inputs and per-example kernel gradients, for `dpft.privacy.ghost`.

A convolution is a matmul of its unfolded input (one row per output pixel, ``prod(kernel_size)
* C_in`` columns) with the flattened kernel, so example ``i``'s kernel gradient is
``a_i^T g_i`` with ``a_i`` its unfolded input ``[d_in, rows]`` and ``g_i`` its output gradient
``[rows, d_out]``. `conv_kernel_grads` returns those per-example gradients; `patches` returns
``a`` itself (the ghost norm needs it).

Two ways of unfolding, both exact:

* `patches`: ``prod(kernel_size)`` strided slices of the padded input, one per kernel offset.
  Any strides.
* `_wide_patches` (stride 1 only): the padded input is flattened over its spatial axes, so the
  slice for a kernel offset is ONE contiguous range of that flat array, starting at the
  offset's flat position. Its rows run over the output positions embedded in the padded grid
  (``H_out x W_padded`` in 2-d): the ``W_padded - W_out`` extra rows per image line read
  neighbouring pixels, and the output gradient is padded with zeros there, so they add
  nothing to ``a_i^T g_i``.

On a CPU the matmul is cheap and building the unfolded matrix (``prod(kernel_size)`` copies of
the input) is what costs: `conv_kernel_grads` builds it for a chunk of examples at a time
(`lax.map`), so that the chunk's matrix stays in cache instead of being written to and read back
from memory. Measured on a 2-core Xeon (AVX-512), batch 64, 3x3 kernels (ms; all examples at
once / chunks): 32x32x16 -> 16: 33 / 7.5; 16x16x32 -> 32: 7.1 / 6.0; 8x8x64 -> 64: 5.1 (not
chunked: under the threshold).

This module is part of the DP core: it imports nothing else from dpft.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp

#: Unfolded matrices above this many bytes are built a chunk of examples at a time.
CHUNK_ABOVE_BYTES = 16 << 20


def _pad(x: jax.Array, pads, mode: str, lead: int) -> jax.Array:
    """Pads the trailing ``len(pads)`` axes of ``x`` (the first ``lead`` axes untouched)."""
    if mode == "constant":
        cfg = [(0, 0, 0)] * lead + [(lo, hi, 0) for lo, hi in pads]
        return jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
    return jnp.pad(x, [(0, 0)] * lead + list(pads), mode=mode)


def _group_rows(p: jax.Array, groups: int) -> jax.Array:
    """[m, b, K, C, pixels] -> [m, groups, K * C / groups, b * pixels]."""
    m, b, k, c = p.shape[:4]
    p = p.reshape(m, b, k, groups, c // groups, -1)
    p = p.transpose(0, 3, 2, 4, 1, 5)  # [m, groups, K, C / groups, b, pixels]
    return p.reshape(m, groups, k * (c // groups), -1)


def patches(x: jax.Array, call: Any) -> jax.Array:
    """Unfolded patches ``[m, groups, prod(kernel_size) * C_in / groups, rows]`` of ``x``.

    ``x`` is ``[m, ..., C_in]`` (``m`` examples, each ``call.in_shape``); ``call`` describes the
    convolution (``kernel_size``, ``strides``, ``dilation``, ``pads``, ``pad_mode``, ``groups``,
    ``out_shape``). For group ``j`` the columns match the flax kernel slice ``[*kernel_size,
    C_in / groups, j-th block of C_out]`` flattened over its first axes; rows run over the
    per-example batch and the output pixels. The channels are moved in front of the spatial
    axes first, so that each of the ``prod(kernel_size)`` strided slices is a contiguous block of
    the result (a concatenation along a major axis, not an interleave along the minor one), and
    the result is already in the ``[d_in, rows]`` layout of the per-example matmuls.
    """
    n = len(call.kernel_size)
    m = x.shape[0]
    x = x.reshape((m, -1) + x.shape[x.ndim - n - 1 :])
    x = _pad(jnp.moveaxis(x, -1, 2), call.pads, call.pad_mode, 3)  # [m, b, C, *padded]
    out_sp = call.out_shape[len(call.out_shape) - n - 1 : -1]
    slices = []
    for offs in itertools.product(*(range(k) for k in call.kernel_size)):
        start = [0, 0, 0] + [o * d for o, d in zip(offs, call.dilation, strict=True)]
        ends = zip(start[3:], out_sp, call.strides, strict=True)
        limit = list(x.shape[:3]) + [s + (o - 1) * st + 1 for s, o, st in ends]
        slices.append(jax.lax.slice(x, start, limit, (1, 1, 1, *call.strides)))
    p = jnp.stack(slices, axis=2)  # [m, b, K, C, *out_sp]
    return _group_rows(p.reshape(*p.shape[:4], -1), call.groups)


def _wide_geometry(call: Any, in_spatial: tuple[int, ...]):
    """(padded spatial shape, flat offsets of the kernel taps, wide row count per image)."""
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(in_spatial, call.pads, strict=True))
    flat_strides = [math.prod(padded[d + 1 :]) for d in range(len(padded))]
    offsets = [
        sum(o * dil * st for o, dil, st in zip(offs, call.dilation, flat_strides, strict=True))
        for offs in itertools.product(*(range(k) for k in call.kernel_size))
    ]
    n = len(call.kernel_size)
    out_sp = call.out_shape[len(call.out_shape) - n - 1 : -1]
    rows = out_sp[0] * math.prod(padded[1:])
    return padded, offsets, rows


def _wide_patches(x: jax.Array, call: Any) -> jax.Array:
    """Stride-1 unfolding ``[m, groups, d_in, b * wide_rows]`` from contiguous flat slices."""
    n = len(call.kernel_size)
    m = x.shape[0]
    x = x.reshape((m, -1) + x.shape[x.ndim - n - 1 :])
    padded, offsets, rows = _wide_geometry(call, x.shape[2:-1])
    x = _pad(jnp.moveaxis(x, -1, 2), call.pads, call.pad_mode, 3)  # [m, b, C, *padded]
    flat = x.reshape(*x.shape[:3], -1)
    short = max(offsets) + rows - flat.shape[-1]
    if short > 0:  # the last taps' ranges run past the end: their extra rows get zero gradient
        flat = jax.lax.pad(flat, jnp.zeros((), flat.dtype), [(0, 0, 0)] * 3 + [(0, short, 0)])
    p = jnp.stack([jax.lax.slice_in_dim(flat, o, o + rows, axis=3) for o in offsets], axis=2)
    return _group_rows(p, call.groups)  # [m, b, K, C, rows] -> grouped


def _wide_grads(g: jax.Array, call: Any) -> jax.Array:
    """Output gradients ``[m, b * wide_rows, groups, d_out]``, zero on the extra rows."""
    n = len(call.kernel_size)
    m, cout = g.shape[0], g.shape[-1]
    g = g.reshape((m, -1) + g.shape[g.ndim - n - 1 :])  # [m, b, *out_sp, C_out]
    in_sp = call.in_shape[len(call.in_shape) - n - 1 : -1]
    padded, _, _ = _wide_geometry(call, tuple(in_sp))
    cfg = [(0, 0, 0)] * 3 + [(0, p - o, 0) for p, o in zip(padded[1:], g.shape[3:-1], strict=True)]
    g = jax.lax.pad(g, jnp.zeros((), g.dtype), cfg + [(0, 0, 0)])
    return g.reshape(m, -1, call.groups, cout // call.groups)


def _unfolded_bytes(call: Any, m: int, wide: bool) -> int:
    n = len(call.kernel_size)
    cin = call.in_shape[-1]
    b = math.prod(call.in_shape[: len(call.in_shape) - n - 1])
    if wide:
        rows = _wide_geometry(call, call.in_shape[len(call.in_shape) - n - 1 : -1])[2]
    else:
        rows = math.prod(call.out_shape[len(call.out_shape) - n - 1 : -1])
    return 4 * m * b * rows * math.prod(call.kernel_size) * cin


def conv_kernel_grads(
    call: Any,
    x: jax.Array,
    g: jax.Array,
    precision: Any = None,
    chunk_bytes: int = 8 << 20,
) -> jax.Array:
    """Per-example kernel gradients ``[m, groups, d_in, d_out]`` (float32) of a convolution.

    ``x`` ``[m, *call.in_shape]`` are the examples' inputs (rounded to the layer's computation
    dtype ``call.out_dtype``, then computed in float32), ``g`` ``[m, *call.out_shape]`` the
    gradients w.r.t. its outputs; ``d_in`` runs over (kernel offset, input channel of the
    group) like `patches`. Stride-1 convolutions unfold
    with `_wide_patches`, others with `patches`. When the unfolded matrix of all ``m`` examples
    exceeds `CHUNK_ABOVE_BYTES`, it is built and multiplied about ``chunk_bytes`` at a time: in
    chunks of a divisor of ``m`` between half the target and the target, else in balanced
    chunks, padded with zero inputs and gradients up to a whole number (then dropped).
    """
    wide = all(s == 1 for s in call.strides)
    x = x.astype(call.out_dtype).astype(jnp.float32)
    g = g.astype(jnp.float32)

    def grads(xc, gc):
        if wide:
            a, gr = _wide_patches(xc, call), _wide_grads(gc, call)
        else:
            a = patches(xc, call)
            gr = gc.reshape(gc.shape[0], -1, call.groups, gc.shape[-1] // call.groups)
        return jnp.einsum("igkp,ipgo->igko", a, gr, precision=precision)

    m = x.shape[0]
    total = _unfolded_bytes(call, m, wide)
    if total <= CHUNK_ABOVE_BYTES or m == 1:
        return grads(x, g)
    want = max(1, min(m, chunk_bytes * m // total))
    per = max(d for d in range(1, want + 1) if m % d == 0)
    if 2 * per < want:  # no divisor of m near the target: balanced chunks, the last one padded
        chunks = -(-m // want)
        per = -(-m // chunks)
    chunks = -(-m // per)
    extra = chunks * per - m
    if extra:
        x = jnp.concatenate([x, jnp.zeros((extra, *x.shape[1:]), x.dtype)])
        g = jnp.concatenate([g, jnp.zeros((extra, *g.shape[1:]), g.dtype)])
    xs = x.reshape(chunks, per, *x.shape[1:])
    gs = g.reshape(chunks, per, *g.shape[1:])
    w = jax.lax.map(lambda xg: grads(*xg), (xs, gs))
    return w.reshape(chunks * per, *w.shape[2:])[:m]
