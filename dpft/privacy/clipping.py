"""Per-example gradient clipping: from a loss to the SUM of clipped per-example gradients.

`clipped_grad(loss_fn, clipper)` turns a per-example loss
``loss_fn(params, example, rng) -> (scalar, aux)`` into a function

    fn(params, batch, mask, rng) -> ClippedGrad(grad_sum, norms, aux, num_nonfinite, ...)

that behaves like ``jax.grad`` of a sum over the batch, except that each example's gradient is
first clipped. The batch has a static leading size (Poisson batches are padded); ``mask`` marks
real rows. Work is done in microbatches of a static size inside ``lax.scan``, so peak memory is
bounded by the microbatch and not by the logical batch.

Two things are swappable:

* the clipping rule (`Clipper`): flat L2, per-layer, automatic and global clipping below;
* how per-example norms are obtained (`NormStrategy`): materialised per-example gradients with
  ``jax.vmap`` today (`VmapNorms`); a ghost-norm strategy can plug in without touching the rules.

Sensitivity is always stated for the SUM returned here. Dividing by the (public) expected batch
size happens later, in the optimizer chain.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from dpft.privacy import keys as keys_lib

PyTree = Any
# Contractions that form a released sum (clipped per-example terms weighted by their factors)
# run at full float32 precision: at the default precision of TPUs (bf16 passes) a rounded
# per-example term can exceed its clip bound.
HIGHEST = jax.lax.Precision.HIGHEST
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Any]]

__all__ = [
    "AutoClip",
    "ClippedGrad",
    "Clipper",
    "FlatClip",
    "GlobalClip",
    "NormStrategy",
    "PerLayerClip",
    "VmapNorms",
    "clip_factors",
    "clipped_grad",
    "leaf_paths",
]


def leaf_paths(tree: PyTree) -> list[str]:
    """'/'-joined key paths of a pytree's leaves, in `jax.tree_util.tree_leaves` order."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for k in path:
            for attr in ("key", "name", "idx"):
                if hasattr(k, attr):
                    parts.append(str(getattr(k, attr)))
                    break
            else:
                parts.append(str(k))
        out.append("/".join(parts))
    return out


def _check_positive(name: str, value: float) -> None:
    if not (value > 0):  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value!r}")


# --------------------------------------------------------------------------------------------
# Clipping rules
# --------------------------------------------------------------------------------------------


class Clipper(Protocol):
    """A clipping rule: how per-example group norms become per-example scale factors.

    ``leaf_groups(params)`` assigns each leaf (in ``tree_leaves`` order) to one of
    ``num_groups(params)`` groups; a clipped example is ``g_group * factor[group]``.
    ``sensitivity(params)`` bounds the L2 norm of any one clipped example, so the SUM over a
    batch changes by at most that much when one example is added or removed.
    """

    def leaf_groups(self, params: PyTree) -> list[int]: ...

    def num_groups(self, params: PyTree) -> int: ...

    def factors(self, group_norms: jax.Array) -> jax.Array: ...

    def sensitivity(self, params: PyTree) -> float: ...


class _SingleGroup:
    def leaf_groups(self, params):
        return [0] * len(jax.tree_util.tree_leaves(params))

    def num_groups(self, params):
        return 1


@dataclasses.dataclass(frozen=True)
class FlatClip(_SingleGroup):
    """Flat L2 clipping (Abadi et al. 2016): ``g * min(1, C / ||g||)``.

    ``clip_norm=inf`` disables clipping (useful for exactness checks; not private).

    Privacy:
        Each clipped example has L2 norm <= C, so the clipped SUM has L2 sensitivity C under
        add/remove-one neighbouring, and 2C under replace-one.
    """

    clip_norm: float

    def __post_init__(self):
        _check_positive("clip_norm", self.clip_norm)

    def factors(self, group_norms):
        return jnp.minimum(1.0, self.clip_norm / group_norms)

    def sensitivity(self, params=None):
        return float(self.clip_norm)


