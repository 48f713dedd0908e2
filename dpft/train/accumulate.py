"""Huge logical batches: one DP step accumulated over host-fed chunks, memory bounded by a chunk.

`make_train_step` takes the whole padded batch as one array, which is fine up to a few tens of
thousands of small images. A logical batch of 2^20 ImageNet-sized examples does not fit in host
memory, let alone in the device's. `make_accumulating_step` splits the same computation in two
pure functions, each jitted once:

* ``accumulate(acc, state, chunk, rng, offset) -> acc``: adds the SUM of clipped per-example
  gradients of one chunk (itself split in microbatches by ``lax.scan``) to ``acc`` (float32).
  Example ``offset + i`` of the logical batch gets the key ``fold_in(rng, offset + i)``, exactly
  as in the one-array step, so the result does not depend on the chunking.
* ``finish(state, acc) -> (state, metrics)``: the DP chain (noise ONCE for the logical batch,
  division by the expected batch size, base optimizer) on the accumulated sum.

`run_chunked` is the host loop: it gathers one chunk of the sampled indices at a time, so peak
memory is one chunk of examples plus the per-example gradients of one microbatch, whatever the
logical batch size. Chunks made only of padding rows are skipped (they would add exactly zero).

`choose_microbatch` picks the largest microbatch whose compiled program fits a memory budget,
from XLA's memory analysis of the compiled step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft.privacy import clipping
from dpft.train.step import BatchSums, TrainState, apply_dp_update, batch_sums, clipped_grad_fn


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


def jit_accumulating(step: AccumulatingStep) -> AccumulatingStep:
    """Each part jitted once; ``finish`` donates the state, ``accumulate`` the accumulator."""
    return AccumulatingStep(
        jax.jit(step.init),
        jax.jit(step.accumulate, donate_argnums=0),
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


def compiled_bytes(fn: Callable, *args) -> int:
    """Arguments + outputs + temporaries of ``jax.jit(fn)`` compiled for ``args`` (bytes)."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        raise RuntimeError("this backend gives no memory analysis of compiled programs")
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - getattr(analysis, "alias_size_in_bytes", 0)
    )


def choose_microbatch(
    build: Callable[[int], tuple[Callable, tuple]],
    max_size: int,
    budget_bytes: int | None = None,
    fraction: float = 0.5,
) -> tuple[int, dict[int, int]]:
    """The largest power-of-two microbatch <= ``max_size`` whose program fits the budget.

    ``build(m)`` returns ``(fn, args)`` of the step compiled with microbatch ``m``. The budget is
    ``fraction`` of `available_memory_bytes` unless given. Returns the size and the measured
    bytes of every candidate tried (a bisection over powers of two, so few compilations).
    """
    budget = budget_bytes if budget_bytes is not None else int(fraction * available_memory_bytes())
    sizes = [1 << k for k in range(max(1, max_size).bit_length()) if (1 << k) <= max_size]
    tried: dict[int, int] = {}

    def fits(m: int) -> bool:
        if m not in tried:
            fn, args = build(m)
            tried[m] = compiled_bytes(fn, *args)
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
