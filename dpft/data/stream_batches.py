"""The elements of the streaming pipeline (`dpft.data.stream`): one whole batch (or chunk) each.

`_StepBatches` gives the rows of a step's padded Poisson batch (a slice of them, or one chunk
of that slice), `_EvalBatches` consecutive eval examples. The batch is allocated once, as one
contiguous array (a reused shared-memory block when made in a grain worker, `dpft.data.shm_pool`),
and each sampled example is read, decoded and resized straight into its row (its views: ``[K, H,
W, C]`` per row). The random crop and flip of view ``v`` of example ``i`` in step ``t`` come from
``numpy.random.default_rng([seed, t, i, v])``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dpft.data import shm_pool
from dpft.data.transforms import ImageTransform, normalize_batch


class _Batches:
    """Element ``j`` -> one whole batch, written row by row into one contiguous array.

    Subclasses give the examples of element ``j`` (`rows`) and the generator of one view. In a
    grain worker (``pool`` given) the image array is a reused shared-memory block of the pool
    (`dpft.data.shm_pool`; the element then carries the block's name), else a fresh grain
    block; in the calling process a numpy array. Rows of padding (mask 0) are zeros.
    """

    def __init__(self, split, transform: ImageTransform, views: int, pool=None):
        self.source, self.name, self.views, self.pool = split.source, split.name, views, pool
        self.transform, self.output = transform, split.output
        self.pixel_shape = split.example_pixels.shape
        self.model_shape = split.example_image.shape if split.output == "float32" else None

    def rows(self, j: int) -> tuple[int, np.ndarray, np.ndarray]:
        """``(step, example indices, mask)`` of element ``j``."""
        raise NotImplementedError

    def rng(self, step: int, index: int, view: int):
        raise NotImplementedError

    def _array(self, shape, dtype, mask: np.ndarray) -> tuple[Any, np.ndarray]:
        """``(what the element carries, the array to fill)``, zeros where ``mask`` is 0."""
        got = shm_pool.acquire(self.pool)
        if got is not None:
            name, array, reused = got
            if reused:  # the block holds an earlier batch
                array[~mask] = 0
            return name, array
        if self.pool is not None:  # a worker whose blocks are all in use: a one-shot block
            from grain.multiprocessing import SharedMemoryArray

            array = SharedMemoryArray(shape, dtype)  # the OS hands it out zero-filled
            return array, array.view(np.ndarray)
        array = np.zeros(shape, dtype)
        return array, array

    def __call__(self, j: int) -> dict[str, Any]:
        step, indices, mask = self.rows(j)
        n, k = len(indices), self.views
        view_shape = (k, *self.pixel_shape) if k > 1 else self.pixel_shape
        float_out = self.output == "float32"
        if float_out:
            pixels = np.zeros((n, *view_shape), np.uint8)
        else:
            image, pixels = self._array((n, *view_shape), np.uint8, mask)
        label = np.zeros(n, np.int32)
        for r in np.flatnonzero(mask).tolist():
            index = int(indices[r])
            item = self.source[index]
            where = f"{self.name} example {index}"
            label[r] = int(item["label"])
            for v in range(k):
                out = pixels[r, v] if k > 1 else pixels[r]
                self.transform.pixels(item["image"], self.rng(step, index, v), where, out)
        if float_out:
            shape = (k, *self.model_shape) if k > 1 else self.model_shape
            image, out = self._array((n, *shape), np.float32, mask)
            normalize_batch(pixels, self.transform.preset, out)
            out[~mask] = 0
        mask = mask.astype(np.float32)
        if self.pool is not None:  # small: pickled with the element, not a shared block each
            label, mask = label.tobytes(), mask.tobytes()
        return {"step": step, "image": image, "label": label, "mask": mask}


class _StepBatches(_Batches):
    """Element ``j``: rows ``lo..hi`` of the padded Poisson batch of step ``start + j``; with
    ``chunk``, chunk ``j % C`` (``chunk`` rows) of those of step ``start + j // C``."""

    def __init__(self, split, sampler, seed: int, start: int, rows, pool=None, chunk=0):
        super().__init__(split, split.pinned_transform, split.augmult, pool)
        self.sampler, self.seed, self.start = sampler, int(seed), int(start)
        self.lo, self.hi = rows
        self.chunk = int(chunk) or self.hi - self.lo

    def rows(self, j: int):
        per_step = (self.hi - self.lo) // self.chunk
        step, lo = self.start + int(j) // per_step, self.lo + int(j) % per_step * self.chunk
        indices, mask = self.sampler.batch_at(step)
        hi = lo + self.chunk
        return step, np.asarray(indices)[lo:hi], np.asarray(mask, bool)[lo:hi]

    def rng(self, step, index, view):
        return np.random.default_rng([self.seed, step, index, view])


class _EvalBatches(_Batches):
    """Element ``j``: examples ``j * B .. (j + 1) * B`` (mask 0 past the end)."""

    def __init__(self, split, batch_size: int, pool=None):
        transform = dataclasses.replace(split.pinned_transform, train=False)
        super().__init__(split, transform, 1, pool)
        self.batch_size, self.n = int(batch_size), len(split)

    def rows(self, j: int):
        idx = np.arange(int(j) * self.batch_size, (int(j) + 1) * self.batch_size)
        return int(j), np.minimum(idx, self.n - 1), idx < self.n

    def rng(self, step, index, view):
        return None
