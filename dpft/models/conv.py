"""Convolution as patches + one matrix product (im2col), selectable per backend.

XLA:CPU lowers ``lax.conv_general_dilated`` to convolution kernels that are far from the matmul
roof of a small CPU, and the per-example kernel gradients that DP-SGD needs
(``jax.vmap(jax.grad(loss))``) become grouped convolutions that are slower still. Written as

    patches = stack of kh * kw strided slices of the padded input   [N * Ho * Wo, kh * kw * Cin]
    out     = patches @ kernel.reshape(kh * kw * Cin, Cout)          [N * Ho * Wo, Cout]

a convolution is slicing and one dot; its transpose (gradient wrt the input) is a dot and the
sum of kh * kw padded arrays (col2im), and its kernel gradient ``patches^T @ g`` is a dot that
`jax.vmap` turns into a batched matmul, one per example.

`im2col_conv_general_dilated` has the signature and semantics of ``lax.conv_general_dilated``
for ungrouped convolutions (any dimension numbers, strides, padding, input and kernel dilation);
`conv_impl` returns the callable a model should pass to ``flax.linen.Conv`` as
``conv_general_dilated``: ``'xla'`` (``lax.conv_general_dilated``), ``'im2col'`` or ``'auto'``
(on the CPU backend im2col for the layer shapes where it is faster, see `prefers_im2col`, and
`chunked_conv_general_dilated` for the others: XLA's convolution whose kernel gradient is
summed over cache-sized batch chunks; XLA's convolution on GPU/TPU).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
ConvFn = Callable[..., Array]

#: Names accepted by `conv_impl` (and by the models' ``conv`` attribute).
CONV_IMPLS: tuple[str, ...] = ("auto", "xla", "im2col")


class _Geometry(NamedTuple):
    """Shapes of a convolution in N, spatial..., C / spatial..., I, O terms."""

    dnums: lax.ConvDimensionNumbers
    ksize: tuple[int, ...]
    cin: int
    cout: int
    strides: tuple[int, ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    out_spatial: tuple[int, ...]


def _geometry(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
) -> _Geometry:
    lhs_shape, rhs_shape = tuple(lhs_shape), tuple(rhs_shape)
    dnums = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    lhs_spec, rhs_spec, _ = dnums
    nsp = len(lhs_shape) - 2
    strides = tuple(int(s) for s in window_strides)
    lhs_dil = tuple(int(d) for d in lhs_dilation) if lhs_dilation is not None else (1,) * nsp
    rhs_dil = tuple(int(d) for d in rhs_dilation) if rhs_dilation is not None else (1,) * nsp
    if not len(strides) == len(lhs_dil) == len(rhs_dil) == nsp:
        raise ValueError(
            f"window_strides {strides}, lhs_dilation {lhs_dil} and rhs_dilation {rhs_dil} "
            f"need one entry per spatial dimension ({nsp})"
        )
    in_spatial = tuple(lhs_shape[d] for d in lhs_spec[2:])
    ksize = tuple(rhs_shape[d] for d in rhs_spec[2:])
    cin, cout = lhs_shape[lhs_spec[1]], rhs_shape[rhs_spec[0]]
    if rhs_shape[rhs_spec[1]] != cin:
        raise ValueError(f"kernel has {rhs_shape[rhs_spec[1]]} input features, the input has {cin}")
    dilated = tuple((k - 1) * d + 1 for k, d in zip(ksize, rhs_dil, strict=True))
    if isinstance(padding, str):
        if any(d != 1 for d in lhs_dil):
            raise ValueError(
                "String padding is not implemented for transposed convolution: give the "
                "padding explicitly (as lax.conv_general_dilated requires)"
            )
        pads = tuple(
            (int(lo), int(hi))
            for lo, hi in lax.padtype_to_pads(in_spatial, dilated, strides, padding)
        )
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if len(pads) != nsp:
            raise ValueError(f"padding needs {nsp} (low, high) pairs, got {padding}")
    out_spatial = tuple(
        max(0, ((i - 1) * ld + 1 + lo + hi - k) // s + 1)
        for i, ld, (lo, hi), k, s in zip(in_spatial, lhs_dil, pads, dilated, strides, strict=True)
    )
    return _Geometry(dnums, ksize, cin, cout, strides, lhs_dil, rhs_dil, pads, out_spatial)


def im2col_conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """``lax.conv_general_dilated`` computed as strided slices (im2col) and one ``dot_general``.

    Same arguments and result as ``lax.conv_general_dilated`` (``dimension_numbers`` may be
    None, a tuple of layout strings such as ``('NHWC', 'HWIO', 'NHWC')`` or a
    ``lax.ConvDimensionNumbers``; padding 'SAME', 'SAME_LOWER', 'VALID' or explicit, possibly
    negative, (low, high) pairs) for any number of spatial dimensions. The patches are
    ``prod(kernel_size)`` strided slices of the padded (and, with ``lhs_dilation``,
    interior-padded) input concatenated along the feature axis; a 1x1 kernel is a single slice,
    i.e. a plain dot. Layout transposes are only emitted for layouts other than NHWC / HWIO /
    NHWC. Differentiated by JAX: the transpose of a strided slice is an (interior) pad, so the
    input gradient is a dot and the sum of ``prod(kernel_size)`` pads (col2im), the kernel
    gradient ``patches^T @ g`` a dot (a batched matmul under `jax.vmap`).

    Raises:
      NotImplementedError: ``feature_group_count`` or ``batch_group_count`` other than 1
        (grouped / depthwise convolutions; use ``lax.conv_general_dilated``).
    """
    if feature_group_count != 1 or batch_group_count != 1:
        raise NotImplementedError(
            "im2col_conv_general_dilated supports only ungrouped convolutions, got "
            f"feature_group_count={feature_group_count}, batch_group_count={batch_group_count}; "
            "use lax.conv_general_dilated (conv='xla') for grouped or depthwise convolutions"
        )
    geo = _geometry(
        lhs.shape,
        rhs.shape,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
    )
    lhs_spec, rhs_spec, out_spec = geo.dnums
    # To N, spatial..., C and spatial..., I, O (no-ops for NHWC / HWIO).
    x = _transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    w = _transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    n, cin, cout, out_spatial = x.shape[0], geo.cin, geo.cout, geo.out_spatial
    out_perm = _inverse_out_perm(out_spec)

    if 0 in out_spatial:  # the (dilated) kernel is larger than the padded input
        dtype = preferred_element_type or jnp.result_type(x, w)
        return _transpose(jnp.zeros((n, *out_spatial, cout), dtype), out_perm)

    config = [(lo, hi, d - 1) for (lo, hi), d in zip(geo.pads, geo.lhs_dilation, strict=True)]
    if any(c != (0, 0, 0) for c in config):
        x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *config, (0, 0, 0)])

    # One strided slice of the padded input per kernel offset: [N, *out_spatial, C] each.
    slices = []
    for offset in itertools.product(*(range(k) for k in geo.ksize)):
        start = [o * d for o, d in zip(offset, geo.rhs_dilation, strict=True)]
        limit = [
            st + (o - 1) * s + 1 for st, o, s in zip(start, out_spatial, geo.strides, strict=True)
        ]
        slices.append(lax.slice(x, [0, *start, 0], [n, *limit, cin], (1, *geo.strides, 1)))
    patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
    rows = n * math.prod(out_spatial)
    k = math.prod(geo.ksize) * cin
    y = lax.dot_general(
        patches.reshape(rows, k),
        w.reshape(k, cout),
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return _transpose(y.reshape(n, *out_spatial, cout), out_perm)


def _inverse_out_perm(out_spec: Sequence[int]) -> tuple[int, ...]:
    # Axis j of the N, spatial..., C result is output dimension src[j].
    src = (out_spec[0], *out_spec[2:], out_spec[1])
    return tuple(int(i) for i in np.argsort(src))


def _transpose(x: Array, perm: Sequence[int]) -> Array:
    perm = tuple(int(p) for p in perm)
    return x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)


#: Per-chunk input bytes of `chunked_conv_general_dilated`'s kernel gradient (a batch chunk of
#: this size keeps XLA:CPU's kernel-gradient convolution in cache).
KERNEL_GRAD_CHUNK_BYTES = 256 << 10
#: About the most chunks per convolution: each is traced and compiled as its own convolution,
#: so many small chunks cost compile time and run no faster than a few dozen larger ones
#: (docs/benchmarks.md).
MAX_KERNEL_GRAD_CHUNKS = 64


def _chunk_size(n: int, per_example_bytes: int, target: int) -> int:
    """Largest divisor of ``n`` with at most ``target`` bytes (more when that would need over
    `MAX_KERNEL_GRAD_CHUNKS` chunks), if at least half of that; else ``n`` (no chunks)."""
    want = max(1, target // max(1, per_example_bytes), -(-n // MAX_KERNEL_GRAD_CHUNKS))
    if want >= n:
        return n
    best = max(d for d in range(1, want + 1) if n % d == 0)
    return best if 2 * best >= want else n


def chunked_conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    chunk_bytes: int | None = None,
) -> Array:
    """``lax.conv_general_dilated`` whose kernel gradient is summed over batch chunks.

    The forward pass and the input gradient are XLA's; the kernel gradient is the sum of the
    kernel gradients of batch chunks of about ``chunk_bytes`` (default
    `KERNEL_GRAD_CHUNK_BYTES`) of input each. Same result as the whole-batch kernel gradient up
    to float summation order. XLA:CPU's kernel-gradient convolution is memory-bound at CIFAR
    sizes, so chunks that stay in cache run faster than the whole batch in one piece, for one
    layer and for ResNet-20's whole non-private gradient (figures: docs/benchmarks.md).
    Defined with `jax.custom_vjp`, so forward-mode differentiation (``jax.jvp``) of a model
    using it raises; use ``conv='xla'`` for that. A batch that cannot be split into chunks of
    at least half the target size (or ``batch_group_count != 1``) gets the plain convolution.
    """
    kw = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )

    def conv(a, b):
        return lax.conv_general_dilated(a, b, window_strides, padding, **kw)

    dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    bdim, odim = dnums.lhs_spec[0], dnums.out_spec[0]
    n = lhs.shape[bdim]
    per_example = lhs.dtype.itemsize * math.prod(lhs.shape) // max(1, n)
    target = KERNEL_GRAD_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    size = _chunk_size(n, per_example, target)
    if size == n or batch_group_count != 1:
        return conv(lhs, rhs)

    @jax.custom_vjp
    def chunked(a, b):
        return conv(a, b)

    def fwd(a, b):
        return conv(a, b), (a, b)

    def bwd(res, gy):
        a, b = res
        da = jax.vjp(lambda a_: conv(a_, b), a)[1](gy)[0]
        db = None
        for start in range(0, n, size):
            a_k = lax.slice_in_dim(a, start, start + size, axis=bdim)
            g_k = lax.slice_in_dim(gy, start, start + size, axis=odim)
            d = jax.vjp(functools.partial(conv, a_k), b)[1](g_k)[0].astype(jnp.float32)
            db = d if db is None else db + d  # float32 sum of the chunks, then b's dtype
        return da, db.astype(b.dtype)

    chunked.defvjp(fwd, bwd)
    return chunked(lhs, rhs)


def prefers_im2col(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
) -> bool:
    """Whether 'auto' computes this (ungrouped) convolution with im2col on CPU.

    True for a 1x1 kernel (the patch matrix is the input itself: no duplication, a plain dot)
    and for a single input channel, where XLA:CPU's convolution has no channel axis to
    vectorize over while im2col's patch matrix has ``prod(kernel_size)`` columns (the first
    layer of a grayscale CNN). Everywhere else XLA's convolution is kept: in whole models the
    im2col patch matrices (``prod(kernel_size)`` copies of the input, concatenated on the
    channel axis) cost more than XLA's slower arithmetic. In whole steps (non-private, ghost DP
    and vmap DP) `SampleConvNet` is fastest with im2col for its first layer only, slower all
    XLA and slowest all im2col; ResNet-20 is faster all XLA than with im2col for its 3-channel
    stem. (Timed one layer at a time, im2col wins for most ResNet-20 layers, above all for
    per-example kernel gradients; inside the model it does not.) The best choice also depends
    on the norm strategy: ghost norms build their own patches for the kernel gradients, and in
    ``make bench`` the MNIST CNN's ghost DP step is faster all-XLA than with 'auto', while
    with per-example-gradient norms all-im2col beats all-XLA on ResNet-20; pick ``conv`` per
    run for those (figures: docs/benchmarks.md). It
    depends only on per-example shapes, so the choice is the same for a batch and under
    `jax.vmap`.
    """
    geo = _geometry(
        lhs_shape,
        rhs_shape,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
    )
    return math.prod(geo.ksize) == 1 or geo.cin == 1


def auto_conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """On the CPU backend `im2col_conv_general_dilated` where `prefers_im2col` and
    `chunked_conv_general_dilated` elsewhere; ``lax.conv_general_dilated`` on GPU/TPU."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    use_im2col = (
        jax.default_backend() == "cpu"
        and feature_group_count == 1
        and batch_group_count == 1
        and prefers_im2col(lhs.shape, rhs.shape, *args[2:])
    )
    if use_im2col:
        conv = im2col_conv_general_dilated
    elif jax.default_backend() == "cpu":
        conv = chunked_conv_general_dilated
    else:
        conv = lax.conv_general_dilated
    return conv(
        *args,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def conv_impl(kind: str) -> ConvFn:
    """The convolution callable for ``kind`` (a drop-in for ``lax.conv_general_dilated``).

    - ``'xla'``: ``lax.conv_general_dilated``.
    - ``'im2col'``: `im2col_conv_general_dilated` for every convolution (grouped ones raise).
    - ``'auto'``: `auto_conv_general_dilated`: on the CPU backend im2col for the layer shapes
      where it is faster (`prefers_im2col`) and XLA's convolution with a batch-chunked kernel
      gradient (`chunked_conv_general_dilated`) for the others; ``lax.conv_general_dilated`` on
      GPU/TPU (decided when traced, from ``jax.default_backend()``).

    Pass the result as ``flax.linen.Conv(..., conv_general_dilated=conv_impl(kind))``.
    """
    if kind == "xla":
        return lax.conv_general_dilated
    if kind == "im2col":
        return im2col_conv_general_dilated
    if kind == "auto":
        return auto_conv_general_dilated
    raise ValueError(f"conv must be one of {list(CONV_IMPLS)}, got {kind!r}")


def torch_padded_conv(
    features: int,
    kernel: int,
    stride: int,
    dtype: Any,
    conv: str,
    name: str,
    groups: int = 1,
):
    """A bias-free square ``flax.linen.Conv`` padded ``kernel // 2`` on every side (torch style).

    torchvision's convolutions pad symmetrically; 'SAME' would shift the sampling grid of the
    stride-2 ones. Grouped convolutions (``groups > 1``), which im2col does not support, use
    XLA's convolution when ``conv='im2col'``.
    """
    import flax.linen as nn

    pad = kernel // 2
    impl = "xla" if groups > 1 and conv == "im2col" else conv
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        name=name,
        conv_general_dilated=conv_impl(impl),
    )


__all__ = [
    "CONV_IMPLS",
    "auto_conv_general_dilated",
    "chunked_conv_general_dilated",
    "conv_impl",
    "im2col_conv_general_dilated",
    "prefers_im2col",
    "torch_padded_conv",
]