@dataclasses.dataclass(frozen=True)
class AutoClip(_SingleGroup):
    """Automatic (normalized) clipping, AUTO-S of Bu et al. 2023: ``R * g / (||g|| + gamma)``.

    The clip norm disappears as a hyperparameter: ``R`` (default 1) only rescales the update,
    which a learning rate absorbs. ``gamma > 0`` keeps small gradients from being blown up.

    Reference: Bu, Wang, Zha, Karypis, "Automatic clipping: differentially private deep learning
    made easier and stronger", NeurIPS 2023.

    Privacy:
        ``||R g / (||g|| + gamma)|| < R``, so the clipped SUM has L2 sensitivity R (1 by default)
        under add/remove-one neighbouring, and 2R under replace-one.
    """

    gamma: float = 0.01
    scale: float = 1.0

    def __post_init__(self):
        _check_positive("gamma", self.gamma)
        _check_positive("scale", self.scale)

    def factors(self, group_norms):
        return self.scale / (group_norms + self.gamma)

    def sensitivity(self, params=None):
        return float(self.scale)


@dataclasses.dataclass(frozen=True)
class GlobalClip(_SingleGroup):
    """Global per-sample clipping (Bu et al.): ``g * (R / Z) * 1[||g|| <= Z]``.

    Every example whose gradient norm is at most the threshold ``Z`` is scaled by the SAME global
    factor ``R / Z`` (so the batch update keeps the direction of the plain gradient sum over
    those examples, which is what preserves the NTK's positive semi-definiteness in their
    analysis); an example above the threshold contributes zero. ``Z = R`` recovers "keep small
    gradients as they are, drop large ones".

    Reference: Bu, Wang, Zha, Karypis, "On the convergence and calibration of deep learning with
    differential privacy", TMLR 2023 (arXiv:2106.07830), Sec. 5.

    Privacy:
        A kept example has norm <= Z and is scaled by R/Z, so its norm is <= R; a dropped one is
        zero. The clipped SUM has L2 sensitivity R under add/remove-one neighbouring, and 2R
        under replace-one.
    """

    clip_norm: float
    threshold: float | None = None  # Z; defaults to clip_norm

    def __post_init__(self):
        _check_positive("clip_norm", self.clip_norm)
        if self.threshold is not None:
            _check_positive("threshold", self.threshold)

    @property
    def z(self) -> float:
        return self.clip_norm if self.threshold is None else self.threshold

    def factors(self, group_norms):
        keep = group_norms <= self.z
        return jnp.where(keep, self.clip_norm / self.z, 0.0)

    def sensitivity(self, params=None):
        return float(self.clip_norm)


@dataclasses.dataclass(frozen=True)
class PerLayerClip:
    """Per-layer (per-group) clipping: each group ``k`` is clipped to its own norm ``C_k``.

    Groups are given by ``group_fn(path) -> name`` over the '/'-joined leaf paths (default: every
    leaf is its own group). ``clip_norms`` is either one float for every group or a mapping from
    group name to norm; a mapping must name every group.

    Privacy:
        Each clipped example has L2 norm <= sqrt(sum_k C_k^2), which is the sensitivity of the
        clipped SUM under add/remove-one neighbouring (twice that under replace-one).
    """

    clip_norms: float | Mapping[str, float]
    group_fn: Callable[[str], str] | None = None

    def __post_init__(self):
        if isinstance(self.clip_norms, Mapping):
            for k, v in self.clip_norms.items():
                _check_positive(f"clip_norms[{k!r}]", v)
        else:
            _check_positive("clip_norms", self.clip_norms)

    def _names(self, params) -> list[str]:
        paths = leaf_paths(params)
        return [self.group_fn(p) if self.group_fn else p for p in paths]

    def _group_names(self, params) -> list[str]:
        return list(dict.fromkeys(self._names(params)))

    def leaf_groups(self, params):
        index = {n: i for i, n in enumerate(self._group_names(params))}
        return [index[n] for n in self._names(params)]

    def num_groups(self, params):
        return len(self._group_names(params))

    def norms_per_group(self, params) -> list[float]:
        names = self._group_names(params)
        if not isinstance(self.clip_norms, Mapping):
            return [float(self.clip_norms)] * len(names)
        missing = [n for n in names if n not in self.clip_norms]
        if missing:
            raise ValueError(f"clip_norms has no entry for parameter groups {missing}")
        return [float(self.clip_norms[n]) for n in names]

    def bind(self, params) -> _BoundPerLayer:
        return _BoundPerLayer(self, params)

    def factors(self, group_norms):  # pragma: no cover - needs params; see bind()
        raise TypeError("PerLayerClip needs the parameter structure: use clipper.bind(params)")

    def sensitivity(self, params):
        return math.sqrt(sum(c * c for c in self.norms_per_group(params)))


