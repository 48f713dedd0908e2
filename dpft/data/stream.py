"""Streaming input on grain: each step reads, decodes and transforms only its own examples.

`StreamSplit` bundles a random-access source (`dpft.data.sources`), the transform of its split
(`dpft.data.transforms.ImageTransform`) and the worker count. `StreamLoader` is the streaming
counterpart of `dpft.data.BatchLoader`: for steps ``start..stop`` it yields
``(step, {'image', 'label'}, mask)`` where row ``r`` of step ``t`` is example
``sampler.batch_at(t).indices[r]`` through the training transform, and padding rows (mask 0)
are zeros and are never read. With ``rows=(lo, hi)`` only that slice of the padded batch is
read (a process's own devices).

The pipeline is a grain ``MapDataset`` over the (step, row) slots of the requested steps,
mapped per example (read, decode, crop: uint8 pixels) and batched per step (stacked and
normalised at once, `_Collate`), then ``to_iter_dataset`` and ``mp_prefetch``: worker
``w`` of ``W`` prepares the steps ``start + w, start + w + W, ...`` (one whole batch at a time,
``prefetch`` ready batches each) and grain hands them back in step order.

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
from collections.abc import Iterator
from typing import Any

import numpy as np

from dpft.data.sources import Source
from dpft.data.transforms import ImageTransform, normalize_batch

__all__ = ["StreamLoader", "StreamSplit", "default_workers", "stream_eval_batches"]


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
        output: 'float32' (normalised model inputs) or 'uint8' (the cropped pixels before
            normalisation, a quarter of the bytes, for a consumer that normalises on device).
    """

    source: Source
    transform: ImageTransform
    num_classes: int
    num_workers: int = 0
    augmult: int = 1
    name: str = "stream"
    output: str = "float32"

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
    def example_image(self) -> np.ndarray:
        """Example 0 through the evaluation transform, ``[H, W, C]`` (model shapes)."""
        transform = dataclasses.replace(self.transform, train=False)
        image, where = self.source[0]["image"], f"{self.name} example 0"
        return transform.pixels(image, None, where) if self.output == "uint8" else transform(image)

    @property
    def workers(self) -> int:
        return default_workers() if self.num_workers == -1 else self.num_workers


