"""Datasets as numpy arrays: local IDX files (MNIST, Fashion-MNIST) and TFDS for the rest.

MNIST and Fashion-MNIST are read from the gzipped IDX files in the data directory
(``config.data.data_dir``, else ``$DPFT_DATA_DIR``, else ../shared/data, else the download cache;
missing files are downloaded on first use, see `dpft.paths`), laid out as
``<data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` and the same under
``fashion-mnist/``. Every other name is loaded through TensorFlow Datasets (random access via
``tfds.data_source``, no TensorFlow needed; ``tfds.load`` as the fallback), from
``config.data.tfds_data_dir`` or TFDS's default directory.

All loaders return a `Dataset`: uint8 images ``[N, H, W, C]``, int32 labels ``[N]``, validated.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from dpft.data.idx import read_idx
from dpft.paths import DataError, data_path

__all__ = [
    "LOCAL_DATASETS",
    "Dataset",
    "canonical_name",
    "load",
    "split_validation",
    "validation_indices",
]

# canonical name -> (folder in the data dir, number of classes)
LOCAL_DATASETS: dict[str, tuple[str, int]] = {
    "mnist": ("mnist", 10),
    "fashion_mnist": ("fashion-mnist", 10),
}
_ALIASES = {"fmnist": "fashion_mnist", "fashion-mnist": "fashion_mnist"}
_LOCAL_SPLITS = {"train": "train", "test": "t10k"}
_TFDS_HINT = "set config.data.tfds_data_dir to a TFDS data dir that holds it"


@dataclasses.dataclass
class Dataset:
    """One split of a labelled image dataset, held in host memory.

    Attributes:
        images: uint8 ``[N, H, W, C]`` (C = 1 for grayscale).
        labels: int32 ``[N]`` with values in ``[0, num_classes)``.
        num_classes: Number of classes of the task.
        name: Canonical dataset name (e.g. 'fashion_mnist', 'cifar10').
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, indices: np.ndarray) -> Dataset:
        """The examples at ``indices`` (a new dataset; the arrays are copied)."""
        idx = np.asarray(indices)
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])

    def validate(self, source: str) -> Dataset:
        """Checks shapes, dtypes and label range; `DataError` naming ``source`` if violated."""
        images, labels = self.images, self.labels
        if images.ndim != 4:
            raise DataError(f"{source}: expected images [N, H, W, C], got shape {images.shape}")
        if images.dtype != np.uint8:
            raise DataError(f"{source}: expected uint8 images, got {images.dtype}")
        if labels.ndim != 1:
            raise DataError(f"{source}: expected labels [N], got shape {labels.shape}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{source}: expected as many images as labels, got {images.shape[0]} images "
                f"and {labels.shape[0]} labels"
            )
        if labels.shape[0] == 0:
            raise DataError(f"{source}: expected at least one example, the split is empty")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{source}: expected integer labels, got {labels.dtype}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise DataError(
                f"{source}: expected labels in [0, {self.num_classes}), found values in "
                f"[{lo}, {hi}]"
            )
        return self


def canonical_name(name: str) -> str:
    """'fmnist' / 'fashion-mnist' -> 'fashion_mnist'; other names unchanged (lower-cased)."""
    name = name.strip().lower()
    return _ALIASES.get(name, name)


