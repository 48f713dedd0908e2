"""Feature cache: the frozen backbone's features, computed once and reused.

Head tuning (linear probing) of a frozen public backbone only ever needs the backbone's output
for each example, so dpft computes it once (jitted, in fixed-size batches), stores it under a
key derived from everything that determines it (backbone name and weights file, dataset, split,
subset and preprocessing), and trains the head on the cached features: a DP step then costs a
matmul instead of a forward pass of the backbone.

`feature_shards` (the trainer's head / LP phases and the feature methods) streams the features
into the out-of-core store of `dpft.train.feature_store` (sharded ``.npy`` files, a checksummed
manifest per host, resumable) and returns readers, so memory follows the shard, not the dataset;
`backbone_features` loads the same cache into memory. `cached_features` is the single-file
in-memory cache (``features-<key>.npz``) of the experiment scripts.

Privacy: the cache holds a deterministic function of PRIVATE training examples. It is written
only to the run's own directory (or the cache directory the user names) and enters nothing but
DP mechanisms (the clipped, noised head updates). Never publish a cache of training features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dpft import data as dpdata
from dpft import models
from dpft.data.sources import Subset
from dpft.train import feature_store
from dpft.train.step import unflatten

log = logging.getLogger("dpft")


def cache_key(description: Mapping) -> str:
    """A short stable hash of a JSON-able description of what the features depend on."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_identity(path: str | os.PathLike | None) -> dict:
    """Name, size and mtime of a weights file (cheap stand-in for its content hash)."""
    if not path:
        return {}
    p = pathlib.Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p)}
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def compute_features(
    feature_fn: Callable[[jax.Array], jax.Array], images: np.ndarray, batch_size: int
) -> np.ndarray:
    """``feature_fn`` over ``images`` in fixed-size padded batches (one compilation)."""
    fn = jax.jit(feature_fn)
    out = []
    for batch, mask in dpdata.eval_batches({"image": images}, batch_size):
        feats = np.asarray(fn(jnp.asarray(batch["image"])), np.float32)
        out.append(feats[mask > 0])
    if not out:
        raise ValueError("compute_features: no images")
    return np.concatenate(out, axis=0)


