"""The pure DP train step ``(state, batch, rng) -> (state, metrics)`` and the eval step.

One step = clipped per-example gradients of the trainable parameters (frozen ones are closed
over, never differentiated), then the DP optimizer chain (noise once, divide by the expected
batch size, base optimizer). The step is jitted once with donated state; the federated driver
and multi-device runs reuse this same function.

Placement over a mesh (`state_shardings`): parameters and optimizer state replicated, or with
FSDP (``config.parallel.fsdp``) sharded over the data axis on their largest divisible dimension.
The step is the same function either way: inside it the sharded parameters are gathered for
the per-device clipped gradients (``shard_map`` takes them replicated), and jitting with
``out_shardings=state_shardings(...)`` keeps the new state sharded. The noise is drawn on the
full (logical) shape with one key; with partitionable threefry (JAX's default) the values do not
depend on the sharding, so an FSDP run computes what a one-device run computes.

Metrics computed from the private batch without noise (loss, accuracy, clipping statistics) are
returned under ``debug/``: they are NOT differentially private and are meant for debugging.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpft.data import augment as augment_lib
from dpft.data.augment import AugmentSpec
from dpft.privacy import adaptive, clipping

PyTree = Any


class TrainState(NamedTuple):
    step: jax.Array  # int32
    params: PyTree  # trainable parameters (flat dict path -> array)
    opt_state: PyTree  # includes the privatizer's key and count
    frozen: PyTree  # frozen parameters and non-trainable collections (flat dict)


def flatten(variables: PyTree) -> dict[str, jax.Array]:
    """{'params': {'conv1': {'kernel': x}}} -> {'params/conv1/kernel': x}."""
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")


def unflatten(flat: dict[str, jax.Array]) -> PyTree:
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def partition(
    variables: PyTree, trainable: Sequence[str]
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Splits variables into (trainable, frozen) flat dicts.

    A leaf is trainable if it is in the 'params' collection and its path below 'params'
    (e.g. 'layer3_0/conv1/kernel') fully matches one of the regular expressions ``trainable``.
    Raises ValueError if nothing is trainable.
    """
    pats = [re.compile(p) for p in trainable]
    train, frozen = {}, {}
    for path, x in flatten(variables).items():
        coll, _, sub = path.partition("/")
        if coll == "params" and any(p.fullmatch(sub) for p in pats):
            train[path] = x
        else:
            frozen[path] = x
    if not train:
        raise ValueError(f"config.finetune.trainable={list(trainable)} matches no parameter")
    return train, frozen


def cross_entropy_loss(
    apply_fn: Callable,
    augment: AugmentSpec | None = None,
    *,
    input_ndim: int | None = None,
) -> Callable:
    """Per-example loss ``loss(params, frozen, example, rng) -> (loss, aux)`` for classifiers.

    Without ``augment`` (or with `AugmentSpec.identity`) the loss is the cross-entropy of the
    example's ``image``, run through ``apply_fn`` as a batch of one; ``rng`` is unused.

    Augmentation multiplicity (docs/augmult.md): with ``augment``, the image is replaced by its
    K views `dpft.data.augment.views` (drawn from ``rng``: ``keys.derive(rng, "augment", k)``),
    the model runs ONCE on the ``[K, ...]`` stack and the loss is the MEAN of the K losses, so
    the example's gradient is the mean of its views' gradients and `clipped_grad` clips it as
    one unit. ``aux['correct']`` is then the fraction of views classified correctly. Views
    made elsewhere (e.g. by a host pipeline) are accepted as well: with ``input_ndim`` (the
    rank of one model input, e.g. 3 for ``[H, W, C]``), an image with one more leading axis is
    taken as its K views and averaged the same way, without augmenting again.

    Privacy:
        All K views of an example lie inside that example's loss, hence inside its clipping
        unit: the clipped sum keeps the clipper's sensitivity under add/remove-one example,
        whatever K is.
    """
    views_spec = None if augment is None or augment.identity else augment

    def loss(params, frozen, example, rng):
        variables = unflatten({**frozen, **params})
        image, label = example["image"], example["label"]
        given = input_ndim is not None and image.ndim == input_ndim + 1
        if input_ndim is not None and image.ndim not in (input_ndim, input_ndim + 1):
            raise ValueError(
                f"an example's image has shape {image.shape}: expected rank {input_ndim} (one "
                f"input) or {input_ndim + 1} (its views)"
            )
        if not given and views_spec is None:
            logits = apply_fn(variables, image[None])[0]
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -logp[label], {"correct": jnp.argmax(logits) == label}
        views = image if given else augment_lib.views(image, rng, views_spec)
        logits = apply_fn(variables, views)  # one call on the K views
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        correct = jnp.mean((jnp.argmax(logits, -1) == label).astype(jnp.float32))
        return -jnp.mean(logp[:, label]), {"correct": correct}

    return loss