class _BoundPerLayer:
    """PerLayerClip with its group norms resolved against a parameter structure."""

    def __init__(self, spec: PerLayerClip, params):
        self.spec = spec
        self._groups = spec.leaf_groups(params)
        self._num = spec.num_groups(params)
        self._norms = spec.norms_per_group(params)

    def leaf_groups(self, params):
        return self._groups

    def num_groups(self, params):
        return self._num

    def factors(self, group_norms):
        c = jnp.asarray(self._norms, dtype=group_norms.dtype)
        return jnp.minimum(1.0, c / group_norms)

    def sensitivity(self, params=None):
        return math.sqrt(sum(c * c for c in self._norms))


def _bind(clipper, params):
    return clipper.bind(params) if isinstance(clipper, PerLayerClip) else clipper


# --------------------------------------------------------------------------------------------
# Norm strategies
# --------------------------------------------------------------------------------------------


class MicrobatchResult(NamedTuple):
    grad_sum: PyTree  # sum of clipped per-example gradients over the microbatch
    norms: jax.Array  # [m] per-example L2 norms before clipping (inf if non-finite)
    loss: jax.Array  # [m] per-example loss
    aux: Any  # per-example aux, leading dim m
    nonfinite: jax.Array  # [m] bool: a real example whose gradient was not finite
    clipped: jax.Array  # [m] bool: a real example that was scaled down or dropped


class NormStrategy(Protocol):
    """Computes the clipped sum over one microbatch.

    ``__call__(loss_fn, clipper, params, examples, mask, keys) -> MicrobatchResult``, where
    ``examples`` has a leading microbatch dimension and ``keys`` holds one PRNG key per example.
    ``loss_fn(params, example, key) -> (loss, aux)``. A strategy obtains per-group squared norms
    however it likes and turns them into scale factors with `clip_factors`, which enforces the
    mask and the non-finite rule in one place.
    """

    def __call__(self, loss_fn, clipper, params, examples, mask, keys) -> MicrobatchResult: ...


def clip_factors(clipper, group_sq: jax.Array, mask: jax.Array):
    """Per-example, per-group scale factors from squared group norms ``[m, G]``.

    Returns ``(factors [m, G], keep [m], norms [m], nonfinite [m], clipped [m])``. A row is kept
    only if it is real (mask > 0) and its norm is finite; every other row gets factor 0.

    Privacy:
        Enforces the clipper's per-example bound (its ``sensitivity``) on every kept row and
        zero on every other row; this is what makes the SUM's sensitivity hold for padding and
        for NaN/Inf gradients.
    """
    group_norms = jnp.sqrt(group_sq)
    norms = jnp.sqrt(jnp.sum(group_sq, axis=1))
    finite = jnp.isfinite(norms)
    real = mask > 0
    keep = finite & real
    f = clipper.factors(jnp.where(finite[:, None], group_norms, 1.0))
    f = jnp.where(keep[:, None], f, 0.0).astype(jnp.float32)
    clipped = keep & jnp.any((f < 1.0) & (group_norms > 0), axis=1)
    norms = jnp.where(finite, norms, jnp.inf)
    return f, keep, norms, real & ~finite, clipped


