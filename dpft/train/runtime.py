"""What one phase of a run trains with: its model, data, DP optimizer and jitted functions.

`build_runtime` builds a phase's `Runtime` from the run's `RuntimeSpec` (one per run): it
partitions the model for the phase (`dpft.train.phases`), takes the cached backbone features for
a head phase (`dpft.train.features.head_on_features`), builds the DP optimizer with the phase's
noise key (`noise_key`) and compiles the train step (one array step, host-chunked accumulation or
the mesh-sharded step) and the eval step. With ``config.dp.unit='user'`` the loss is one
clipping unit per user (`dpft.privacy.users.per_user_loss`) and the step takes user batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpft import data as dpdata
from dpft.privacy import keys, users
from dpft.train import accumulate, build, distributed
from dpft.train import features as features_lib
from dpft.train.phases import Phase
from dpft.train.step import (
    TrainState,
    cross_entropy_loss,
    make_eval_step,
    make_train_step,
    partition,
    stacked_cross_entropy,
    state_shardings,
    unflatten,
)

log = logging.getLogger("dpft")
__all__ = ["Runtime", "RuntimeSpec", "build_runtime", "noise_key", "place"]


def noise_key(root: jax.Array, phase: int) -> jax.Array:
    """The privatizer's key of phase ``phase`` (its step keys are `noise.step_key` of it)."""
    return keys.derive(root, "noise", phase)


@dataclasses.dataclass
class Runtime:
    """What one phase trains with: its model, data, state and jitted functions."""

    phase: Phase
    state: TrainState
    step_fn: Callable
    eval_fn: Callable
    train_arrays: dict
    eval_arrays: dict
    chunked: accumulate.AccumulatingStep | None = None  # host-chunked logical steps
    shardings: object = None  # of the state over the mesh (replicated, or FSDP)


@dataclasses.dataclass(frozen=True)
class RuntimeSpec:
    """What every phase's `Runtime` is built from: the run's inputs, the same for each phase."""

    config: Any
    workdir: pathlib.Path
    plan: build.PrivacyPlan
    model: Any  # the whole model (backbone and head)
    full: dict  # its flat variables; the trainer updates them in place between phases
    train_arrays: Any  # arrays {'image', 'label'} or a streamed `dpft.data.StreamSplit`
    eval_arrays: Any
    num_classes: int
    mesh: jax.sharding.Mesh | None = None
    root: jax.Array | None = None  # the run's root key (None: keys.root_key(config.seed))