def cached_features(
    cache_dir: str | os.PathLike,
    description: Mapping,
    feature_fn: Callable[[jax.Array], jax.Array],
    splits: Mapping[str, np.ndarray],
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Features of each split's images, loaded from ``cache_dir`` or computed and stored there.

    The file is ``cache_dir/features-<key>.npz`` with the key hashed from ``description`` and
    the split names and sizes; it is written to a temporary name and renamed, so a crash never
    leaves a partial cache that would be read. A cache whose arrays do not match the expected
    number of examples is recomputed.
    """
    desc = {**description, "splits": {k: list(np.shape(v)) for k, v in splits.items()}}
    key = cache_key(desc)
    cache_dir = pathlib.Path(cache_dir)
    path = cache_dir / f"features-{key}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                got = {k: f[k] for k in splits}
            if all(len(got[k]) == len(v) for k, v in splits.items()):
                log.info("feature cache hit: %s", path)
                return got
        except (OSError, KeyError, ValueError) as e:
            log.warning("ignoring unreadable feature cache %s: %s", path, e)
    t0 = time.time()
    got = {k: compute_features(feature_fn, v, batch_size) for k, v in splits.items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **got)
    tmp.replace(path)
    (cache_dir / f"features-{key}.json").write_text(json.dumps(desc, indent=2, default=str))
    log.info("computed features in %.1fs -> %s", time.time() - t0, path)
    return got


def backbone_description(config) -> dict:
    """What the features of ``config``'s backbone depend on (hashed into the cache key)."""
    m, d = config.model, config.data
    return {
        "backbone": m.name,
        "norm": m.norm,
        "pretrained": m.pretrained,
        "weights": file_identity(_weights_path(config)),
        "dataset": d.name,
        "eval_split": d.eval_split,
        "train_subset": d.train_subset,
        "eval_subset": d.eval_subset,
        "validation_fraction": d.validation_fraction,
        "seed": config.seed if (d.train_subset or d.validation_fraction) else None,
        "preprocessing": d.preprocessing or "default",
    }


def _split_description(split) -> list:
    """What a split contributes to the cache key: its image array's shape, or for a streamed
    `dpft.data.StreamSplit` its size, model input shape and evaluation transform."""
    if not isinstance(split, dpdata.StreamSplit):
        return list(np.shape(split["image"]))
    t = split.pinned_transform
    preset = t.preset if isinstance(t.preset, str) else repr(t.preset)
    shape = [len(split), *np.shape(split.example_image)]
    return [*shape, {"stream": [preset, t.size, t.crop_fraction, t.channels, split.output]}]


def _producer(fn, split, batch_size: int) -> tuple[int, Callable]:
    """``(rows, produce)`` of a split for `feature_store.write_store`: ``produce(a, b)`` gives
    the features and labels of rows ``[a, b)``.

    A streamed split is read by its grain workers through the evaluation transform (resize and
    centre crop, no flip), every row once and in order (`dpft.data.stream_eval_batches` over
    the rows ``[a, b)``, channels pinned to example 0's as in training); its uint8 pixels are
    normalised with the split's preset inside ``fn``.
    """
    if not isinstance(split, dpdata.StreamSplit):
        return len(split["label"]), lambda a, b: (
            compute_features(fn, split["image"][a:b], batch_size),
            np.asarray(split["label"][a:b]),
        )
    base = dataclasses.replace(split, transform=split.pinned_transform, augmult=1)

    def produce(a, b):
        part = dataclasses.replace(base, source=Subset(split.source, np.arange(a, b)))
        feats, labels = [], []
        for batch, mask in dpdata.stream_eval_batches(part, batch_size):
            keep = mask > 0  # the batch may be a reused shared block: copied out here
            feats.append(np.asarray(fn(jnp.asarray(batch["image"])), np.float32)[keep])
            labels.append(np.array(batch["label"])[keep])
        return np.concatenate(feats), np.concatenate(labels)

    return len(split), produce


def feature_shards(config, workdir, model, full, train_arrays, eval_arrays) -> dict:
    """``{'train', 'eval'}``: `FeatureShards` readers of ``model.features`` of the images.

    The splits are arrays ``{'image', 'label'}`` or streamed `dpft.data.StreamSplit`s
    (``config.data.pipeline='grain'``: read through the evaluation transform, every example
    once, in order; `_producer`). The backbone runs over this process's rows a shard at a time
    (``finetune.shard_rows`` rows, default about 128 MiB of features, a multiple of
    ``config.eval_batch_size``) and each shard is written as it is done
    (`dpft.train.feature_store`: resumable, checksummed, per host), under
    ``cache_dir/features-<key>`` with ``cache_dir`` = ``config.finetune.cache_dir`` or
    ``WORKDIR/features``. The key holds the backbone (name, norm, pretrained weights'
    identity), the dataset and split choices, the preprocessing and the split sizes (and a
    streamed split's transform), so every driver (centralized head / LP-FT runs, feature
    methods, federated head tuning) shares one cache per cache directory. ``full`` is the flat
    variable dict of the backbone. The labels are stored with the features (``.labels``).

    Privacy:
        Features of private examples are a deterministic function of the private data; they
        are kept in the cache directory and may only enter DP mechanisms (never logged).
    """
    variables = unflatten(full)
    splits = {"train": train_arrays, "eval": eval_arrays}
    desc = {
        **backbone_description(config),
        "splits": {k: _split_description(v) for k, v in splits.items()},
    }
    key = cache_key(desc)
    cache_dir = config.finetune.get("cache_dir", "") or pathlib.Path(workdir) / "features"
    bs = int(config.eval_batch_size)
    streamed = isinstance(train_arrays, dpdata.StreamSplit)
    apply = model.apply
    if streamed:  # uint8 pixels, normalised on the device
        apply = dpdata.normalizing_apply(model.apply, train_arrays.transform.preset)
    fn = jax.jit(lambda x: apply(variables, x, method=model.features))
    shard_rows = int(config.finetune.get("shard_rows", 0) or 0)
    if not shard_rows:
        image = train_arrays.example_image[None] if streamed else train_arrays["image"]
        probe = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *np.shape(image)[1:]), image.dtype))
        shard_rows = feature_store.default_shard_rows(int(np.prod(probe.shape[1:])), bs)

    t0 = time.time()
    readers = feature_store.write_store(
        pathlib.Path(cache_dir) / f"features-{key}",
        key,
        desc,
        {k: _producer(fn, v, bs) for k, v in splits.items()},
        shard_rows=shard_rows,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    log.info("feature shards ready in %.1fs: %s", time.time() - t0, readers["train"])
    return readers


def head_on_features(
    config, workdir, model, full, num_classes, train_arrays, eval_arrays, *, in_memory=False
) -> tuple:
    """A head phase on cached features -> ``(head, variables, train, eval)``.

    ``head`` is the linear model ``linear`` with its ``variables`` taken from ``full`` (the flat
    variable dict of ``model``); ``train`` and ``eval`` are ``{'image', 'label'}`` of the frozen
    backbone's features (`feature_shards`, one cache for every driver). By default the images
    are the memory-mapped readers (a Poisson batch gathers only its sampled rows) and the labels
    those stored with them; ``in_memory`` loads the features as arrays and keeps the splits' own
    label arrays (the federated driver gathers its clients' rows from them).

    Privacy:
        Features of private examples are a deterministic function of the private data; they
        are kept in the cache directory and may only enter DP mechanisms (never logged).
    """
    head = models.get_model("linear", num_classes)
    variables = unflatten({k: v for k, v in full.items() if k.startswith("params/linear/")})
    feats = feature_shards(config, workdir, model, full, train_arrays, eval_arrays)
    splits = {"train": train_arrays, "eval": eval_arrays}
    if in_memory:
        data = {k: {"image": np.asarray(r), "label": splits[k]["label"]} for k, r in feats.items()}
    else:
        data = {k: {"image": r, "label": r.labels} for k, r in feats.items()}
    return head, variables, data["train"], data["eval"]


def backbone_features(config, workdir, model, full, train_arrays, eval_arrays) -> dict:
    """``{'train', 'eval'}``: the features of `feature_shards` (same cache), loaded in memory.

    Privacy:
        Features of private examples are a deterministic function of the private data; they
        are kept in the cache directory and may only enter DP mechanisms (never logged).
    """
    readers = feature_shards(config, workdir, model, full, train_arrays, eval_arrays)
    return {k: np.asarray(r) for k, r in readers.items()}


def _weights_path(config):
    """Path of the pretrained weights file (for the cache key), or None."""
    if not config.model.pretrained:
        return None
    if config.model.pretrained_path:
        return config.model.pretrained_path
    from dpft.models import pretrained

    try:
        return pretrained.weights_path(config.model.pretrained, None)
    except Exception:  # noqa: BLE001 - identity is best effort; the name is in the key anyway
        return None
