"""Huge logical batches: one DP step accumulated over host-fed chunks, memory bounded by a chunk.

`make_train_step` takes the whole padded batch as one array, which is fine up to a few tens of
thousands of small images. A logical batch of 2^20 ImageNet-sized examples does not fit in host
memory, let alone in the device's. `make_accumulating_step` splits the same computation in two
pure functions, each jitted once:

* ``accumulate(acc, state, chunk, rng, offset) -> acc``: adds the SUM of clipped per-example
  gradients of one chunk (itself split in microbatches by ``lax.scan``) to ``acc`` (float32).
  Example ``offset + i`` of the logical batch gets the key
  ``derive(rng, "example", offset + i)``, exactly as in the one-array step, so the result does
  not depend on the chunking.
* ``finish(state, acc) -> (state, metrics)``: the DP chain (noise ONCE for the logical batch,
  division by the expected batch size, base optimizer) on the accumulated sum.

`run_chunked` is the host loop: it gathers one chunk of the sampled indices at a time, so peak
memory is one chunk of examples plus the per-example gradients of one microbatch, whatever the
logical batch size. Chunks made only of padding rows are skipped (they would add exactly zero).

`choose_microbatch` picks the largest microbatch whose compiled program fits a memory budget,
from XLA's memory analysis of the compiled step. `microbatch_unroll` resolves the configured
unroll of the microbatch loop (0 = automatic).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft.privacy import clipping
from dpft.train.step import BatchSums, TrainState, apply_dp_update, batch_sums, clipped_grad_fn

log = logging.getLogger("dpft")


class Accumulator(NamedTuple):
    grad_sum: Any  # float32 tree like the trainable params
    sums: BatchSums


class AccumulatingStep(NamedTuple):
    init: Callable[[TrainState], Accumulator]
    accumulate: Callable[..., Accumulator]
    finish: Callable[[TrainState, Accumulator], tuple[TrainState, dict]]


def make_accumulating_step(
    loss_fn: Callable,
    clipper: clipping.Clipper,
    tx: optax.GradientTransformation,
    *,
    microbatch_size: int | None = None,
    norm_strategy: clipping.NormStrategy | None = None,
    microbatch_unroll: int | bool = 1,
) -> AccumulatingStep:
    """The train step of `dpft.train.step.make_train_step`, split for host-side accumulation.

    ``loss_fn(params, frozen, example, rng) -> (loss, aux)`` with ``aux['correct']``.

    Privacy:
        ``finish`` applies ``tx`` (a DP chain: noise drawn once, normalization by the EXPECTED
        batch size) to the sum of clipped per-example gradients over every chunk of the logical
        batch, which has the clipper's sensitivity under add/remove-one, like the one-array
        step. Padding rows and non-finite gradients contribute exactly zero. The ``debug/``
        metrics are computed without noise and are not private.
    """

    def init(state: TrainState) -> Accumulator:
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        z = jnp.zeros([], jnp.float32)
        return Accumulator(zeros, BatchSums(z, z, z, z, z))

    def accumulate(acc: Accumulator, state: TrainState, chunk: dict, rng, offset) -> Accumulator:
        mask = chunk["mask"]
        examples = {k: v for k, v in chunk.items() if k != "mask"}
        grad_fn = clipped_grad_fn(
            loss_fn, state.frozen, clipper, microbatch_size, norm_strategy, microbatch_unroll
        )
        out = grad_fn(state.params, examples, mask, rng, index_offset=offset)
        return Accumulator(
            jax.tree_util.tree_map(jnp.add, acc.grad_sum, out.grad_sum),
            BatchSums(*jax.tree_util.tree_map(jnp.add, acc.sums, batch_sums(out, mask))),
        )

    def finish(state: TrainState, acc: Accumulator) -> tuple[TrainState, dict]:
        return apply_dp_update(tx, state, acc.grad_sum, acc.sums)

    return AccumulatingStep(init, accumulate, finish)


def run_chunked(
    jitted: AccumulatingStep,
    state: TrainState,
    arrays: Mapping[str, np.ndarray],
    indices: np.ndarray,
    mask: np.ndarray,
    chunk_size: int,
    rng: jax.Array,
) -> tuple[TrainState, dict]:
    """One logical step over the padded index batch ``(indices, mask)``, ``chunk_size`` at a time.

    ``jitted`` holds jitted ``accumulate`` / ``finish`` (and ``init``); the padded batch length
    must be a multiple of ``chunk_size`` so every chunk has one static shape.
    """
    if len(indices) % chunk_size:
        raise ValueError(
            f"the padded batch ({len(indices)}) must be a multiple of the chunk size {chunk_size}"
        )
    acc = jitted.init(state)
    for start in range(0, len(indices), chunk_size):
        m = np.asarray(mask[start : start + chunk_size], np.float32)
        if not m.any():
            continue  # padding only: contributes exactly zero
        idx = indices[start : start + chunk_size]
        chunk = {k: np.take(v, idx, axis=0) for k, v in arrays.items()}
        chunk["mask"] = m
        # Wait for the previous chunk before queueing this one: with asynchronous dispatch the
        # loop would otherwise gather every chunk of the logical batch ahead of the device.
        jax.block_until_ready(acc)
        acc = jitted.accumulate(acc, state, chunk, rng, np.uint32(start))
    return jitted.finish(state, acc)


def jit_accumulating(step: AccumulatingStep, options: dict | None = None) -> AccumulatingStep:
    """Each part jitted once; ``finish`` donates the state, ``accumulate`` the accumulator.

    ``options`` are XLA compiler options of ``accumulate`` (see `compiler_options`)."""
    return AccumulatingStep(
        jax.jit(step.init),
        jax.jit(step.accumulate, donate_argnums=0, compiler_options=options or None),
        jax.jit(step.finish, donate_argnums=(0, 1)),
    )


def available_memory_bytes() -> int:
    """Memory the step may use: the device's limit on accelerators, MemAvailable on CPU."""
    dev = jax.devices()[0]
    stats = getattr(dev, "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def compiled_bytes(fn: Callable, *args, options: dict | None = None) -> int:
    """Arguments + outputs + temporaries of ``jax.jit(fn)`` compiled for ``args`` (bytes), with
    the XLA compiler ``options``."""
    analysis = jax.jit(fn, compiler_options=options or None).lower(*args).compile()
    analysis = analysis.memory_analysis()
    if analysis is None:
        raise RuntimeError("this backend gives no memory analysis of compiled programs")
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - getattr(analysis, "alias_size_in_bytes", 0)
    )