def stacked_cross_entropy(apply_fn: Callable) -> Callable:
    """``losses(params, frozen, examples, rng) -> (losses [k], aux)`` of a ``[k, ...]`` stack.

    The cross-entropy of each of the k examples of ``examples`` (``image [k, ...]``, ``label
    [k]``), from ONE call of ``apply_fn`` on the stack; ``aux['correct']`` is ``[k]``. This is
    what `dpft.privacy.users.per_user_loss` averages over a user's examples (the model sees a
    user as a batch of k inside one clipping unit, as it sees augmentation views).
    """

    def losses(params, frozen, examples, rng):
        del rng  # no augmentation at the user level
        variables = unflatten({**frozen, **params})
        logits = apply_fn(variables, examples["image"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        label = examples["label"]
        nll = -jnp.take_along_axis(logp, label[:, None], axis=1)[:, 0]
        return nll, {"correct": (jnp.argmax(logits, -1) == label).astype(jnp.float32)}

    return losses


def make_train_step(
    loss_fn: Callable,
    clipper: clipping.Clipper,
    tx: optax.GradientTransformation,
    *,
    microbatch_size: int | None = None,
    norm_strategy: clipping.NormStrategy | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    microbatch_unroll: int | bool = 1,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Builds the pure step. ``batch`` holds the example arrays and a float ``mask`` [B].

    ``loss_fn(params, frozen, example, rng) -> (loss, aux)`` with ``aux['correct']``.

    With a ``mesh``, the batch is split over its ``data_axis`` (B must be a multiple of that
    axis' size): each device clips and sums its own examples (example ``i`` of the logical batch
    keeps the key ``derive(rng, "example", i)``), the partial sums are added across devices, and
    the DP chain then runs once on the replicated sum, so the noise is drawn once per logical batch
    with one key, not once per device. Parameters and optimizer state are replicated.
    ``microbatch_unroll`` is the ``unroll`` of `clipping.clipped_grad`'s loop over microbatches.

    Adaptive clipping (``tx`` built on `dpft.privacy.adaptive.adaptive_privatizer`): the clip
    norm is the one held in the privatizer's state (a traced value), ``clipper`` must be a
    `clipping.FlatClip` and is replaced by `adaptive.FlatClipAt` at that norm; the step passes
    the centred unclipped count at that norm to ``tx`` and returns the norm it clipped with
    (``clip_norm``) and the noisy unclipped fraction (``unclipped_fraction``), both DP outputs.

    Privacy:
        The parameter update is ``tx`` applied to the SUM of clipped per-example gradients
        (sensitivity ``clipper.sensitivity(params)`` under add/remove-one, with adaptive
        clipping the current clip norm, the one the privatizer's noise is scaled by), so with
        ``tx`` a DP chain each step is one subsampled Gaussian mechanism. Returned ``debug/``
        metrics are computed from the private batch without noise and are not private.
    """

    def step(state: TrainState, batch: dict, rng: jax.Array):
        mask = batch["mask"]
        examples = {k: v for k, v in batch.items() if k != "mask"}
        current = adaptive.find_state(state.opt_state)
        clip = clipper
        if current is not None:
            if not isinstance(clipper, clipping.FlatClip):
                raise ValueError("adaptive clipping supports flat clipping only")
            if mesh is not None:
                raise ValueError("adaptive clipping is not supported with a device mesh")
            clip = adaptive.FlatClipAt(current.clip.clip_norm)
        grad_fn = clipped_grad_fn(
            loss_fn, state.frozen, clip, microbatch_size, norm_strategy, microbatch_unroll
        )
        if mesh is None:
            out = grad_fn(state.params, examples, mask, rng)
        else:
            out = _sharded(grad_fn, mesh, data_axis)(state.params, examples, mask, rng)
        sums = batch_sums(out, mask)
        if current is None:
            return apply_dp_update(tx, state, out.grad_sum, sums)
        centred = adaptive.centred_unclipped_count(out.norms, mask, current.clip.clip_norm)
        return apply_dp_update(tx, state, out.grad_sum, sums, centred_count=centred)

    return step


class BatchSums(NamedTuple):
    """Sums over the real examples of a (logical) batch, for the ``debug/`` metrics."""

    loss: jax.Array
    correct: jax.Array
    count: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array


def clipped_grad_fn(
    loss_fn, frozen, clipper, microbatch_size=None, norm_strategy=None, unroll: int | bool = 1
):
    """`clipping.clipped_grad` of ``loss_fn`` with the frozen parameters closed over."""

    def per_example(params, example, key):
        return loss_fn(params, frozen, example, key)

    return clipping.clipped_grad(
        per_example,
        clipper,
        microbatch_size=microbatch_size,
        norm_strategy=norm_strategy,
        unroll=unroll,
    )


def batch_sums(out: clipping.ClippedGrad, mask: jax.Array) -> BatchSums:
    """Loss, accuracy and clipping counts of ``out`` summed over the real rows (NOT private)."""
    finite_loss = jnp.where(mask > 0, jnp.nan_to_num(out.loss, posinf=0.0), 0.0)
    return BatchSums(
        jnp.sum(finite_loss),
        jnp.sum(out.aux["correct"] * mask),
        jnp.sum(mask),
        jnp.asarray(out.num_clipped, jnp.float32),
        jnp.asarray(out.num_nonfinite, jnp.float32),
    )


def apply_dp_update(tx, state: TrainState, grad_sum, sums: BatchSums, centred_count=None):
    """``tx`` (the DP chain: noise once, divide by the expected batch) on the clipped sum.

    Returns the next state and the ``debug/`` metrics (computed without noise: not private).
    With adaptive clipping ``centred_count`` (`adaptive.centred_unclipped_count` at the clip
    norm ``grad_sum`` was clipped with) is passed on to the privatizer; a caller that does not
    pass it gets the privatizer's ValueError, so a sum clipped at a static norm is never
    noised at the adaptive one. The metrics then also hold ``clip_norm`` (the norm of this
    step) and ``unclipped_fraction`` (its noisy estimate), which are DP outputs.
    """
    current = adaptive.find_state(state.opt_state)
    extra = {} if current is None else {"centred_count": centred_count}
    updates, opt_state = tx.update(grad_sum, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    params = jax.tree_util.tree_map(lambda p, q: p.astype(q.dtype), params, state.params)
    real = jnp.maximum(sums.count, 1.0)
    metrics = {
        "debug/train_loss": sums.loss / real,
        "debug/train_accuracy": sums.correct / real,
        "debug/batch_size": sums.count,
        "debug/clipped_fraction": sums.clipped / real,
        "debug/nonfinite": sums.nonfinite,
    }
    if current is not None:
        metrics["clip_norm"] = current.clip.clip_norm
        metrics["unclipped_fraction"] = adaptive.find_state(opt_state).clip.fraction
    return TrainState(state.step + 1, params, opt_state, state.frozen), metrics


def _sharded(grad_fn: Callable, mesh: jax.sharding.Mesh, axis: str) -> Callable:
    """``grad_fn`` over a batch sharded along ``axis``: local clipped sums, then one psum."""

    def local(params, examples, mask, rng):
        offset = jax.lax.axis_index(axis) * mask.shape[0]
        out = grad_fn(params, examples, mask, rng, index_offset=offset)
        return out._replace(
            grad_sum=jax.lax.psum(out.grad_sum, axis),
            num_nonfinite=jax.lax.psum(out.num_nonfinite, axis),
            num_clipped=jax.lax.psum(out.num_clipped, axis),
        )

    rows = P(axis)
    out_specs = clipping.ClippedGrad(P(), rows, rows, rows, P(), P())
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(), rows, rows, P()), out_specs=out_specs, check_vma=False
    )


def fsdp_spec(shape: Sequence[int], axis_size: int, axis: str = "data") -> P:
    """``axis`` on the largest dimension of ``shape`` divisible by ``axis_size``; P() if none."""
    dims = [d for d, n in enumerate(shape) if n >= axis_size and n % axis_size == 0]
    if not dims:
        return P()
    d = max(dims, key=lambda i: (shape[i], -i))
    return P(*([None] * d), axis)


def state_shardings(mesh: jax.sharding.Mesh, state: TrainState, fsdp: bool, axis: str = "data"):
    """Shardings of ``state`` over ``mesh``: all replicated, or params and optimizer state FSDP.

    The step counter and the frozen variables stay replicated (the frozen ones are closed over
    inside the per-device gradient computation).
    """
    replicated = NamedSharding(mesh, P())

    def shard(x):
        return NamedSharding(mesh, fsdp_spec(np.shape(x), mesh.shape[axis], axis))

    def rep(tree):
        return jax.tree_util.tree_map(lambda _: replicated, tree)

    if not fsdp:
        return rep(state)
    return TrainState(
        replicated,
        jax.tree_util.tree_map(shard, state.params),
        jax.tree_util.tree_map(shard, state.opt_state),
        rep(state.frozen),
    )


def make_eval_step(apply_fn: Callable) -> Callable:
    """``eval_step(params, frozen, batch) -> sums`` of loss, correct and count, and the logits."""

    def eval_step(params, frozen, batch):
        variables = unflatten({**frozen, **params})
        logits = apply_fn(variables, batch["image"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        mask = batch["mask"]
        nll = -jnp.take_along_axis(logp, batch["label"][:, None], axis=1)[:, 0]
        correct = jnp.argmax(logits, -1) == batch["label"]
        return {
            "loss_sum": jnp.sum(nll * mask),
            "correct_sum": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
            "logits": logits,
        }

    return eval_step
