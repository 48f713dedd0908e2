"""Streaming input on grain: each step reads, decodes and transforms only its own examples.

`StreamSplit` bundles a random-access source (`dpft.data.sources`), the transform of its split
(`dpft.data.transforms.ImageTransform`) and the worker count. `StreamLoader` is the streaming
counterpart of `dpft.data.BatchLoader`: for steps ``start..stop`` it yields
``(step, {'image', 'label'}, mask)`` where row ``r`` of step ``t`` is example
``sampler.batch_at(t).indices[r]`` through the training transform, and padding rows (mask 0)
are zeros and are never read. With ``rows=(lo, hi)`` only that slice of the padded batch is
read (a process's own devices).

The pipeline is a grain ``MapDataset`` with one element per step (`dpft.data.stream_batches`):
the step's
batch is allocated once, as one contiguous uint8 array (in shared memory when it is made in a
worker process, so grain hands it to the calling process without a copy), and each sampled
example is read, decoded and resized straight into its row. ``to_iter_dataset`` and
``mp_prefetch`` then spread the steps over the workers: worker ``w`` of ``W`` prepares the steps
``start + w, start + w + W, ...`` (``prefetch`` ready batches each) and grain hands them back in
step order.

Output: ``'uint8'`` (the default) ships the pixels and leaves the normalisation to the consumer
(the trainer normalises on the device, inside its jitted step: `normalizing_apply`); ``'float32'``
normalises on the host (`dpft.data.transforms.normalize_batch`, bit for bit `preprocess`).

Determinism: the batch of a step is a pure function of ``(sampler seed, step)``, the random crop
and flip of one view a pure function of ``(seed, step, example index, view)`` (a numpy
``default_rng([seed, step, index, view])``). Nothing depends on the worker count, timing or the
step the stream started at, so a resumed run sees exactly the batches of an uninterrupted one.
With ``augmult = K > 1`` the image entry is ``[rows, K, H, W, C]``: K independent views.

`stream_eval_batches` covers an eval split once, in order, in static-shape masked batches.

Privacy: the batches reveal which examples were sampled; do not log them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dpft.data import shm_pool
from dpft.data.preprocess import preprocess
from dpft.data.sources import Source
from dpft.data.stream_batches import _EvalBatches, _StepBatches
from dpft.data.transforms import ImageTransform, normalize_on_device

__all__ = [
    "StreamLoader",
    "StreamSplit",
    "default_workers",
    "normalizing_apply",
    "stream_eval_batches",
]


def default_workers() -> int:
    """The CPU cores this process may use (``config.data.num_workers = -1``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@dataclasses.dataclass
class StreamSplit:
    """One split streamed from ``source`` through ``transform``.

    Attributes:
        source: Random-access examples (`dpft.data.sources.Source`).
        transform: The split's transform (training: random crop + flip; eval: centre crop).
        num_classes: Number of classes of the task.
        num_workers: Worker processes (0: everything in the calling process; -1: one per core).
        augmult: Views per training example (K); 1 gives images ``[rows, H, W, C]``.
        name: For messages.
        output: 'uint8' (the pixels; the consumer normalises, e.g. on device with
            `normalizing_apply`) or 'float32' (normalised on the host).
    """

    source: Source
    transform: ImageTransform
    num_classes: int
    num_workers: int = 0
    augmult: int = 1
    name: str = "stream"
    output: str = "uint8"

    def __post_init__(self):
        if not (isinstance(self.augmult, int) and self.augmult >= 1):
            raise ValueError(f"config.data.augmult must be an int >= 1, got {self.augmult!r}")
        if self.output not in ("float32", "uint8"):
            raise ValueError(f"output must be float32|uint8, got {self.output!r}")
        if not (isinstance(self.num_workers, int) and self.num_workers >= -1):
            raise ValueError(
                f"config.data.num_workers must be an int >= -1, got {self.num_workers!r}"
            )

    def __len__(self) -> int:
        return len(self.source)

    @functools.cached_property
    def example_pixels(self) -> np.ndarray:
        """Example 0 through the evaluation transform: uint8 ``[H, W, C]``."""
        transform = dataclasses.replace(self.transform, train=False)
        return transform.pixels(self.source[0]["image"], None, f"{self.name} example 0")

    @property
    def example_image(self) -> np.ndarray:
        """The float32 model input of example 0 (model shapes, e.g. after 32x32 padding)."""
        return preprocess(self.example_pixels[None], self.transform.preset)[0]

    @property
    def pinned_transform(self) -> ImageTransform:
        """The transform with every image converted to example 0's channel count."""
        channels = self.transform.channels or self.example_pixels.shape[-1]
        return dataclasses.replace(self.transform, channels=channels)

    def batch_spec(self, rows: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{key: (shape, dtype)}`` of a batch of ``rows`` as `StreamLoader` yields it."""
        shape = self.example_pixels.shape
        if self.output == "float32":
            shape = self.example_image.shape
        if self.augmult > 1:
            shape = (self.augmult, *shape)
        dtype = np.dtype(np.uint8 if self.output == "uint8" else np.float32)
        return {"image": ((rows, *shape), dtype), "label": ((rows,), np.dtype(np.int32))}

    @property
    def workers(self) -> int:
        return default_workers() if self.num_workers == -1 else self.num_workers


def normalizing_apply(apply_fn: Callable, preset) -> Callable:
    """``apply_fn`` whose uint8 image inputs are first normalised with ``preset`` (in JAX, so
    inside the caller's jit: `dpft.data.transforms.normalize_on_device`); float inputs pass."""

    def apply(variables, x, *args, **kwargs):
        if x.dtype == np.uint8:
            x = normalize_on_device(x, preset)
        return apply_fn(variables, x, *args, **kwargs)

    return apply


def _init_worker(worker_index: int, worker_count: int) -> None:
    """grain worker init: its index for the block pool; OpenCV in one thread (the parallelism
    is across the workers)."""
    import cv2

    cv2.setNumThreads(1)
    shm_pool.set_worker(worker_index)


def _pool(split: StreamSplit, workers: int, rows: int, prefetch: int):
    """The block pool of a stream in ``workers`` processes (None for none): enough blocks per
    worker for its batches in flight (``prefetch`` ready in the worker, as many queued, one
    being written, two held by the consumer)."""
    if workers == 0:
        return None
    shape, dtype = split.batch_spec(rows)["image"]
    return shm_pool.BlockPool(workers, 2 * prefetch + 3, shape, dtype)


def _iterate(dataset, workers: int, prefetch: int):
    """A grain iterator over a ``MapDataset`` of batches, in ``workers`` processes."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags; a library caller has none
        flags.FLAGS.mark_as_parsed()
    # One batch per read, in one thread: the parallelism is across worker processes.
    ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if workers > 0:
        options = grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, prefetch)
        )
        ds = ds.mp_prefetch(options, worker_init_fn=_init_worker)
    return iter(ds)


def _arrays(item: dict, pool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({'image', 'label'}, mask)`` of an element (a pool block's name -> the array over that
    block; labels and masks from worker processes come as bytes)."""
    image, label, mask = item["image"], item["label"], item["mask"]
    if isinstance(image, str):
        image = pool.view(image)
    if isinstance(label, bytes):
        label, mask = np.frombuffer(label, np.int32), np.frombuffer(mask, np.float32)
    return {"image": image, "label": label}, mask


class StreamLoader:
    """Iterator over ``(step, batch, mask)`` for steps ``start_step, ..., stop_step - 1``.

    Args:
        split: The training `StreamSplit` (its transform should have ``train=True``).
        sampler: Has ``batch_at(step) -> (indices, mask)`` of static length ``max_batch_size``
            and ``num_examples`` equal to ``len(split)``; it is pickled into the workers.
        start_step: First step to yield (e.g. the step restored from a checkpoint).
        stop_step: Iteration stops before this step; None: ``start_step + 2**31`` steps.
        rows: ``(lo, hi)``: read and yield only these rows of each padded batch.
        prefetch: Ready batches (or chunks) per worker (and per read in the calling process).
        seed: Augmentation seed; default ``sampler.seed``.
        chunk_size: Read each batch in chunks of this many rows (a divisor of ``hi - lo``), so
            that memory follows a chunk (``config.train.host_chunk_size``).

    Yields ``step``, ``{'image': [rows, (K,) H, W, C], 'label': i32 [rows]}`` (images uint8 or
    float32 as ``split.output`` says) and the float32 ``mask [rows]``; with ``chunk_size`` the
    batch is instead an iterator over ``(offset, {'image', 'label', 'mask'})``, its chunks in
    order, to consume before the next step. Call `close` (or use it as a context manager) to
    stop the workers.
    """

    def __init__(
        self,
        split: StreamSplit,
        sampler: Any,
        start_step: int = 0,
        stop_step: int | None = None,
        rows: tuple[int, int] | None = None,
        prefetch: int = 2,
        seed: int | None = None,
        chunk_size: int | None = None,
    ):
        n, cap = len(split), int(sampler.max_batch_size)
        num_examples = getattr(sampler, "num_examples", None)
        if num_examples is not None and int(num_examples) != n:
            raise ValueError(f"sampler draws from {num_examples} examples but {split.name} has {n}")
        lo, hi = rows if rows is not None else (0, cap)
        if not 0 <= lo < hi <= cap:
            raise ValueError(f"rows must be (lo, hi) with 0 <= lo < hi <= {cap}, got {rows}")
        if start_step < 0 or prefetch < 1:
            raise ValueError(
                f"start_step must be >= 0 and prefetch >= 1, got {start_step}, {prefetch}"
            )
        chunk = int(chunk_size or hi - lo)
        if not 0 < chunk <= hi - lo or (hi - lo) % chunk:
            raise ValueError(f"chunk_size must divide the {hi - lo} rows read, got {chunk_size}")
        stop = start_step + 2**31 if stop_step is None else int(stop_step)
        self.split, self.sampler, self.stop_step = split, sampler, stop
        self.rows = (lo, hi)
        seed = getattr(sampler, "seed", 0) if seed is None else seed
        self._seed = seed
        self._next_step = int(start_step)
        self._it = self._pool = None
        self._chunk, self._pending = (chunk if chunk_size else None), 0
        if stop > start_step:
            import grain

            workers = split.workers
            self._pool = _pool(split, workers, chunk, prefetch)
            spec = self._pool.spec if self._pool is not None else None
            batches = _StepBatches(split, sampler, seed, start_step, self.rows, spec, chunk)
            per_step = (hi - lo) // chunk
            dataset = grain.MapDataset.range((stop - start_step) * per_step).map(batches)
            self._it = _iterate(dataset, workers, prefetch)

    @property
    def step(self) -> int:
        """The step of the next batch `__next__` returns."""
        return self._next_step

    def gather(self, step: int) -> tuple[int, dict[str, np.ndarray], np.ndarray]:
        """The ``(step, batch, mask)`` of any step, computed now in the calling process."""
        out = _StepBatches(self.split, self.sampler, self._seed, step, self.rows)(0)
        return step, {"image": out["image"], "label": out["label"]}, out["mask"]

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        return self

    def _pull(self, step: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The next element (batch or chunk) of ``step``."""
        try:
            item = next(self._it)
        except StopIteration:
            self.close()
            raise
        except Exception as e:
            self.close()
            e.add_note(f"(raised by the StreamLoader while preparing step {step})")
            raise
        if int(item["step"]) != step:  # cannot happen: grain keeps the dataset's order
            raise RuntimeError(f"StreamLoader expected step {step}, got {item['step']}")
        return _arrays(item, self._pool)

    def _chunks(self, step: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for c in range((self.rows[1] - self.rows[0]) // self._chunk):
            self._pending -= 1
            batch, mask = self._pull(step)
            yield c * self._chunk, {**batch, "mask": mask}

    def __next__(self) -> tuple[int, Any, np.ndarray]:
        while self._pending and self._it is not None:  # chunks of the last step left unread
            self._pending -= 1
            self._pull(self._next_step - 1)
        if self._it is None or self._next_step >= self.stop_step:
            raise StopIteration
        step = self._next_step
        self._next_step += 1
        if self._chunk is None:
            return step, *self._pull(step)
        self._pending = (self.rows[1] - self.rows[0]) // self._chunk
        mask = np.asarray(self.sampler.batch_at(step)[1], np.float32)[slice(*self.rows)]
        return step, self._chunks(step), mask

    def close(self) -> None:
        """Stops the worker processes; idempotent."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @property
    def closed(self) -> bool:
        return self._it is None

    def __enter__(self) -> StreamLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit grain may be half torn down
            pass


def stream_eval_batches(
    split: StreamSplit, batch_size: int, prefetch: int = 2
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Every example of ``split`` once, in order, as ``(batch, mask)`` of ``batch_size`` rows.

    The last batch is padded with zero images whose mask is 0. ``mask`` is float32.
    """
    if not (isinstance(batch_size, int | np.integer) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    import grain

    num_batches = -(-len(split) // int(batch_size))
    workers = min(split.workers, num_batches)
    pool = _pool(split, workers, int(batch_size), prefetch)
    batches = _EvalBatches(split, int(batch_size), pool.spec if pool is not None else None)
    it = _iterate(grain.MapDataset.range(num_batches).map(batches), workers, prefetch)
    try:
        for item in it:
            yield _arrays(item, pool)
    finally:
        if hasattr(it, "close"):
            it.close()
        if pool is not None:
            pool.close()