def build_runtime(spec: RuntimeSpec, index: int, phase: Phase) -> Runtime:
    """Partitions the model for ``phase`` (the run's phase ``index``), builds its DP optimizer
    (noise key `noise_key` of ``index``) and jitted train and eval steps."""
    config, plan, mesh = spec.config, spec.plan, spec.mesh
    if phase.use_features:  # memory-mapped readers: a batch gathers its sampled rows only
        model, variables, train_arrays, eval_arrays = features_lib.head_on_features(
            config,
            spec.workdir,
            spec.model,
            spec.full,
            spec.num_classes,
            spec.train_arrays,
            spec.eval_arrays,
        )
    else:
        model, variables = spec.model, unflatten(spec.full)
        train_arrays, eval_arrays = spec.train_arrays, spec.eval_arrays
    trainable, frozen = partition(variables, phase.trainable)
    clipper = build.build_clipper(config.dp)
    norms = build.build_norm_strategy(config.dp)
    sensitivity = clipper.sensitivity(trainable) if config.dp.clip_norm < math.inf else math.inf
    root = keys.root_key(config.seed) if spec.root is None else spec.root  # secret if secure
    key = noise_key(root, index)
    tx = build.build_optimizer(
        config, plan, sensitivity, key, steps=phase.steps, learning_rate=phase.learning_rate
    )
    state = TrainState(jnp.asarray(phase.start, jnp.int32), trainable, tx.init(trainable), frozen)
    streamed = isinstance(train_arrays, dpdata.StreamSplit)
    apply = model.apply
    if streamed:  # the grain pipeline made the K views; uint8 batches normalised in the step
        apply = dpdata.normalizing_apply(model.apply, train_arrays.transform.preset)
        loss = cross_entropy_loss(apply, None, input_ndim=3)
    elif plan.unit == "user":  # one clipping unit per user: its examples' mean loss
        loss = users.per_user_loss(stacked_cross_entropy(model.apply))
    else:
        loss = cross_entropy_loss(model.apply, build.build_augment(config, phase.use_features))
    chunk = config.train.get("host_chunk_size", 0)
    rows = chunk or plan.max_batch_size // (mesh.size if mesh is not None else 1)
    mb, kw = _microbatching(config, loss, clipper, norms, tx, state, train_arrays, rows)
    options = accumulate.compiler_options(kw["microbatch_unroll"], jax.default_backend()) or None
    chunked = None
    if chunk:
        chunked = accumulate.jit_accumulating(
            accumulate.make_accumulating_step(loss, clipper, tx, microbatch_size=mb, **kw), options
        )
    step = make_train_step(loss, clipper, tx, microbatch_size=mb, mesh=mesh, **kw)
    if plan.unit == "user":  # the gathered [users, k] mask -> user mask and example weights
        step = _on_users(step)
    shardings = None
    if mesh is None:
        step_fn = jax.jit(step, donate_argnums=0, compiler_options=options)
    else:  # params and optimizer state replicated over the mesh, or sharded (FSDP)
        fsdp = bool(config.parallel.get("fsdp", False))
        shardings = state_shardings(mesh, state, fsdp)
        out = (shardings, NamedSharding(mesh, P()))
        step_fn = jax.jit(step, donate_argnums=0, out_shardings=out, compiler_options=options)
    state = place(state, shardings)
    eval_fn = jax.jit(make_eval_step(apply))
    return Runtime(phase, state, step_fn, eval_fn, train_arrays, eval_arrays, chunked, shardings)


def _on_users(step: Callable) -> Callable:
    """``step`` on a user batch: `dpft.privacy.users.split_user_mask` of it first."""

    def on_users(state, batch, rng):
        return step(state, users.split_user_mask(batch), rng)

    return on_users


def _microbatching(config, loss, clipper, norms, tx, state, train_arrays, rows) -> tuple:
    """``(microbatch_size, step kwargs)`` of a step over ``rows`` rows per call.

    ``config.train.microbatch_size = -1`` picks the largest power of two whose compiled step
    fits half the free memory (`accumulate.choose_microbatch`); the kwargs are the norm strategy
    and the microbatch loop's unroll (``config.train.microbatch_unroll``, 0: automatic).
    """
    mb = config.train.microbatch_size or None
    unroll = config.train.get("microbatch_unroll", 0)
    backend = jax.default_backend()
    if mb == -1:
        if isinstance(train_arrays, dpdata.StreamSplit):
            shapes = train_arrays.batch_spec(rows)
        else:
            shapes = {k: ((rows, *v.shape[1:]), v.dtype) for k, v in train_arrays.items()}
        spec = {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}
        spec["mask"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
        rng_spec = jax.ShapeDtypeStruct((2,), jnp.uint32)

        def candidate(m):
            u = accumulate.microbatch_unroll(unroll, rows, m, backend)
            step = make_train_step(
                loss, clipper, tx, microbatch_size=m, norm_strategy=norms, microbatch_unroll=u
            )
            return step, (state, spec, rng_spec), accumulate.compiler_options(u, backend)

        mb, tried = accumulate.choose_microbatch(candidate, rows)
        log.info("microbatch %d chosen from compiled sizes %s", mb, tried)
    kw = {
        "norm_strategy": norms,
        "microbatch_unroll": accumulate.microbatch_unroll(unroll, rows, mb, backend),
    }
    if not unroll and kw["microbatch_unroll"] > 1:
        log.info(
            "train.microbatch_unroll=0: %d microbatches per step unrolled", kw["microbatch_unroll"]
        )
    return mb, kw


def place(state, shardings):
    """``state`` laid out over the mesh (global arrays in a multi-process run)."""
    if shardings is None:
        return state
    if distributed.is_multiprocess():
        return distributed.put(state, shardings)
    return jax.device_put(state, shardings)
