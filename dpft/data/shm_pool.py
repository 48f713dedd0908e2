"""Reused shared-memory blocks for the batches that grain workers hand to the calling process.

grain moves a worker's numpy output through a fresh shared-memory block per array, which the
calling process unlinks once it has dropped the array. A fresh block costs the kernel a zeroed
page for every page written, about as much as resizing the images into it. A `BlockPool`
keeps ``slots`` blocks per worker instead and reuses them, so that in the steady state a batch
is written into pages that are already there:

* the calling process creates the blocks (`BlockPool`, before the workers start; pages are
  only allocated when first written), maps them itself (POSIX shared memory under /dev/shm,
  Linux) and unlinks them in `BlockPool.close`;
* a worker (its index comes from grain's ``worker_init_fn``, `set_worker`) takes the first of
  its own blocks whose state word is FREE (`acquire`), marks it BUSY, writes the batch into it
  and sends the block's name instead of the array;
* the calling process wraps the block in an array (`BlockPool.view`) whose state word goes back
  to FREE once nothing reads that memory any more: the array rests on a fresh ctypes object
  over the block (one per hand-out), the object that exports the buffer, so it lives as long as
  every view of the array and every consumer holding the buffer itself (JAX on CPU aliases a
  numpy input's memory and keeps only that exporter alive, not the array passed in). When it is
  collected, the block is FREE: the same lifetime as a grain block, which is unlinked then.

Only the owning worker sets a block BUSY and only the calling process sets it FREE, so the
state word needs no lock. A worker finding none of its blocks FREE (the consumer holds on to
many batches) falls back to a one-shot grain block: nothing ever waits. A reused block holds
the previous batch: the writer overwrites every row it fills and zeroes the others.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
from multiprocessing import shared_memory

import numpy as np

__all__ = ["BlockPool", "PoolSpec", "acquire", "set_worker"]

_HEADER = 64  # bytes before the data: the int64 state word, then padding (alignment)
_FREE, _BUSY = 0, 1
_worker: int | None = None  # this process's grain worker index (None: not a worker)
_opened: dict[str, shared_memory.SharedMemory] = {}  # blocks this worker has mapped
_reused: set[str] = set()  # blocks this worker has written before (not zeros any more)


def set_worker(index: int | None) -> None:
    """Called in each grain worker (``worker_init_fn``) with its index (None: not a worker)."""
    global _worker
    _worker = None if index is None else int(index)


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """What a worker needs to use the pool: block names per worker, shape and dtype."""

    names: tuple[tuple[str, ...], ...]
    shape: tuple[int, ...]
    dtype: str


def _state(buf) -> np.ndarray:
    return np.ndarray((1,), np.int64, buffer=buf)


def _data(buf, shape, dtype) -> np.ndarray:
    return np.ndarray(shape, np.dtype(dtype), buffer=buf, offset=_HEADER)


def _open(name: str) -> shared_memory.SharedMemory:
    """A block created by the calling process, mapped once per worker."""
    shm = _opened.get(name)
    if shm is None:  # (grain's spawned workers share the creator's resource tracker, which
        # keeps one entry per name: attaching registers nothing new)
        shm = _opened[name] = shared_memory.SharedMemory(name)
    return shm


def acquire(spec: PoolSpec | None) -> tuple[str, np.ndarray, bool] | None:
    """``(name, data array, reused)`` of a FREE block of this worker, now BUSY; None when this
    process is not a worker or all its blocks are in use."""
    if spec is None or _worker is None or _worker >= len(spec.names):
        return None
    for name in spec.names[_worker]:
        shm = _open(name)
        state = _state(shm.buf)
        if state[0] == _FREE:
            reused = name in _reused
            state[0] = _BUSY
            _reused.add(name)
            return name, _data(shm.buf, spec.shape, spec.dtype), reused
    return None


def _release(owner) -> None:
    """``__del__`` of a block's buffer owner: the block is FREE again."""
    _state(owner._map)[0] = _FREE


def _map_block(name: str, size: int) -> mmap.mmap:
    """A mapping of block ``name`` of the calling process's own, not a `SharedMemory`'s: one
    that readers' buffers can outlive (a mapping is unmapped when its last export is gone,
    where closing a `SharedMemory` that is still read fails)."""
    fd = os.open(os.path.join("/dev/shm", name.lstrip("/")), os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class BlockPool:
    """``slots`` blocks of ``shape``/``dtype`` per worker, created by the calling process."""

    def __init__(self, workers: int, slots: int, shape: tuple[int, ...], dtype):
        dtype = np.dtype(dtype)
        size = _HEADER + int(np.prod(shape)) * dtype.itemsize
        self._blocks: dict[str, shared_memory.SharedMemory] = {}
        self._maps: dict[str, mmap.mmap] = {}
        names = []
        for _ in range(workers):
            row = []
            for _ in range(slots):
                shm = shared_memory.SharedMemory(create=True, size=size)
                self._blocks[shm.name] = shm
                self._maps[shm.name] = _map_block(shm.name, size)
                shm.close()  # (kept for unlink: only the mapping above is read)
                row.append(shm.name)
            names.append(tuple(row))
        self.spec = PoolSpec(tuple(names), tuple(int(s) for s in shape), dtype.str)
        # a block's buffer owner: ctypes exports the data, the instance pins the mapping (its
        # base buffer) and reaches the state word through ``_map``
        self._owner = type(
            "BlockOwner", (ctypes.c_uint8 * (size - _HEADER),), {"__del__": _release}
        )

    def view(self, name: str) -> np.ndarray:
        """The batch a worker wrote into block ``name``; FREE again once nothing reads it."""
        block = self._maps[name]
        owner = self._owner.from_buffer(block, _HEADER)
        owner._map = block
        return np.frombuffer(owner, np.dtype(self.spec.dtype)).reshape(self.spec.shape)

    def close(self) -> None:
        """Unlinks every block. A block stays mapped while memory from `view` is still read,
        and is unmapped when the last reader is collected."""
        blocks, self._blocks, self._maps = self._blocks, {}, {}
        for shm in blocks.values():
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
