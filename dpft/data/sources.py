"""Random-access example sources for the streaming pipeline (`dpft.data.stream`).

A source is anything with ``len(source)`` and ``source[i]`` -> ``{'image': ..., 'label': int}``
where the image is either encoded bytes (JPEG, PNG: decoded later, in a worker process) or a
uint8 array ``[H, W]`` / ``[H, W, C]``. Sources are pickled into the worker processes, so each
one opens its files lazily and holds no per-example state: memory follows the batch.

* `ArraySource`: uint8 arrays kept in memory (MNIST, Fashion-MNIST, small subsets).
* `ArrayRecordSource`: ArrayRecord files written by `write_array_record`, read through
  array_record's ``ArrayRecordDataSource`` (one positioned read per example, no readahead).
* `TfdsSource`: a prepared TFDS dataset, read through ``tfds.data_source`` (ArrayRecord shards;
  no TensorFlow needed), which decodes each image to uint8 itself.
* `Subset`: the examples of another source at given indices (``config.data.train_subset``).

Record format of `ArrayRecordSource`: 4 bytes ``b'DPF1'``, the label as a little-endian int64,
then the encoded image bytes.
"""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from dpft.paths import DataError

__all__ = [
    "ArrayRecordSource",
    "ArraySource",
    "Source",
    "Subset",
    "TfdsSource",
    "decode_record",
    "encode_record",
    "write_array_record",
]

_MAGIC = b"DPF1"
_HEADER = struct.Struct("<4sq")


class Source(Protocol):
    """``len(source)`` examples, ``source[i]`` -> ``{'image': bytes | uint8 array, 'label'}``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class ArraySource:
    """Examples held in memory: uint8 images ``[N, H, W(, C)]`` and integer labels ``[N]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays"):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(
                f"{name}: expected uint8 images [N, H, W(, C)], got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise DataError(
                f"{name}: expected one label per image ({images.shape[0]}), got labels of "
                f"shape {labels.shape}"
            )
        self.images, self.labels, self.name = images, labels.astype(np.int64), name

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


def encode_record(image: bytes, label: int) -> bytes:
    """One `ArrayRecordSource` record: header (magic, int64 label) + encoded image bytes."""
    return _HEADER.pack(_MAGIC, int(label)) + bytes(image)


def decode_record(record: bytes, where: str = "record") -> dict[str, Any]:
    """The inverse of `encode_record`; `DataError` naming ``where`` if it is not one."""
    if len(record) <= _HEADER.size or record[:4] != _MAGIC:
        raise DataError(
            f"{where}: expected a dpft ArrayRecord record (b'DPF1' + int64 label + image "
            f"bytes, see dpft.data.write_array_record), got {bytes(record[:8])!r}..."
        )
    _, label = _HEADER.unpack_from(record)
    return {"image": record[_HEADER.size :], "label": np.int64(label)}


def write_array_record(path: str | os.PathLike, examples: Iterable[tuple[bytes, int]]) -> int:
    """Writes ``(encoded image bytes, label)`` pairs to one ArrayRecord file; returns the count.

    The file is written with ``group_size:1`` so that every record can be read on its own.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    count = 0
    try:
        for image, label in examples:
            writer.write(encode_record(image, label))
            count += 1
    finally:
        writer.close()
    return count


class ArrayRecordSource:
    """Examples in ArrayRecord files (a list of paths or one glob pattern), in path order."""

    def __init__(self, paths: str | Sequence[str], what: str = "config.data.train_files"):
        if isinstance(paths, str):
            files = sorted(glob.glob(os.path.expanduser(paths)))
            if not files:
                raise DataError(f"{what}: expected ArrayRecord files, none match {paths!r}")
        else:
            files = [os.fspath(p) for p in paths]
            missing = [p for p in files if not os.path.isfile(p)]
            if not files or missing:
                raise DataError(f"{what}: expected existing ArrayRecord files, missing {missing}")
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.paths, self.what = files, what
        self._data = ArrayRecordDataSource(files)  # grain's subclass adds per-read statistics
        if len(self._data) == 0:
            raise DataError(f"{what}: expected at least one example, the files are empty")

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._data[int(index)], f"{self.what} record {int(index)}")


class TfdsSource:
    """One split of a prepared TFDS dataset, read by index through ``tfds.data_source``."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        self.name, self.split, self.data_dir = name, split, data_dir
        self._source = None
        info = self._open().dataset_info
        missing = [k for k in ("image", "label") if k not in info.features]
        if missing:
            raise DataError(f"TFDS {name}/{split}: expected features 'image' and 'label'")
        self.num_classes = int(getattr(info.features["label"], "num_classes", 0) or 0)
        if not self.num_classes:
            raise DataError(f"TFDS {name}/{split}: expected a ClassLabel 'label' feature")
        self._len = len(self._source)

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
        return self._source

    def __getstate__(self) -> dict:  # workers reopen the data source themselves
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._open()[int(index)]
        return {"image": record["image"], "label": record["label"]}


class Subset:
    """The examples of ``source`` at ``indices`` (example ``i`` is ``source[indices[i]]``)."""

    def __init__(self, source: Source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(source)):
            raise ValueError(f"subset indices must lie in [0, {len(source)})")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[index])]
