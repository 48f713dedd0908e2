"""Per-example gradient clipping: from a loss to the SUM of clipped per-example gradients.

`clipped_grad(loss_fn, clipper)` turns a per-example loss
``loss_fn(params, example, rng) -> (scalar, aux)`` into a function

    fn(params, batch, mask, rng) -> ClippedGrad(grad_sum, norms, aux, num_nonfinite, ...)

that behaves like ``jax.grad`` of a sum over the batch, except that each example's gradient is
first clipped. The batch has a static leading size (Poisson batches are padded); ``mask`` marks
real rows. Work is done in microbatches of a static size inside ``lax.scan``, so peak memory is
bounded by the microbatch and not by the logical batch.

Two things are swappable:

* the clipping rule (`Clipper`): flat L2, per-layer, automatic and global clipping
  (`dpft.privacy.clippers`, re-exported here);
* how per-example norms are obtained (`NormStrategy`): materialised per-example gradients with
  ``jax.vmap`` (`VmapNorms`) or ghost norms (`dpft.privacy.ghost.GhostNorms`). Both vmap with
  `vmap_per_example`, which keeps a non-finite example from spreading to the others of its
  microbatch through grouped convolutions.

Sensitivity is always stated for the SUM returned here. Dividing by the (public) expected batch
size happens later, in the optimizer chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from dpft.privacy import keys as keys_lib
from dpft.privacy.clippers import (
    AutoClip,
    Clipper,
    FlatClip,
    GlobalClip,
    PerLayerClip,
    _bind,
    leaf_paths,
)

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
    "vmap_per_example",
]


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


def _has_batch_grouped_conv(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a jaxpr nested in it) has a convolution with batch groups."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated" and eqn.params["batch_group_count"] > 1:
            return True
    return any(_has_batch_grouped_conv(sub) for sub in jax_core.subjaxprs(jaxpr))


def vmap_per_example(fn, xs, mask):
    """``jax.vmap(fn)(xs)`` over a leading example axis, one non-finite example kept apart.

    The gradient of a grouped convolution's kernel (``feature_group_count > 1``) is a
    convolution with batch groups, and ``jax.vmap`` folds the examples into those groups: ONE
    convolution for all examples. XLA rewrites it (unless each group has a single output
    feature) into an ungrouped convolution over an extra window dimension whose zero holes
    multiply the other groups' output gradients, so a non-finite example makes every example's
    result NaN (``0 * NaN``). When ``fn``'s jaxpr has a convolution with batch groups (decided
    when traced) and some real row (``mask > 0``) of the result is not finite, the result is
    recomputed one example at a time (``lax.map`` under ``lax.cond``): the non-finite example
    stays the only one. Results without a non-finite value are the vmapped ones; other
    functions are only vmapped. (Under an outer ``jax.vmap`` the ``lax.cond`` becomes a select
    and both branches run.)

    Privacy:
        Without this, one example could zero the contribution of every example that shares its
        microbatch (all of them dropped as non-finite), and the sum's sensitivity would be that
        of the whole microbatch instead of one example.
    """
    out = jax.vmap(fn)(xs)
    one = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    if not _has_batch_grouped_conv(jax.make_jaxpr(fn)(one).jaxpr):
        return out
    m = mask.shape[0]
    finite = jnp.ones((m,), bool)
    for leaf in jax.tree_util.tree_leaves(out):
        finite &= jnp.all(jnp.isfinite(leaf.reshape(m, -1)), axis=1)
    bad = jnp.any(~finite & (mask > 0))
    return jax.lax.cond(bad, lambda: jax.lax.map(fn, xs), lambda: out)


@dataclasses.dataclass(frozen=True)
class VmapNorms:
    """Materialise per-example gradients with ``jax.vmap(jax.grad)``, then clip and sum.

    Memory is O(microbatch x params) for the per-example gradients. They are computed by
    `vmap_per_example`: with grouped convolutions, a microbatch in which some example's
    gradient is not finite is recomputed one example at a time, so that example is dropped
    alone.
    """

    def __call__(self, loss_fn, clipper, params, examples, mask, keys):
        def wrapped(p, example, key):
            loss, aux = loss_fn(p, example, key)
            return loss, (loss, aux)

        grad_fn = jax.grad(wrapped, has_aux=True)
        grads, (loss, aux) = vmap_per_example(lambda x: grad_fn(params, *x), (examples, keys), mask)
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

    One piece because the returned ``fn`` is the one place a batch becomes a released sum: the
    checks, the per-example keys, the padding to microbatches and their scan stay together.

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
        code, no loop). The sum is the same; XLA:CPU runs convolutions markedly slower inside a
        loop body than unrolled (``make bench`` measures it), at the price of compiling every
        copy.

    The returned function takes a batch pytree with a static leading size B, a mask ``[B]``
    (1 = real example, 0 = padding), a PRNG key and optionally ``index_offset`` (default 0);
    example ``i`` gets the key ``keys.derive(rng, "example", index_offset + i)``, so results do
    not depend on the microbatch size, nor on how a logical batch is split over devices or host
    chunks (pass each shard's position in the logical batch as its offset). The function
    carries its sensitivity: ``fn.l2_sensitivity(params)`` is the bound below, which the DP
    optimizers (`dpft.optim.dp_sgd`, ...) take as their ``l2_sensitivity``; ``fn.clipper`` is
    the rule.

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

    fn.clipper = clipper
    fn.l2_sensitivity = clipper.sensitivity  # (params) -> the sensitivity of grad_sum
    return fn