#: With ``train.microbatch_unroll=0`` (automatic), steps of up to this many microbatches are
#: compiled as straight-line code on CPU.
AUTO_UNROLL_MAX = 8


def microbatch_unroll(unroll: int, rows: int, microbatch: int | None, backend: str) -> int:
    """The ``unroll`` of the loop over the microbatches of one step call of ``rows`` rows.

    ``unroll`` is ``config.train.microbatch_unroll``: a positive value is returned as is; 0 means
    automatic: on the CPU backend every microbatch of the call is unrolled when there are at most
    `AUTO_UNROLL_MAX` of them (XLA:CPU runs convolutions several times slower inside a loop
    body: 4 microbatches of 64 ResNet-20 examples took 3.6 s in the loop and 1.3 s unrolled),
    otherwise, and on other backends, the loop is kept (1). Without microbatches (``microbatch``
    None or 0) there is no loop and the result is 1.
    """
    if unroll:
        return unroll
    if not microbatch or microbatch < 0 or backend != "cpu":
        return 1
    per_call = -(-rows // microbatch)
    return per_call if per_call <= AUTO_UNROLL_MAX else 1


def compiler_options(unroll: int, backend: str) -> dict:
    """XLA compiler options for a step whose microbatch loop is unrolled ``unroll`` times.

    On CPU an unrolled step is scheduled for memory (``CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``):
    XLA:CPU's default scheduler keeps the temporaries of every unrolled microbatch alive at
    once. ResNet-20, ghost norms, 4 microbatches of 64 (temporaries; time per step): loop
    236 MB, 3.0 s; unrolled 911 MB, 0.9-1.8 s; unrolled and scheduled for memory 367 MB,
    1.0-1.1 s. Elsewhere (and for a loop) XLA's defaults are kept.
    """
    if backend == "cpu" and unroll > 1:
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return {}


def check_microbatching(train: Mapping, rows: int, batch_per_device: int) -> None:
    """Validates ``config.train``'s microbatch keys for step calls of ``rows`` padded rows.

    Raises ``ValueError`` naming the key for a bad ``microbatch_unroll`` or ``microbatch_size``.
    On the CPU backend, warns when an explicit unroll above 1 still leaves a loop, and notes when
    the automatic unroll keeps one (more than `AUTO_UNROLL_MAX` microbatches per call).
    """
    unroll = train.get("microbatch_unroll", 0)
    if not (isinstance(unroll, int) and unroll >= 0):
        raise ValueError(
            f"config.train.microbatch_unroll must be an int >= 0 (0: automatic), got {unroll!r}"
        )
    mb = train.get("microbatch_size", 0) or None
    if mb is not None and mb < -1:
        raise ValueError(f"config.train.microbatch_size must be -1 (auto), 0 or > 0, got {mb}")
    if mb is not None and mb > rows:
        raise ValueError(
            f"config.train.microbatch_size={mb} is larger than the padded batch per device "
            f"{batch_per_device}"
        )
    if mb is None or mb < 0 or jax.default_backend() != "cpu":
        return
    per_call = -(-rows // mb)
    if 1 < unroll < per_call:
        log.warning(
            "config.train.microbatch_unroll=%d leaves %d microbatches per step in a loop, which "
            "XLA:CPU runs several times slower than straight-line code (a ResNet-20 run took "
            "2.5x as long): set it to %d",
            unroll,
            per_call,
            per_call,
        )
    if not unroll and per_call > AUTO_UNROLL_MAX:
        log.info(
            "%d microbatches per step stay in a loop (train.microbatch_unroll=0 unrolls at most "
            "%d on CPU); for convolutional models set train.host_chunk_size=%d (one microbatch "
            "per host chunk) or train.microbatch_unroll=%d",
            per_call,
            AUTO_UNROLL_MAX,
            mb,
            per_call,
        )


def choose_microbatch(
    build: Callable[[int], tuple[Callable, tuple]],
    max_size: int,
    budget_bytes: int | None = None,
    fraction: float = 0.5,
) -> tuple[int, dict[int, int]]:
    """The largest power-of-two microbatch <= ``max_size`` whose program fits the budget.

    ``build(m)`` returns ``(fn, args)`` or ``(fn, args, compiler_options)`` of the step compiled
    with microbatch ``m``. The budget is
    ``fraction`` of `available_memory_bytes` unless given. Returns the size and the measured
    bytes of every candidate tried (a bisection over powers of two, so few compilations).
    """
    budget = budget_bytes if budget_bytes is not None else int(fraction * available_memory_bytes())
    sizes = [1 << k for k in range(max(1, max_size).bit_length()) if (1 << k) <= max_size]
    tried: dict[int, int] = {}

    def fits(m: int) -> bool:
        if m not in tried:
            fn, args, *options = build(m)
            tried[m] = compiled_bytes(fn, *args, options=options[0] if options else None)
        return tried[m] <= budget

    lo, hi = 0, len(sizes) - 1
    if not fits(sizes[0]):
        raise ValueError(
            f"even a microbatch of 1 needs {tried[1]} bytes, over the budget of {budget} bytes"
        )
    while lo < hi:  # invariant: sizes[lo] fits
        mid = (lo + hi + 1) // 2
        if fits(sizes[mid]):
            lo = mid
        else:
            hi = mid - 1
    return sizes[lo], tried
