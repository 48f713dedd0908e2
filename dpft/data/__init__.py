"""Data: local IDX files and TFDS as numpy arrays, preprocessing, host-side batch loading.

* `load` / `Dataset` / `split_validation`: uint8 NHWC images and int32 labels (`datasets`).
* `read_idx`: strict reader of (gzipped) IDX files (`idx`).
* `preprocess` and its presets: float32 model inputs (`preprocess`).
* `BatchLoader` / `eval_batches`: static-shape host batches, prefetched (`loader`).
* Streaming (``config.data.pipeline = 'grain'``, docs/data.md): random-access sources
  (`sources`), per-example transforms (`transforms`), `StreamLoader` / `stream_eval_batches` on
  grain worker processes (`stream`), `stream_splits` from a config (`stream_config`).
"""

from dpft.data.datasets import LOCAL_DATASETS, Dataset, canonical_name, load, split_validation
from dpft.data.idx import read_idx, write_idx
from dpft.data.loader import BatchLoader, eval_batches
from dpft.data.preprocess import (
    PRESETS,
    Preset,
    channel_stats,
    default_preprocessing,
    normalize,
    pad_to_32_rgb,
    preprocess,
    to_float,
)
from dpft.data.sources import (
    ArrayRecordSource,
    ArraySource,
    Subset,
    TfdsSource,
    write_array_record,
)
from dpft.data.stream import StreamLoader, StreamSplit, normalizing_apply, stream_eval_batches
from dpft.data.stream_config import stream_splits
from dpft.data.transforms import ImageTransform

__all__ = [
    "LOCAL_DATASETS",
    "ArrayRecordSource",
    "ArraySource",
    "ImageTransform",
    "StreamLoader",
    "StreamSplit",
    "Subset",
    "TfdsSource",
    "normalizing_apply",
    "stream_eval_batches",
    "stream_splits",
    "write_array_record",
    "PRESETS",
    "BatchLoader",
    "Dataset",
    "Preset",
    "canonical_name",
    "channel_stats",
    "default_preprocessing",
    "eval_batches",
    "load",
    "normalize",
    "pad_to_32_rgb",
    "preprocess",
    "read_idx",
    "split_validation",
    "to_float",
    "write_idx",
]
