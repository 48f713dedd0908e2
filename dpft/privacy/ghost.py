"""Ghost norms: per-example gradient norms without per-example gradients of Dense/Conv kernels.

`GhostNorms` is a `dpft.privacy.clipping.NormStrategy`. For a layer ``y = a W + b`` applied to
the rows ``a_i`` ``[T, d_in]`` of example ``i`` with output gradient ``g_i`` ``[T, d_out]``,
example ``i``'s kernel gradient is ``a_i^T g_i``, and its squared norm is either

* "ghost": ``<a_i a_i^T, g_i g_i^T>`` (cost ``T^2 (d_in + d_out)``; ``||a_i||^2 ||g_i||^2`` for
  ``T = 1``), Li et al. 2022, "Large language models can be strong differentially private
  learners"; or
* "direct": ``||a_i^T g_i||^2`` (cost ``T d_in d_out``),

whichever is cheaper for the layer. A convolution is the same computation on unfolded patches
(``T = H_out W_out``, ``d_in = k_h k_w C_in``; a grouped convolution group by group): the
per-layer choice is the "mixed ghost clipping" of Bu et al. 2022, "Scalable and efficient
training of large convolutional neural networks with differential privacy". The bias gradient
is ``sum_t g_i[t]``. The unfolding and the direct per-example kernel gradients of convolutions
are in `dpft.privacy.unfold` (built a cache-sized chunk of examples at a time).

The inputs ``a_i`` and the output gradients ``g_i`` are captured with
``flax.linen.intercept_methods``: every ``nn.Dense`` / ``nn.Conv`` call (subclasses included)
records its input and adds a zero "probe" to its output; the gradient w.r.t. example ``i``'s
probe is ``g_i``. Calls of other Dense/Conv modules made inside a layer's call (e.g. the LoRA
adapters of `dpft.models.lora`, added to the layer's output) are intercepted as calls of their
own; only a module re-entering its own ``__call__`` (a subclass calling ``super().__call__``)
is counted once. One vmapped backward pass w.r.t. the probes yields every ``g_i`` without any
kernel gradient.

The clipped SUM is then formed from the same captured tensors, ``sum_i f_i a_i^T g_i`` (one
matmul per layer, the cost of an ordinary weight-gradient backward), instead of a second
forward/backward of the reweighted loss ``sum_i f_i loss_i``. The two are equal; this
"book-keeping" form (Bu et al. 2023, "Differentially private optimization on large model at
small cost") saves a forward and a backward pass, gives each parameter group its own factor
(so `PerLayerClip` needs no special case) and lets a dropped example be zeroed exactly (a
NaN input cannot reach the sum through ``0 * NaN``).

Parameters not owned by an intercepted layer (GroupNorm / BatchNorm / LayerNorm scales and
biases, custom layers, and Dense/Conv layers whose configuration is not supported: masked
kernels, input-dilated convolutions) get exact per-example gradients in the SAME
backward pass: they are broadcast to a leading example axis before the vmap, so only those
leaves are materialised per example (``O(microbatch x leaf size)``). With
``allow_fallback=False`` such parameters raise an error naming them instead.

Requirements on ``loss_fn``: it applies a flax linen model to the trainable leaves of its
``params`` argument unchanged (a leaf is matched to a layer by identity, so a cast or a copy
of a kernel just makes it a fallback leaf); a Dense/Conv kernel or bias is used only by the
module that owns it (no weight tying through another op); the sequence of module calls does
not depend on traced values; no flax lifted transforms (``nn.scan``, ``nn.remat``, ...) around
intercepted layers; a ``nn.Conv`` with a custom ``conv_general_dilated`` / a ``nn.Dense`` with a
custom ``dot_general`` must compute the standard convolution / contraction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from dpft.privacy.clipping import (
    HIGHEST,
    MicrobatchResult,
    PerLayerClip,
    clip_factors,
    leaf_paths,
    vmap_per_example,
)
from dpft.privacy.unfold import conv_kernel_grads, patches

__all__ = ["GhostNorms"]


@dataclasses.dataclass(frozen=True)
class _Call:
    """Static description of one intercepted Dense/Conv call (from the shape-only pass)."""

    index: int  # position among all Dense/Conv calls of one loss evaluation
    path: str  # module path, for messages
    kind: str  # 'dense' or 'conv'
    kernel: int | None  # index of the trainable kernel leaf in tree_leaves(params)
    bias: int | None  # index of the trainable bias leaf
    in_shape: tuple[int, ...]  # per-example input shape
    out_shape: tuple[int, ...]  # per-example output shape
    out_dtype: Any
    # conv only
    kernel_size: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    pads: tuple[tuple[int, int], ...] = ()
    pad_mode: str = "constant"
    groups: int = 1  # feature_group_count


def _as_tuple(x, n: int) -> tuple[int, ...]:
    if x is None:
        return (1,) * n
    if isinstance(x, int):
        return (x,) * n
    return tuple(int(v) for v in x)


def _conv_config(mod: nn.Conv, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    """(kernel_size, strides, dilation, pads, pad_mode) or a reason string if unsupported."""
    k = mod.kernel_size
    ks = (int(k),) if isinstance(k, int) else tuple(int(v) for v in k)
    n = len(ks)
    if mod.mask is not None:
        return "masked kernel"
    if any(d != 1 for d in _as_tuple(mod.input_dilation, n)):
        return "input_dilation != 1"
    strides = _as_tuple(mod.strides, n)
    dil = _as_tuple(mod.kernel_dilation, n)
    spatial = tuple(in_shape[-n - 1 : -1])
    dilated = tuple((k - 1) * d + 1 for k, d in zip(ks, dil, strict=True))
    pad = canonicalize_padding(mod.padding, n)
    mode = "constant"
    if pad in ("CIRCULAR", "REFLECT"):
        pads = tuple(((k - 1) // 2, k // 2) for k in dilated)
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad]
    elif pad == "CAUSAL":
        if n != 1:
            return "CAUSAL padding with more than one spatial dim"
        pads = ((dilated[0] - 1, 0),)
    elif isinstance(pad, str):
        pads = tuple(jax.lax.padtype_to_pads(spatial, dilated, strides, pad))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in pad)
    out_sp = tuple(
        (s + lo + hi - k) // st + 1
        for s, (lo, hi), k, st in zip(spatial, pads, dilated, strides, strict=True)
    )
    if out_sp != tuple(out_shape[-n - 1 : -1]):
        return f"output shape {out_shape} does not match a convolution with {out_sp}"
    return ks, strides, dil, tuple(tuple(p) for p in pads), mode, int(mod.feature_group_count)


class _Interceptor:
    """Counts Dense/Conv calls; in 'discover' mode describes them, in 'capture' mode records
    inputs of the planned calls and adds their probes to the outputs."""

    def __init__(self, leaf_ids: dict[int, int], plan=None, probes=None):
        self.leaf_ids = leaf_ids
        self.plan = None if plan is None else {c.index: j for j, c in enumerate(plan)}
        self.probes = probes
        self.count = 0
        self.active: set[int] = set()  # ids of the modules whose intercepted call is running
        self.calls: list[_Call] = []
        self.unsupported: list[tuple[str, str, list[int]]] = []
        self.inputs: list[jax.Array] = []

    def _leaf(self, mod, name):
        if not mod.has_variable("params", name):
            return None
        return self.leaf_ids.get(id(mod.get_variable("params", name)))

    def __call__(self, next_fun, args, kwargs, context):
        mod = context.module
        if (
            context.method_name != "__call__"
            or id(mod) in self.active  # a subclass re-entering its own __call__
            or not isinstance(mod, (nn.Dense, nn.Conv))
        ):
            return next_fun(*args, **kwargs)
        index = self.count
        self.count += 1
        x = args[0] if args else kwargs["inputs"]
        if self.plan is None:
            kernel, bias = self._leaf(mod, "kernel"), self._leaf(mod, "bias")
        self.active.add(id(mod))
        try:
            out = next_fun(*args, **kwargs)
        finally:
            self.active.discard(id(mod))
        if self.plan is None:
            if kernel is not None or bias is not None:
                self._describe(mod, index, kernel, bias, x, out)
            return out
        if index not in self.plan:
            return out
        j = self.plan[index]
        self.inputs.append(x)
        return out + self.probes[j].astype(out.dtype)

    def _describe(self, mod, index, kernel, bias, x, out):
        path = "/".join(str(p) for p in mod.scope.path) if mod.scope else type(mod).__name__
        base = dict(
            index=index,
            path=path,
            kernel=kernel,
            bias=bias,
            in_shape=tuple(x.shape),
            out_shape=tuple(out.shape),
            out_dtype=out.dtype,
        )
        leaves = [i for i in (kernel, bias) if i is not None]
        if isinstance(mod, nn.Dense):
            if x.ndim < 1 or out.shape[:-1] != x.shape[:-1]:
                self.unsupported.append((path, "unexpected Dense shapes", leaves))
                return
            self.calls.append(_Call(kind="dense", **base))
            return
        cfg = _conv_config(mod, tuple(x.shape), tuple(out.shape))
        if isinstance(cfg, str):
            self.unsupported.append((path, cfg, leaves))
            return
        ks, strides, dil, pads, mode, groups = cfg
        self.calls.append(
            _Call(
                kind="conv",
                kernel_size=ks,
                strides=strides,
                dilation=dil,
                pads=pads,
                pad_mode=mode,
                groups=groups,
                **base,
            )
        )


def _rows(call: _Call, x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(A [m, groups, d_in, rows], G [m, rows, groups, d_out]) in float32 for one call."""
    m = g.shape[0]
    x = x.astype(call.out_dtype).astype(jnp.float32)  # the layer's computation dtype
    g = g.astype(jnp.float32).reshape(m, -1, call.groups, g.shape[-1] // call.groups)
    if call.kind == "dense":
        return jnp.swapaxes(x.reshape(m, -1, x.shape[-1]), 1, 2)[:, None], g
    return patches(x, call), g


def _kernel_grad(w: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[groups, d_in, d_out] (d_in = (*kernel_size, C_in/groups)) -> the kernel's layout."""
    ng, din, dout = w.shape
    w = w.reshape(ng, din // shape[-2], shape[-2], dout)  # [g, K, C_in/g, d_out]
    return w.transpose(1, 2, 0, 3).reshape(shape)


@dataclasses.dataclass(frozen=True)
class GhostNorms:
    """Per-example norms by ghost / mixed ghost clipping, clipped sum by book-keeping.

    A `dpft.privacy.clipping.NormStrategy`: pass ``norm_strategy=GhostNorms()`` to
    `dpft.privacy.clipping.clipped_grad`. Kernels and biases of ``nn.Dense`` and ``nn.Conv``
    layers never get per-example gradients of their own (unless the direct norm is cheaper
    for that layer, e.g. convolutions on large feature maps with few channels); every other
    trainable leaf gets exact per-example gradients in the same single backward pass. See the
    module docstring for what ``loss_fn`` must satisfy.

    Attributes:
      allow_fallback: if False, raise ``ValueError`` naming every trainable leaf that is not a
        kernel/bias of a supported Dense/Conv call, instead of materialising its per-example
        gradients.
      precision: matmul precision of the norm computations (default HIGHEST, so that the norms
        that set the clipping factors are not computed in reduced precision on accelerators).
      conv_chunk_bytes: convolutions whose per-example kernel gradients are formed directly
        build their unfolded inputs this many bytes' worth of examples at a time, when all of
        them together would exceed `dpft.privacy.unfold.CHUNK_ABOVE_BYTES` (a cache-sized
        block is several times faster on CPU; see `dpft.privacy.unfold`).

    Privacy:
        Same contract as `dpft.privacy.clipping.VmapNorms`: the factors come from
        `dpft.privacy.clipping.clip_factors`, so every real example with a finite norm is scaled
        to the clipper's bound and every padding row or example with a non-finite norm
        contributes exactly zero (its captured inputs, output gradients and per-example
        gradients are zeroed with ``jnp.where`` before the weighted sum). The norms are those
        of the full per-example gradient of all trainable leaves, so the SUM returned has the
        clipper's L2 sensitivity ``clipper.sensitivity(params)`` under add/remove-one
        neighbouring (twice that under replace-one), up to float rounding as for VmapNorms.
    """

    allow_fallback: bool = True
    precision: Any = jax.lax.Precision.HIGHEST
    conv_chunk_bytes: int = 8 << 20

    def _direct(self, call: _Call, x: jax.Array, g: jax.Array) -> jax.Array:
        """Per-example kernel gradients [m, groups, d_in, d_out] of one call (float32)."""
        if call.kind == "conv":
            return conv_kernel_grads(call, x, g, self.precision, self.conv_chunk_bytes)
        a, gr = _rows(call, x, g)
        return jnp.einsum("igkp,ipgo->igko", a, gr, precision=self.precision)

    def _plan(self, loss_fn, params, examples, keys):
        ex0 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), examples)
        key0 = jax.ShapeDtypeStruct(keys.shape[1:], keys.dtype)
        spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        found = {}

        def trace(p, e, k):
            leaves = jax.tree_util.tree_leaves(p)
            icpt = _Interceptor({id(x): i for i, x in enumerate(leaves)})
            with nn.intercept_methods(icpt):
                out = loss_fn(p, e, k)
            found["calls"], found["unsupported"] = icpt.calls, icpt.unsupported
            found["count"] = icpt.count
            return out

        jax.eval_shape(trace, spec, ex0, key0)
        return found["calls"], found["unsupported"], found["count"]

    def __call__(self, loss_fn, clipper, params, examples, mask, keys):
        """Clipped sum over one microbatch (see `dpft.privacy.clipping.NormStrategy`).

        One piece because it is the mechanism an audit reads: the fallback decision, the one
        backward pass for the output gradients, the per-example squared norms leaf by leaf,
        the clip factors and the clipped sums, in that order and over the same leaf indices.

        Privacy:
            Enforces the clipper's per-example bound through `clip_factors` (see the class
            docstring); padding rows and non-finite examples contribute exactly zero.
        """
        if isinstance(clipper, PerLayerClip):
            clipper = clipper.bind(params)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        paths = leaf_paths(params)
        m = mask.shape[0]
        calls, unsupported, count = self._plan(loss_fn, params, examples, keys)

        covered = {i for c in calls for i in (c.kernel, c.bias) if i is not None}
        # A leaf used by both a supported and an unsupported call cannot be split: fall back.
        bad = {i for _, _, ls in unsupported for i in ls}
        if covered & bad:
            calls = [c for c in calls if not ({c.kernel, c.bias} & bad)]
            covered = {i for c in calls for i in (c.kernel, c.bias) if i is not None}
        fallback = [i for i in range(len(leaves)) if i not in covered]
        if fallback and not self.allow_fallback:
            why = {p: r for p, r, _ in unsupported}
            detail = "; ".join(f"{path}: {why[path]}" for path in why)
            raise ValueError(
                "GhostNorms(allow_fallback=False): these trainable parameters are not the "
                f"kernel/bias of a supported nn.Dense/nn.Conv call: {[paths[i] for i in fallback]}"
                + (f" (unsupported layers: {detail})" if detail else "")
            )

        probes = [jnp.zeros((m, *c.out_shape), c.out_dtype) for c in calls]
        per_ex = [jnp.broadcast_to(leaves[i], (m, *leaves[i].shape)) for i in fallback]

        def one(bleaves, probe, example, key):
            full = list(leaves)
            for i, x in zip(fallback, bleaves, strict=True):
                full[i] = x
            p = jax.tree_util.tree_unflatten(treedef, full)
            icpt = _Interceptor({}, calls, probe)
            with nn.intercept_methods(icpt):
                loss, aux = loss_fn(p, example, key)
            if icpt.count != count or len(icpt.inputs) != len(calls):
                raise RuntimeError(
                    "GhostNorms: the model's Dense/Conv calls differ between the shape pass "
                    f"({count}) and the gradient pass ({icpt.count})"
                )
            return loss, (loss, aux, icpt.inputs)

        grad_fn = jax.grad(one, argnums=(0, 1), has_aux=True)
        (g_fallback, g_out), (loss, aux, inputs) = vmap_per_example(
            lambda x: grad_fn(*x), (per_ex, probes, examples, keys), mask
        )

        groups = clipper.leaf_groups(params)
        group_sq = jnp.zeros((m, clipper.num_groups(params)), jnp.float32)
        hi = self.precision

        # Per-example squared norms, leaf by leaf.
        parts: dict[int, list[tuple[_Call, jax.Array, jax.Array]]] = {}
        bias_g: dict[int, jax.Array] = {}
        for c, x, g in zip(calls, inputs, g_out, strict=True):
            if c.kernel is not None:
                parts.setdefault(c.kernel, []).append((c, x, g))
            if c.bias is not None:
                gb = jnp.sum(g.astype(jnp.float32).reshape(m, -1, g.shape[-1]), axis=1)
                bias_g[c.bias] = bias_g[c.bias] + gb if c.bias in bias_g else gb
        kernel_terms = {}
        for i, calls_i in parts.items():
            c0 = calls_i[0][0]
            t = sum(math.prod(c.out_shape[:-1]) for c, _, _ in calls_i)
            dout = c0.out_shape[-1] // c0.groups
            din = math.prod(leaves[i].shape[:-1])  # (*kernel_size, C_in / groups) or C_in
            if t * t * (din + dout) < t * din * dout:  # ghost
                rows_i = [_rows(c, x, g) for c, x, g in calls_i]
                a = jnp.concatenate([r[0] for r in rows_i], axis=3)
                g = jnp.concatenate([r[1] for r in rows_i], axis=1)
                ga = jnp.einsum("igkp,igkq->igpq", a, a, precision=hi)
                gg = jnp.einsum("ipgk,iqgk->igpq", g, g, precision=hi)
                sq = jnp.sum(ga * gg, axis=(1, 2, 3))
                kernel_terms[i] = ("ghost", a, g)
            else:  # direct
                w = sum(self._direct(c, x, g) for c, x, g in calls_i)
                sq = jnp.sum(jnp.square(w), axis=(1, 2, 3))
                kernel_terms[i] = ("direct", w)
            group_sq = group_sq.at[:, groups[i]].add(sq)
        for i, gb in bias_g.items():
            group_sq = group_sq.at[:, groups[i]].add(jnp.sum(jnp.square(gb), axis=1))
        per_example = dict(bias_g)
        for i, gl in zip(fallback, g_fallback, strict=True):
            gl = gl.reshape(m, -1).astype(jnp.float32)
            per_example[i] = gl
            group_sq = group_sq.at[:, groups[i]].add(jnp.sum(jnp.square(gl), axis=1))

        f, keep, norms, nonfinite, clipped = clip_factors(clipper, group_sq, mask)

        def zero_dropped(x):
            return jnp.where(keep.reshape((m,) + (1,) * (x.ndim - 1)), x, 0)

        out = [None] * len(leaves)
        for i, term in kernel_terms.items():
            fi = f[:, groups[i]]
            if term[0] == "ghost":
                a, g = zero_dropped(term[1]), zero_dropped(term[2]) * fi[:, None, None, None]
                s = jnp.swapaxes(jnp.einsum("ipgo,igkp->gok", g, a, precision=HIGHEST), 1, 2)
            else:
                s = jnp.tensordot(fi, zero_dropped(term[1]), axes=1, precision=HIGHEST)
            out[i] = _kernel_grad(s, leaves[i].shape)
        for i, gl in per_example.items():
            out[i] = jnp.tensordot(f[:, groups[i]], zero_dropped(gl), axes=1, precision=HIGHEST)
            out[i] = out[i].reshape(leaves[i].shape)
        grad_sum = jax.tree_util.tree_unflatten(treedef, [o.astype(jnp.float32) for o in out])
        return MicrobatchResult(grad_sum, norms, loss, aux, nonfinite, clipped)
