"""``config.data`` -> the two `StreamSplit`s of a run with ``config.data.pipeline = 'grain'``.

Sources, by precedence:

* ``config.data.train_files`` / ``eval_files``: ArrayRecord globs (`write_array_record` format);
  ``config.data.num_classes`` gives the number of classes;
* ``mnist`` / ``fashion_mnist``: the local IDX files, kept in memory (`ArraySource`);
* any other name: the prepared TFDS dataset, by index through ``tfds.data_source``.

``validation_fraction``, ``train_subset`` and ``eval_subset`` select the same examples as the
in-memory pipeline (`dpft.train.build.load_data`), as index subsets of the source. Training uses
the random-resized crop + flip of ``config.data.image_size`` (none when it is 0), evaluation the
resize + centre crop; both normalise with ``config.data.preprocessing`` (default per dataset and
model, `default_preprocessing`).

With ``config.data.augmult = K > 1`` every training example arrives as K views of that transform
(``[K, H, W, C]``), which the loss averages before clipping (`dpft.train.step.cross_entropy_loss`
with ``input_ndim``). Both splits ship uint8 pixels, normalised on the device inside the jitted
step (`dpft.data.normalizing_apply`). Cached backbone features (head / LP phases) are
extracted from the streamed splits (`dpft.train.features.feature_shards`). Not combined with
the streaming pipeline (refused with one line): the on-device ``config.data.augment`` views.
"""

from __future__ import annotations

import numpy as np

from dpft.data.datasets import LOCAL_DATASETS, canonical_name, load, validation_indices
from dpft.data.preprocess import default_preprocessing
from dpft.data.sources import ArrayRecordSource, ArraySource, Subset, TfdsSource
from dpft.data.stream import StreamSplit
from dpft.data.transforms import ImageTransform

__all__ = ["stream_splits"]

_GRAIN = "config.data.pipeline='grain'"


def _refuse_unsupported(config) -> None:
    c = config.data
    if c.get("augment", "") not in ("", "none"):
        raise ValueError(
            f"{_GRAIN} makes its own views (random-resized crop + flip, config.data.image_size;"
            " config.data.augmult of them per example): set config.data.augment=''"
        )


def _sources(config):
    """(train source, eval source, num_classes) before subsetting."""
    c = config.data
    if c.get("train_files", ""):
        if not c.get("eval_files", "") and not c.validation_fraction > 0:
            raise ValueError(
                "config.data.train_files needs config.data.eval_files (an ArrayRecord glob) or "
                "config.data.validation_fraction > 0"
            )
        if not int(c.get("num_classes", 0)) > 0:
            raise ValueError("config.data.train_files needs config.data.num_classes > 0")
        train = ArrayRecordSource(c.train_files, "config.data.train_files")
        evaluation = None
        if c.get("eval_files", "") and not c.validation_fraction > 0:
            evaluation = ArrayRecordSource(c.eval_files, "config.data.eval_files")
        return train, evaluation, int(c.num_classes)
    name = canonical_name(c.name)
    if name in LOCAL_DATASETS:
        kw = {"data_dir": c.data_dir or None}
        ds = load(name, "train", **kw)
        train = ArraySource(ds.images, ds.labels, f"{name} train")
        evaluation = None
        if not c.validation_fraction > 0:
            ev = load(name, c.eval_split, **kw)
            evaluation = ArraySource(ev.images, ev.labels, f"{name} {c.eval_split}")
        return train, evaluation, ds.num_classes
    tfds_dir = c.tfds_data_dir or None
    train = TfdsSource(name, "train", tfds_dir)
    evaluation = None if c.validation_fraction > 0 else TfdsSource(name, c.eval_split, tfds_dir)
    return train, evaluation, train.num_classes


def stream_splits(config) -> tuple[StreamSplit, StreamSplit, int]:
    """``(train split, eval split, num_classes)`` of ``config`` for the streaming pipeline."""
    _refuse_unsupported(config)
    c = config.data
    size = int(c.get("image_size", 0))
    workers = int(c.get("num_workers", -1))
    kind = c.preprocessing or default_preprocessing(c.name, config.model.name)
    train, evaluation, num_classes = _sources(config)
    if c.validation_fraction > 0:
        keep, held_out = validation_indices(len(train), c.validation_fraction, config.seed)
        train, evaluation = Subset(train, keep), Subset(train, held_out)
    if c.train_subset:
        idx = np.random.default_rng([config.seed, 7]).permutation(len(train))
        train = Subset(train, np.sort(idx[: c.train_subset]))
    if c.eval_subset:
        evaluation = Subset(evaluation, np.arange(min(c.eval_subset, len(evaluation))))
    name = canonical_name(c.name)
    train_split = StreamSplit(
        train,
        ImageTransform(kind, size, train=True),
        num_classes,
        workers,
        augmult=int(c.get("augmult", 1)),
        name=f"{name} train",
    )
    eval_split = StreamSplit(
        evaluation, ImageTransform(kind, size), num_classes, workers, name=f"{name} eval"
    )
    return train_split, eval_split, num_classes