class _Collate:
    """Stacks a step's examples (uint8 pixels) and normalises the whole batch at once.

    Normalising the stacked batch in place (`normalize_batch`) writes each float32 image once,
    where per-example normalisation would allocate and copy it several times. Padding rows
    (mask 0) are zeros in the output.
    """

    def __init__(self, transform: ImageTransform, output: str):
        self.preset, self.output = transform.preset, output

    def __call__(self, elements: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {k: np.stack([e[k] for e in elements]) for k in elements[0]}
        if self.output == "float32":
            image = normalize_batch(out["image"], self.preset)
            image[out["mask"] == 0] = 0
            out["image"] = image
        return out


class _TrainSlot:
    """Slot ``j`` -> the transformed example of row ``lo + j % R`` of step ``start + j // R``."""

    def __init__(self, split: StreamSplit, sampler: Any, seed: int, start: int, rows):
        self.source, self.transform = split.source, split.transform.pixels
        self.sampler, self.seed, self.start = sampler, int(seed), int(start)
        self.lo, self.hi, self.augmult, self.name = rows[0], rows[1], split.augmult, split.name
        shape = split.example_image.shape
        self.shape = (self.augmult, *shape) if self.augmult > 1 else shape
        self._batches: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_batches": {}}

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``sampler.batch_at(step)``, memoised for the few steps a worker is on."""
        if step not in self._batches:
            if len(self._batches) >= 4:
                self._batches.pop(next(iter(self._batches)))
            indices, mask = self.sampler.batch_at(step)
            self._batches[step] = (np.asarray(indices), np.asarray(mask, bool))
        return self._batches[step]

    def example(self, step: int, row: int) -> dict[str, np.ndarray]:
        indices, mask = self.batch(step)
        out = {"step": np.int64(step), "mask": np.float32(mask[row])}
        if not mask[row]:
            out.update(image=np.zeros(self.shape, np.uint8), label=np.int32(0))
            return out
        index = int(indices[row])
        item = self.source[index]
        where = f"{self.name} example {index}"
        views = [
            self.transform(item["image"], np.random.default_rng([self.seed, step, index, v]), where)
            for v in range(self.augmult)
        ]
        out["image"] = np.stack(views) if self.augmult > 1 else views[0]
        out["label"] = np.int32(item["label"])
        return out

    def __call__(self, slot: int) -> dict[str, np.ndarray]:
        r = self.hi - self.lo
        return self.example(self.start + slot // r, self.lo + slot % r)


class _EvalSlot:
    """Slot ``j`` -> example ``j`` through the eval transform (zeros and mask 0 past the end)."""

    def __init__(self, split: StreamSplit):
        self.source, self.name = split.source, split.name
        self.transform = split.transform.pixels
        self.n, self.shape = len(split.source), split.example_image.shape

    def __call__(self, slot: int) -> dict[str, np.ndarray]:
        if slot >= self.n:
            zeros = np.zeros(self.shape, np.uint8)
            return {"image": zeros, "label": np.int32(0), "mask": np.float32(0)}
        item = self.source[slot]
        image = self.transform(item["image"], None, f"{self.name} example {slot}")
        return {"image": image, "label": np.int32(item["label"]), "mask": np.float32(1.0)}


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
        ds = ds.mp_prefetch(options)
    return iter(ds)


class StreamLoader:
    """Iterator over ``(step, batch, mask)`` for steps ``start_step, ..., stop_step - 1``.

    Args:
        split: The training `StreamSplit` (its transform should have ``train=True``).
        sampler: Has ``batch_at(step) -> (indices, mask)`` of static length ``max_batch_size``
            and ``num_examples`` equal to ``len(split)``; it is pickled into the workers.
        start_step: First step to yield (e.g. the step restored from a checkpoint).
        stop_step: Iteration stops before this step; None: ``start_step + 2**31`` steps.
        rows: ``(lo, hi)``: read and yield only these rows of each padded batch.
        prefetch: Ready batches per worker (and per read in the calling process).
        seed: Augmentation seed; default ``sampler.seed``.

    Yields ``step``, ``{'image': f32 [rows, (K,) H, W, C], 'label': i32 [rows]}`` and the float32
    ``mask [rows]``. Call `close` (or use it as a context manager) to stop the workers.
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
        stop = start_step + 2**31 if stop_step is None else int(stop_step)
        self.split, self.sampler, self.stop_step = split, sampler, stop
        self.rows = (lo, hi)
        seed = getattr(sampler, "seed", 0) if seed is None else seed
        self._slot = _TrainSlot(split, sampler, seed, start_step, self.rows)
        self._next_step = int(start_step)
        self._it = None
        if stop > start_step:
            import grain

            dataset = grain.MapDataset.range((stop - start_step) * (hi - lo))
            self._collate = _Collate(split.transform, split.output)
            dataset = dataset.map(self._slot).batch(hi - lo, batch_fn=self._collate)
            self._it = _iterate(dataset, split.workers, prefetch)

    @property
    def step(self) -> int:
        """The step of the next batch `__next__` returns."""
        return self._next_step

    def gather(self, step: int) -> tuple[int, dict[str, np.ndarray], np.ndarray]:
        """The ``(step, batch, mask)`` of any step, computed now in the calling process."""
        out = _Collate(self.split.transform, self.split.output)(
            [self._slot.example(step, r) for r in range(*self.rows)]
        )
        return step, {"image": out["image"], "label": out["label"]}, out["mask"]

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
        return self

    def __next__(self) -> tuple[int, dict[str, np.ndarray], np.ndarray]:
        if self._it is None or self._next_step >= self.stop_step:
            raise StopIteration
        try:
            item = next(self._it)
        except StopIteration:
            self.close()
            raise
        except Exception as e:
            self.close()
            e.add_note(f"(raised by the StreamLoader while preparing step {self._next_step})")
            raise
        step = int(item["step"][0])
        if step != self._next_step:  # cannot happen: grain keeps the dataset's order
            raise RuntimeError(f"StreamLoader expected step {self._next_step}, got {step}")
        self._next_step += 1
        batch = {"image": item["image"], "label": item["label"]}
        return step, batch, np.asarray(item["mask"], np.float32)

    def close(self) -> None:
        """Stops the worker processes; idempotent."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

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
    dataset = grain.MapDataset.range(num_batches * int(batch_size)).map(_EvalSlot(split))
    dataset = dataset.batch(int(batch_size), batch_fn=_Collate(split.transform, split.output))
    it = _iterate(dataset, min(split.workers, num_batches), prefetch)
    try:
        for item in it:
            yield {"image": item["image"], "label": item["label"]}, item["mask"].astype(np.float32)
    finally:
        if hasattr(it, "close"):
            it.close()
