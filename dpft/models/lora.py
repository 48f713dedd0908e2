"""LoRA adapters for any flax model built from ``nn.Dense`` / ``nn.Conv`` layers.

`LoRAModel` wraps a model so that every targeted layer computes

    y = base(x) + (alpha / r) * B(A(x))

with ``A`` a layer of the base layer's kind from its inputs to ``r`` features (a Dense, or a
convolution of the base kernel size, strides, padding and dilation) initialised at random, and
``B`` a Dense / 1x1 convolution from ``r`` features to the layer's outputs initialised to ZERO,
so the adapted model computes exactly the base model's function until ``B`` is trained. For a
Dense kernel ``W`` ``[d_in, d_out]`` the effective kernel is ``W + (alpha / r) A B`` with ``A``
``[d_in, r]`` and ``B`` ``[r, d_out]``; for a convolution kernel ``[*k, C_in, C_out]`` it is
``W + (alpha / r) A (x) B``: ``A`` ``[*k, C_in, r]`` contracted with ``B`` ``[r, C_out]`` on
``r`` (Hu et al. 2022, "LoRA: Low-rank adaptation of large language models"; the convolution
form is the one PEFT uses for ``Conv2d``). `merge` folds the adapters into the base kernels.

Targets: ``targets`` are regular expressions over module paths (``'layer3_0/conv1'``,
``'fc1'``). Empty (the default) targets every ``nn.Dense`` and every 1x1 ``nn.Conv`` except
the head ``linear``; explicit patterns may also name k x k convolutions. Grouped and masked
convolutions are never adapted.

Design. The adapters are added by a flax method interceptor (``nn.intercept_methods``) that
`LoRAModel` installs around its base model: after a targeted layer's own call it calls two
REAL ``nn.Dense`` / ``nn.Conv`` submodules of that layer, ``lora_a`` and ``lora_b``, so

* the model is not rewritten: any flax model using ``nn.Dense`` / ``nn.Conv`` (defined in
  ``setup`` or inline in ``@nn.compact``, shared layers included) is adapted, and its
  variable paths stay those of the base model (``nn.share_scope``; pretrained weights load
  unchanged);
* the adapter parameters live in the ``'params'`` collection as ``<layer>/lora_a/kernel`` and
  ``<layer>/lora_b/kernel`` (`ADAPTERS` selects them in ``config.finetune.trainable``), so the
  train state, optimizer and checkpoints treat them as ordinary parameters;
* `dpft.privacy.ghost.GhostNorms` intercepts the adapter calls like any other Dense/Conv call
  (they run inside the base layer's call, as calls of other modules), so their per-example
  norms are ghost / direct norms: no per-example gradient is materialised for them. The frozen
  base kernels are closed over and never differentiated; `dpft.privacy.clipping.VmapNorms`
  needs nothing special either;
* ``model.features`` goes through the same interceptor, so the feature cache of a head phase
  reads the adapted backbone (with zero ``B``: exactly the base features).

``LoRAModel(base, rank, alpha, targets)``: ``alpha = 0`` means ``alpha = rank`` (scale 1).
`attach` adds freshly initialised adapters to existing (e.g. pretrained) variables.
"""

from __future__ import annotations

import dataclasses
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ADAPTERS", "LoRAModel", "LoRASpec", "attach", "from_config", "merge"]

