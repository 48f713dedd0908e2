"""How a step of the trainer gets its batch and runs on it, in each data layout.

`open_loader` gives a phase's batches: streamed (read by grain workers), loaded from memory, or
indices only (examples gathered chunk by chunk or per process). `run_step` runs one step on
such a batch: the multi-process step (each process's rows make the global batch), the
host-chunked step (over a streamed batch's chunks, `run_streamed_chunks`, or over in-memory
rows, `dpft.train.accumulate.run_chunked`), or one call on the whole batch, split over the mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpft import data as dpdata
from dpft.train import accumulate, distributed

__all__ = ["IndexLoader", "Layout", "open_loader", "run_step", "run_streamed_chunks"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a run's batches go: its processes, mesh, batch cap and host chunk."""

    multi: bool  # a multi-process run
    mesh: jax.sharding.Mesh | None
    max_batch_size: int  # the sampler's padded batch size
    chunk: int  # config.train.host_chunk_size (0: off)


class IndexLoader:
    """Yields ``(step, indices, mask)`` of the sampler's padded batches, for chunked steps."""

    def __init__(self, sampler, start: int, stop: int):
        self._it = ((s, *sampler.batch_at(s)) for s in range(start, stop))

    def __iter__(self):
        return self._it

    def close(self) -> None:
        pass


def open_loader(rt, sampler, start: int, layout: Layout) -> tuple:
    """``(loader, rows)``: the batches of phase ``rt.phase`` from step ``start``; ``rows`` are
    the rows of this process's devices for a multi-process stream (else None)."""
    end, rows = rt.phase.end, None
    if isinstance(rt.train_arrays, dpdata.StreamSplit):  # not cached features
        if layout.multi:  # a multi-process stream reads the rows of this process's devices
            rows = distributed.local_rows(layout.mesh, layout.max_batch_size)
        loader = dpdata.StreamLoader(
            rt.train_arrays,
            sampler,
            start_step=start,
            stop_step=end,
            rows=rows,
            chunk_size=layout.chunk or None,  # host-chunked: the batch read chunk by chunk
        )
    elif rt.chunked is None and not layout.multi:
        loader = dpdata.BatchLoader(
            rt.train_arrays, sampler, start_step=start, prefetch=2, stop_step=end
        )
    else:  # indices only; examples gathered chunk by chunk or per process
        loader = IndexLoader(sampler, start, end)
    return loader, rows


def run_step(rt, layout: Layout, batch, mask, rng, rows=None) -> dict:
    """One step of ``rt`` on an `open_loader` batch (``rt.state`` updated) -> its metrics."""
    mesh = layout.mesh
    streamed = isinstance(rt.train_arrays, dpdata.StreamSplit)
    if layout.multi:  # each process reads or gathers the rows of its own devices
        if streamed:
            local = {**batch, "mask": mask}
            batch = distributed.global_from_rows(mesh, local, rows, layout.max_batch_size)
        else:
            batch = distributed.gather_global(mesh, rt.train_arrays, batch, mask)
        rng = distributed.replicated(mesh, rng)
        rt.state, metrics = rt.step_fn(rt.state, batch, rng)
    elif rt.chunked is not None and streamed:  # batch: its streamed chunks
        rt.state, metrics = run_streamed_chunks(rt.chunked, rt.state, batch, rng)
    elif rt.chunked is not None:
        rt.state, metrics = accumulate.run_chunked(
            rt.chunked, rt.state, rt.train_arrays, batch, mask, layout.chunk, rng
        )
    else:
        batch = {**batch, "mask": mask}
        if mesh is not None:  # examples split over the data axis
            batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
        rt.state, metrics = rt.step_fn(rt.state, batch, rng)
    return metrics


def run_streamed_chunks(jitted, state, chunks, rng):
    """`accumulate.run_chunked` over a streamed batch's ``(offset, chunk)`` pairs: the same
    accumulation, each chunk read (by the grain workers) only when the device takes it."""
    acc = jitted.init(state)
    for offset, part in chunks:
        if not part["mask"].any():
            continue  # padding only: contributes exactly zero
        jax.block_until_ready(acc)  # one chunk ahead of the device at most
        acc = jitted.accumulate(acc, state, part, rng, np.uint32(offset))
    return jitted.finish(state, acc)
