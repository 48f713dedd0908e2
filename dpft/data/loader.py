"""Host-side batches: gather the sampler's padded index batches, prefetched in a thread.

`BatchLoader` turns a sampler (`dpft.privacy.sampling.PoissonSampler` or `ShuffleSampler`) and a
dict of equally long numpy arrays into a stream of ``(step, batch, mask)`` with a static batch
size. The batch of step ``t`` is ``arrays[k][sampler.batch_at(t).indices]``, a pure function of
the sampler's seed and ``t``: it does not depend on thread timing, on the prefetch depth, or on
the step the loader was started at, so a run resumed at step ``t`` sees exactly the batches of an
uninterrupted run. The loader never calls ``sampler.next()`` and leaves ``sampler.step`` alone.

`eval_batches` covers an array set exactly once in fixed-size, masked batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["BatchLoader", "eval_batches"]

_POLL_S = 0.1  # how often blocked threads look at the stop flag


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> int:
    """The common leading length of ``arrays``; ValueError if empty or ragged."""
    if not arrays:
        raise ValueError("arrays must hold at least one array")
    lengths = {k: int(np.shape(v)[0]) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"arrays must share their leading dimension, got lengths {lengths}")
    return next(iter(lengths.values()))


def _gather(arrays: Mapping[str, np.ndarray], sampler: Any, step: int):
    indices, mask = sampler.batch_at(step)
    batch = {k: np.take(v, indices, axis=0) for k, v in arrays.items()}
    return step, batch, np.asarray(mask, np.float32)


class _Failure:
    """An exception raised in the worker, handed to the consumer."""

    def __init__(self, error: BaseException, step: int):
        self.error, self.step = error, step


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Puts ``item`` unless ``stop`` is set first; True if it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _work(arrays, sampler, q: queue.Queue, stop: threading.Event, step: int, stop_step) -> None:
    # A free function (not a bound method) so that the thread holds no reference to the loader:
    # a loader dropped without close() is garbage collected and its __del__ stops the thread.
    try:
        while not stop.is_set() and (stop_step is None or step < stop_step):
            if not _put(q, _gather(arrays, sampler, step), stop):
                return
            step += 1
    except BaseException as e:  # re-raised in the consumer
        _put(q, _Failure(e, step), stop)


class BatchLoader:
    """Iterator over ``(step, batch, mask)`` for steps ``start_step, start_step + 1, ...``.

    Args:
        arrays: Equally long arrays, e.g. ``{'image': f32[N, H, W, C], 'label': i32[N]}``.
        sampler: Has ``batch_at(step) -> (indices, mask)`` of static length ``max_batch_size``
            and, optionally, ``num_examples`` (must then equal N).
        start_step: First step to yield (e.g. the step restored from a checkpoint).
        prefetch: Batches prepared ahead by a background thread (bounded queue); 0 computes
            each batch in the caller's thread.
        stop_step: If given, iteration stops before this step; otherwise it never ends.

    Yields:
        ``step``; ``batch``: ``{k: arrays[k][indices]}``, each with leading dim
        ``sampler.max_batch_size`` (padding rows gather index 0); ``mask``: float32
        ``[max_batch_size]``, 1 for sampled rows and 0 for padding.

    An exception raised while preparing a batch is re-raised by ``next()``. Call `close` (or
    use the loader as a context manager) to stop the thread.

    Privacy: the batches reveal which examples were sampled; do not log them.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        sampler: Any,
        start_step: int = 0,
        prefetch: int = 2,
        stop_step: int | None = None,
    ):
        n = _check_arrays(arrays)
        num_examples = getattr(sampler, "num_examples", None)
        if num_examples is not None and int(num_examples) != n:
            raise ValueError(f"sampler draws from {num_examples} examples but arrays hold {n}")
        if start_step < 0 or prefetch < 0:
            raise ValueError(f"start_step and prefetch must be >= 0, got {start_step}, {prefetch}")
        self.arrays = dict(arrays)
        self.sampler = sampler
        self.max_batch_size = int(sampler.max_batch_size)
        self.stop_step = stop_step
        self._next_step = int(start_step)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        if prefetch > 0:
            self._thread = threading.Thread(
                target=_work,
                args=(self.arrays, sampler, self._queue, self._stop, self._next_step, stop_step),
                name="dpft-batch-loader",
                daemon=True,
            )
            self._thread.start()

    @property
    def step(self) -> int:
        """The step of the next batch `__next__` returns."""
        return self._next_step

    def gather(self, step: int) -> tuple[int, dict[str, np.ndarray], np.ndarray]:
        """The ``(step, batch, mask)`` of any step, computed now in the caller's thread."""
        return _gather(self.arrays, self.sampler, step)

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        return self

    def __next__(self) -> tuple[int, dict[str, np.ndarray], np.ndarray]:
        if self._stop.is_set() or (
            self.stop_step is not None and self._next_step >= self.stop_step
        ):
            raise StopIteration
        if self._thread is None:
            try:
                item = self.gather(self._next_step)
            except BaseException as e:
                item = _Failure(e, self._next_step)
        else:
            item = self._get()
        if isinstance(item, _Failure):
            self.close()
            item.error.add_note(f"(raised by the BatchLoader while preparing step {item.step})")
            raise item.error
        if item[0] != self._next_step:  # cannot happen: the worker goes step by step
            raise RuntimeError(f"BatchLoader expected step {self._next_step}, got {item[0]}")
        self._next_step += 1
        return item

    def _get(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive():
                    try:  # it may have put its last item just before exiting
                        return self._queue.get_nowait()
                    except queue.Empty:
                        raise RuntimeError(
                            "BatchLoader worker thread stopped unexpectedly"
                        ) from None

    def close(self) -> None:
        """Stops the worker thread and drops prefetched batches; idempotent."""
        self._stop.set()
        while True:  # unblock a worker waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10 * _POLL_S + 5)
        self._thread = None

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def eval_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Every example exactly once, in order, as fixed-size ``(batch, mask)`` pairs.

    Each batch has leading dim ``batch_size`` (one static shape for a jitted eval step); the
    last is padded with copies of example 0 whose mask is 0. ``mask`` is float32. A streamed
    `dpft.data.StreamSplit` is read through `dpft.data.stream_eval_batches` (zero padding).
    """
    from dpft.data.stream import StreamSplit, stream_eval_batches

    if isinstance(arrays, StreamSplit):
        yield from stream_eval_batches(arrays, batch_size)
        return
    if not (isinstance(batch_size, int | np.integer) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = _check_arrays(arrays)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n
        idx = np.where(valid, idx, 0)
        yield {k: np.take(v, idx, axis=0) for k, v in arrays.items()}, valid.astype(np.float32)