#: ``config.finetune.trainable`` patterns of every adapter parameter.
ADAPTERS: tuple[str, ...] = (r".*/lora_[ab]/kernel",)
HEAD = "linear"
# PyTorch's nn.Linear default (kaiming_uniform with a = sqrt(5)), as PEFT initialises A.
A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Rank, scale numerator and target patterns of a LoRA run (see the module docstring)."""

    rank: int
    alpha: float = 0.0  # 0: alpha = rank
    targets: tuple[str, ...] = ()  # () = every Dense and 1x1 Conv except the head

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


def from_config(ft) -> LoRASpec | None:
    """``config.finetune.lora_rank`` / ``lora_alpha`` / ``lora_targets`` checked; None if off."""
    rank = ft.get("lora_rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(
            f"config.finetune.lora_rank must be an integer >= 0 (0 = off), got {rank!r}"
        )
    if rank == 0:
        return None
    alpha = ft.get("lora_alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(
            f"config.finetune.lora_alpha must be a number >= 0 (0 = lora_rank), got {alpha!r}"
        )
    targets = ft.get("lora_targets", ())
    if isinstance(targets, str):
        targets = (targets,)
    for t in targets:
        try:
            re.compile(t)
        except (re.error, TypeError) as e:
            raise ValueError(
                f"config.finetune.lora_targets: {t!r} is not a regular expression ({e})"
            ) from None
    return LoRASpec(rank, float(alpha), tuple(targets))


def _kind(mod: nn.Module) -> str | None:
    """'dense' | 'conv' for layers LoRA can adapt, None for others."""
    if isinstance(mod, nn.Dense):
        return "dense"
    if isinstance(mod, nn.Conv) and mod.feature_group_count == 1 and mod.mask is None:
        return "conv"
    return None


def _kernel_size(mod: nn.Conv) -> tuple[int, ...]:
    k = mod.kernel_size
    return (int(k),) if isinstance(k, int) else tuple(int(v) for v in k)


class _Adapters:
    """The interceptor: adds ``scale * lora_b(lora_a(x))`` to the targeted layers' outputs."""

    def __init__(self, spec: LoRASpec):
        self.spec = spec
        self.patterns = [re.compile(t) for t in spec.targets]
        self.active: set[int] = set()  # modules in a call (a subclass re-entering __call__)
        self.inside = 0  # > 0 while an adapter runs
        self.adapted: list[str] = []  # paths of the layers adapted (in call order)
        self.layers: list[str] = []  # every Dense / Conv path seen

    def targeted(self, mod: nn.Module, path: str) -> bool:
        if self.patterns:
            return any(p.fullmatch(path) for p in self.patterns)
        dense_or_1x1 = isinstance(mod, nn.Dense) or all(k == 1 for k in _kernel_size(mod))
        return dense_or_1x1 and path != HEAD

    def __call__(self, next_fun, args, kwargs, context):
        mod = context.module
        if (
            context.method_name != "__call__"
            or self.inside
            or id(mod) in self.active
            or not isinstance(mod, (nn.Dense, nn.Conv))
        ):
            return next_fun(*args, **kwargs)
        self.active.add(id(mod))
        try:
            out = next_fun(*args, **kwargs)
        finally:
            self.active.discard(id(mod))
        path = "/".join(str(p) for p in mod.scope.path)
        self.layers.append(path)
        kind = _kind(mod)
        if kind is None or not self.targeted(mod, path):
            return out
        self.adapted.append(path)
        x = args[0] if args else kwargs["inputs"]
        self.inside += 1
        try:
            delta = self._branch(mod, kind, x, out.shape[-1])
        finally:
            self.inside -= 1
        return out + (self.spec.scale * delta).astype(out.dtype)

    def _branch(self, mod, kind: str, x, d_out: int):
        r = self.spec.rank
        common = dict(use_bias=False, dtype=mod.dtype, param_dtype=mod.param_dtype)
        common["precision"] = mod.precision
        if kind == "dense":
            a = nn.Dense(r, kernel_init=A_INIT, parent=mod, name="lora_a", **common)
            b = nn.Dense(
                d_out, kernel_init=nn.initializers.zeros, parent=mod, name="lora_b", **common
            )
            return b(a(x))
        ks = _kernel_size(mod)
        common["conv_general_dilated"] = mod.conv_general_dilated
        common["conv_general_dilated_cls"] = mod.conv_general_dilated_cls
        a = nn.Conv(
            r,
            ks,
            strides=mod.strides,
            padding=mod.padding,
            input_dilation=mod.input_dilation,
            kernel_dilation=mod.kernel_dilation,
            kernel_init=A_INIT,
            parent=mod,
            name="lora_a",
            **common,
        )
        b = nn.Conv(
            d_out,
            (1,) * len(ks),
            padding="VALID",
            kernel_init=nn.initializers.zeros,
            parent=mod,
            name="lora_b",
            **common,
        )
        return b(a(x))