@dataclasses.dataclass(frozen=True)
class VmapNorms:
    """Materialise per-example gradients with ``jax.vmap(jax.grad)``, then clip and sum.

    Memory is O(microbatch x params) for the per-example gradients.
    """

    def __call__(self, loss_fn, clipper, params, examples, mask, keys):
        def wrapped(p, example, key):
            loss, aux = loss_fn(p, example, key)
            return loss, (loss, aux)

        grad_fn = jax.grad(wrapped, has_aux=True)
        grads, (loss, aux) = jax.vmap(lambda e, k: grad_fn(params, e, k))(examples, keys)
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        groups = clipper.leaf_groups(params)
        m = mask.shape[0]

        group_sq = jnp.zeros((m, clipper.num_groups(params)), jnp.float32)
        for leaf, gi in zip(leaves, groups, strict=True):
            s = jnp.sum(jnp.square(leaf.reshape(m, -1).astype(jnp.float32)), axis=1)
            group_sq = group_sq.at[:, gi].add(s)
        f, keep, norms, nonfinite, clipped = clip_factors(clipper, group_sq, mask)

        out = []
        for leaf, gi in zip(leaves, groups, strict=True):
            # Zero the rows that are dropped before the weighted sum: 0 * NaN would be NaN.
            safe = jnp.where(keep.reshape((m,) + (1,) * (leaf.ndim - 1)), leaf, 0)
            out.append(jnp.tensordot(f[:, gi], safe.astype(jnp.float32), axes=1, precision=HIGHEST))
        grad_sum = jax.tree_util.tree_unflatten(treedef, out)
        return MicrobatchResult(grad_sum, norms, loss, aux, nonfinite, clipped)


# --------------------------------------------------------------------------------------------
# The public transform
# --------------------------------------------------------------------------------------------


class ClippedGrad(NamedTuple):
    """Output of a clipped-gradient function.

    ``grad_sum`` is the only field that may feed a DP release (after noise). The other fields are
    computed from private data without noise: they are for debugging and must be logged only
    under a ``debug/`` prefix, never released as part of a private result.
    """

    grad_sum: PyTree  # float32, whatever the parameter dtype
    norms: jax.Array  # [B] per-example norms before clipping (inf when non-finite)
    loss: jax.Array  # [B] per-example losses
    aux: Any  # per-example aux, leading dim B
    num_nonfinite: jax.Array  # real examples whose gradient was non-finite (contributed zero)
    num_clipped: jax.Array  # real examples whose scale factor was < 1 (incl. dropped ones)