def load(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Loads one split of a dataset as uint8 NHWC images and int32 labels.

    Args:
        name: 'mnist', 'fashion_mnist' (aliases 'fmnist', 'fashion-mnist'), read from local IDX
            files; any other name is a TFDS dataset (e.g. 'cifar10', 'colorectal_histology').
        split: 'train' or 'test' for the local datasets; any TFDS split string otherwise
            (e.g. 'train[:90%]').
        data_dir: Overrides the data directory of the local datasets (``config.data.data_dir``).
        tfds_data_dir: TFDS data directory (``config.data.tfds_data_dir``); None: TFDS default.

    Raises:
        DataError: one line naming the file (or TFDS dataset) if it is missing, corrupt or
            inconsistent (label out of range, length mismatch, empty).
        ValueError: an unknown split of a local dataset.
    """
    name = canonical_name(name)
    if name in LOCAL_DATASETS:
        return _load_local(name, split, data_dir)
    return _load_tfds(name, split, tfds_data_dir)


def _local_file(folder: pathlib.Path, stem: str) -> pathlib.Path:
    """``stem.gz`` in ``folder``, or the uncompressed ``stem`` if only that exists."""
    gz = folder / f"{stem}.gz"
    plain = folder / stem
    return plain if not gz.is_file() and plain.is_file() else gz


def _load_local(name: str, split: str, override: str | os.PathLike | None) -> Dataset:
    if split not in _LOCAL_SPLITS:
        raise ValueError(
            f"dataset {name!r} has splits {sorted(_LOCAL_SPLITS)}, got {split!r} "
            "(config.data.eval_split)"
        )
    folder_name, num_classes = LOCAL_DATASETS[name]
    folder = data_path(folder_name, override)  # downloaded on first use (dpft.download)
    prefix = _LOCAL_SPLITS[split]
    images_path = _local_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _local_file(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, expect_ndim=3, expect_dtype=np.uint8)
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"{images_path}: expected 28x28 images, header says {images.shape[1]}x{images.shape[2]}"
        )
    labels = read_idx(labels_path, expect_ndim=1, expect_dtype=np.uint8)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{labels_path}: expected one label per image of {images_path.name} "
            f"({images.shape[0]}), got {labels.shape[0]} labels"
        )
    if labels.shape[0] == 0:
        raise DataError(f"{labels_path}: expected at least one example, the file is empty")
    if int(labels.max()) >= num_classes:
        raise DataError(
            f"{labels_path}: expected labels in [0, {num_classes}), found {int(labels.max())}"
        )
    ds = Dataset(images[..., None], labels.astype(np.int32), num_classes, name)
    return ds.validate(str(images_path))


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _stack(values: list[Any], what: str) -> np.ndarray:
    """Stacks per-example arrays into one preallocated array (no intermediate copies)."""
    first = np.asarray(values[0])
    out = np.empty((len(values), *first.shape), first.dtype)
    for i, v in enumerate(values):
        v = np.asarray(v)
        if v.shape != first.shape:
            raise DataError(
                f"{what}: expected all examples of shape {first.shape}, example {i} has "
                f"{v.shape}; resize the images first"
            )
        out[i] = v
    return out


def _check_features(features: Any, source: str) -> None:
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
        raise DataError(
            f"{source}: expected features 'image' and 'label', missing {missing} "
            f"(has {sorted(features)})"
        )


def _num_classes(info: Any, source: str) -> int:
    label = info.features["label"]
    n = getattr(label, "num_classes", None)
    if not n:
        raise DataError(f"{source}: expected a ClassLabel 'label' feature, got {type(label)}")
    return int(n)


def _load_tfds(name: str, split: str, tfds_data_dir: str | os.PathLike | None) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"dataset {name!r} needs tensorflow-datasets ({_first_line(e)}); "
            "install it, or use mnist / fashion_mnist from the data dir"
        ) from None
    source_name = f"TFDS {name}/{split}"
    data_dir_arg = os.fspath(tfds_data_dir) if tfds_data_dir else None
    records = None
    try:
        if hasattr(tfds, "data_source"):
            try:
                source = tfds.data_source(name, split=split, data_dir=data_dir_arg)
                info = source.dataset_info
                _check_features(info.features, source_name)
                # One record at a time: works for every random-access source (and TFDS's mock).
                records = [source[i] for i in range(len(source))]
            except NotImplementedError:
                records = None  # prepared in a format without random access: use tfds.load
        if records is not None:
            if not records:
                raise DataError(f"{source_name}: expected at least one example, the split is empty")
            images = _stack([r["image"] for r in records], source_name)
            labels = np.asarray([r["label"] for r in records])
        else:
            data, info = tfds.load(
                name, split=split, data_dir=data_dir_arg, batch_size=-1, with_info=True
            )
            _check_features(info.features, source_name)
            data = tfds.as_numpy(data)
            images, labels = np.asarray(data["image"]), np.asarray(data["label"])
        num_classes = _num_classes(info, source_name)
    except DataError:
        raise
    except Exception as e:  # TFDS raises many types; the user gets one line
        raise DataError(
            f"{source_name} unavailable ({type(e).__name__}: {_first_line(e)}); {_TFDS_HINT}"
        ) from None
    if images.ndim == 3:  # grayscale stored without a channel dim
        images = images[..., None]
    if images.dtype != np.uint8:
        raise DataError(f"{source_name}: expected uint8 images, got {images.dtype}")
    ds = Dataset(images, labels.astype(np.int32), num_classes, name)
    return ds.validate(source_name)


def split_validation(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Splits a training set into ``(train, validation)`` by a seeded random permutation.

    ``round(fraction * N)`` examples (at least 1, at most N - 1) go to validation. The split is a
    pure function of ``(seed, N)``, both parts keep their original order, and they are disjoint
    and cover ``ds``.

    Privacy: the validation examples are removed from the private training set, so the DP
    guarantee covers only the training part; choosing hyperparameters on the validation part is
    not private with respect to it unless that selection is accounted for separately.
    """
    train, validation = validation_indices(len(ds), fraction, seed)
    return ds.subset(train), ds.subset(validation)


def validation_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted ``(train, validation)`` indices of `split_validation` for N examples."""
    if not 0 < fraction < 1:
        raise ValueError(f"config.data.validation_fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"cannot split a dataset of {n} example(s) into train and validation")
    n_val = min(max(1, int(round(fraction * n))), n - 1)
    perm = np.random.default_rng([int(seed), 0x5A11D]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