class LoRAModel(nn.Module):
    """``base`` with LoRA adapters on its targeted Dense / Conv layers (module docstring).

    ``apply(variables, x)`` and ``apply(variables, x, method=model.features)`` are those of
    ``base`` with the adapters added; the variables are the base's (same paths) plus the
    ``<layer>/lora_a/kernel`` and ``<layer>/lora_b/kernel`` parameters.
    """

    base: nn.Module
    rank: int
    alpha: float = 0.0
    targets: tuple[str, ...] = ()

    @property
    def spec(self) -> LoRASpec:
        return LoRASpec(self.rank, self.alpha, tuple(self.targets))

    def setup(self) -> None:
        nn.share_scope(self, self.base)  # the base's variable paths, without a 'base/' level

    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(_Adapters(self.spec)):
            return self.base(*args, **kwargs)

    def features(self, *args, **kwargs):
        """``base.features`` with the adapters (the representation the head reads)."""
        with nn.intercept_methods(_Adapters(self.spec)):
            return self.base.features(*args, **kwargs)


def attach(model: nn.Module, variables, spec: LoRASpec, example, key: jax.Array):
    """(`LoRAModel`, ``variables`` plus freshly initialised adapters) for ``model``.

    ``example`` is one batch of inputs; the base variables are kept as they are (only the
    adapters are initialised, from ``key``). Raises ValueError naming the model's layers if
    ``spec.targets`` selects none of them.
    """
    icpt = _Adapters(spec)

    def init(v, x):  # what LoRAModel.apply does, with this interceptor to read back
        with nn.intercept_methods(icpt):
            # missing params (the adapters) are created, the given ones are kept
            return model.apply(v, x, rngs={"params": key}, mutable=["params"])

    _, new = jax.jit(init)(variables, example)  # traced once: icpt records the layers
    if not icpt.adapted:
        what = list(spec.targets) or "default: every Dense and 1x1 Conv except the head"
        layers = ", ".join(dict.fromkeys(icpt.layers)) or "none"
        raise ValueError(
            f"config.finetune.lora_targets ({what}) matches no ungrouped nn.Dense / nn.Conv "
            f"layer of {type(model).__name__} (its layers: {layers}); k x k convolutions are "
            "adapted only when named, e.g. lora_targets=('.*conv.*',)"
        )
    out = dict(flax.core.unfreeze(variables))
    out["params"] = flax.core.unfreeze(new["params"])
    return LoRAModel(model, spec.rank, spec.alpha, spec.targets), out


def merge(variables, spec: LoRASpec):
    """The base model's variables with every adapter folded into its layer's kernel.

    ``kernel + scale * A (x) B`` (``A`` ``[..., d_in, r]``, ``B`` reshaped ``[r, d_out]``,
    contracted on ``r``, in float32), the ``lora_*`` entries removed: the result applies with
    the base model (``LoRAModel.base``) and computes what the adapted model computes, up to
    float rounding.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    out = {k: v for k, v in flat.items() if "/lora_a/" not in k and "/lora_b/" not in k}
    for k, a in flat.items():
        if not k.endswith("/lora_a/kernel"):
            continue
        layer = k[: -len("/lora_a/kernel")]
        b, w = flat.get(f"{layer}/lora_b/kernel"), flat.get(f"{layer}/kernel")
        if b is None or w is None:
            raise ValueError(f"merge: {layer} has lora_a but no lora_b/kernel or kernel")
        b2 = jnp.reshape(b, (b.shape[-2], b.shape[-1])).astype(jnp.float32)
        delta = jnp.tensordot(a.astype(jnp.float32), b2, axes=1, precision="highest")
        out[f"{layer}/kernel"] = (w.astype(jnp.float32) + spec.scale * delta).astype(w.dtype)
    return flax.traverse_util.unflatten_dict(out, sep="/")