def clipped_grad(
    loss_fn: LossFn,
    clipper: Clipper,
    *,
    microbatch_size: int | None = None,
    norm_strategy: NormStrategy | None = None,
    has_aux: bool = True,
    unroll: int | bool = 1,
) -> Callable[[PyTree, PyTree, jax.Array, jax.Array], ClippedGrad]:
    """Builds ``fn(params, batch, mask, rng) -> ClippedGrad``: the SUM of clipped gradients.

    Args:
      loss_fn: ``loss_fn(params, example, rng) -> (scalar, aux)`` on ONE example (no batch dim);
        with ``has_aux=False`` it returns only the scalar. Frozen parameters should be closed over
        by ``loss_fn`` so that they are never differentiated per example.
      clipper: a clipping rule (`FlatClip`, `PerLayerClip`, `AutoClip`, `GlobalClip`).
      microbatch_size: examples per vectorised chunk; the batch is padded with masked rows to a
        multiple of it and the chunks are summed with ``lax.scan``. ``None`` = whole batch.
      norm_strategy: how per-example norms are computed (default `VmapNorms`).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      unroll: ``lax.scan``'s ``unroll`` for the loop over microbatches (``True``: straight-line
        code, no loop). The sum is the same; XLA:CPU ran ResNet-20's convolutions 2-3x slower
        inside a loop body than unrolled (4 microbatches of 64, ghost norms: 3.6 s in a loop,
        1.3 s unrolled, 1.5 s as 4 separate calls), at the price of compiling every copy.

    The returned function takes a batch pytree with a static leading size B, a mask ``[B]``
    (1 = real example, 0 = padding), a PRNG key and optionally ``index_offset`` (default 0);
    example ``i`` gets the key ``keys.derive(rng, "example", index_offset + i)``, so results do
    not depend on the microbatch size, nor on how a logical batch is split over devices or host
    chunks (pass each shard's position in the logical batch as its offset).

    Privacy:
        ``grad_sum`` has L2 sensitivity ``clipper.sensitivity(params)`` under add/remove-one
        neighbouring (twice that under replace-one): a padding row (mask 0) contributes exactly
        zero, and an example whose gradient is not finite contributes exactly zero (it is
        counted in ``num_nonfinite``). The weighted sums are contracted at
        ``Precision.HIGHEST``, so reduced default matmul precision (TPU) cannot push a
        per-example term past its bound. All other outputs are NOT private.
    """
    strategy = norm_strategy or VmapNorms()
    if microbatch_size is not None and (
        not isinstance(microbatch_size, int) or microbatch_size <= 0
    ):
        raise ValueError(f"microbatch_size must be a positive int, got {microbatch_size!r}")
    base_loss = loss_fn if has_aux else (lambda p, e, k: (loss_fn(p, e, k), ()))

    def fn(params, batch, mask, rng, index_offset=0) -> ClippedGrad:
        clip = _bind(clipper, params)
        leaves = jax.tree_util.tree_leaves(batch)
        if not leaves:
            raise ValueError("batch is empty: expected a pytree of arrays with a leading dim")
        b = leaves[0].shape[0]
        if mask.shape != (b,):
            raise ValueError(f"mask must have shape ({b},), got {mask.shape}")
        m = b if microbatch_size is None else microbatch_size
        if m > b:
            raise ValueError(f"microbatch_size={m} is larger than the batch size {b}")
        k = -(-b // m)
        pad = k * m - b
        idx = jnp.arange(k * m, dtype=jnp.uint32) + jnp.asarray(index_offset, jnp.uint32)
        keys = jax.vmap(lambda i: keys_lib.derive(rng, "example", i))(idx)

        def padded(x):
            x = jnp.asarray(x)
            if pad:
                x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
            return x.reshape((k, m) + x.shape[1:])

        xs = (jax.tree_util.tree_map(padded, batch), padded(mask), keys.reshape((k, m, -1)))
        zero = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        def body(acc, x):
            ex, mk, ky = x
            r = strategy(base_loss, clip, params, ex, mk, ky)
            acc = jax.tree_util.tree_map(jnp.add, acc, r.grad_sum)
            return acc, (r.norms, r.loss, r.aux, r.nonfinite, r.clipped)

        if k == 1:
            total, per_ex = body(zero, jax.tree_util.tree_map(lambda a: a[0], xs))
            per_ex = jax.tree_util.tree_map(lambda a: a[None], per_ex)
        else:
            total, per_ex = jax.lax.scan(body, zero, xs, unroll=unroll)
        norms, loss, aux, nonfinite, clipped = jax.tree_util.tree_map(
            lambda a: a.reshape((k * m,) + a.shape[2:])[:b], per_ex
        )
        return ClippedGrad(
            grad_sum=total,
            norms=norms,
            loss=loss,
            aux=aux,
            num_nonfinite=jnp.sum(nonfinite),
            num_clipped=jnp.sum(clipped),
        )

    return fn
