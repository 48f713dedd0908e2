"""Out-of-core feature cache: sharded ``.npy`` files with a checksummed manifest, per host.

Layout of one cache (``DIR = cache_dir/features-<key>``), for split S (``train``, ``eval``) and
process P (5 digits) of a run with ``process_count`` processes:

* ``S-pP-J.x.npy``: shard J of P's rows, float32 [rows, d]; ``S-pP-J.y.npy``: its labels,
  int32 [rows];
* ``S-pP-J.json``: the shard's sidecar (start row, rows, d, sha256 of both files, cache key),
  written after both files;
* ``manifest-pP.json``: everything P wrote (key, description, d, dtype, process count, and per
  split the total rows, P's range and its shards with their sha256), written LAST, atomically.

Process P extracts rows ``[P N // count, (P + 1) N // count)`` of each split (a single-process
run is one host holding every row). Every file is written under a temporary name and renamed.

Resume: a rerun keeps each shard whose sidecar matches the key and its row range and whose files
hash to the sidecar's sha256, and (re)computes every other one: a missing, partial or corrupted
shard is rewritten (a corrupted one with a warning naming it). Reading is checked too: a shard
whose sha256 does not match the manifest raises `ShardError` naming the file (delete it and
rerun the extraction to recompute it).

`FeatureShards` reads one split of one host: `iter_shards` yields ``(x, y)`` shard by shard
(each file read once, hashed as it is read), and ``take(indices)`` (so ``np.take``) gathers
rows by index from memory-mapped shards, touching only the sampled rows.

Privacy: the shards hold a deterministic function of PRIVATE training examples: keep them in the
run's directory (or the cache directory the user names) and never publish them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Iterator, Mapping

import numpy as np

log = logging.getLogger("dpft")

__all__ = ["FeatureShards", "ShardError", "host_range", "open_split", "write_store"]

FORMAT = 1
SHARD_BYTES = 128 << 20  # default shard size: 128 MiB of float32 features


class ShardError(ValueError):
    """A shard or manifest that is missing, unreadable or does not match its checksum."""


def host_range(num_rows: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a split that process ``process_index`` extracts."""
    return process_index * num_rows // process_count, (
        process_index + 1
    ) * num_rows // process_count


def default_shard_rows(dim: int, multiple: int = 1) -> int:
    """Rows per shard: about `SHARD_BYTES` of float32 features, a multiple of ``multiple``."""
    rows = max(1, SHARD_BYTES // (4 * max(1, dim)))
    return max(multiple, rows // multiple * multiple)


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _replace_atomically(path: pathlib.Path, write: Callable) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    tmp.replace(path)


def _save(path: pathlib.Path, array: np.ndarray) -> str:
    _replace_atomically(path, lambda f: np.save(f, array, allow_pickle=False))
    return sha256_file(path)


def _write_json(path: pathlib.Path, obj) -> None:
    _replace_atomically(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _kept(directory: pathlib.Path, name: str, key: str, start: int, rows: int) -> dict | None:
    """The sidecar of shard ``name`` if the shard was completely written for this key and row
    range and both its files hash to the sidecar's sha256; None otherwise."""
    try:
        entry = json.loads((directory / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if (entry.get("key"), entry.get("start"), entry.get("rows")) != (key, start, rows):
        return None
    for part in ("x", "y"):
        path = directory / f"{name}.{part}.npy"
        try:
            if sha256_file(path) != entry[f"{part}_sha256"]:
                log.warning("feature shard %s does not match its sha256: recomputing it", path)
                return None
        except (OSError, KeyError):
            return None
    return {k: entry[k] for k in ("name", "start", "rows", "dim", "x_sha256", "y_sha256")}


def write_split(directory, split, num_rows, produce, *, key, shard_rows, process_index, count):
    """Writes (or keeps) the shards of this process's rows of ``split``; -> (entry, dim)."""
    start, stop = host_range(num_rows, process_index, count)
    shards, dim, written = [], None, 0
    for j, a in enumerate(range(start, stop, shard_rows)):
        b = min(stop, a + shard_rows)
        name = f"{split}-p{process_index:05d}-{j:05d}"
        entry = _kept(directory, name, key, a, b - a)
        if entry is None:
            x, y = produce(a, b)
            x, y = np.asarray(x, np.float32), np.asarray(y).astype(np.int32)
            if x.ndim != 2 or x.shape[0] != b - a or y.shape != (b - a,):
                raise ValueError(f"{name}: need features [{b - a}, d] and labels [{b - a}]")
            entry = {"name": name, "start": a, "rows": b - a, "dim": int(x.shape[1])}
            entry["x_sha256"] = _save(directory / f"{name}.x.npy", x)
            entry["y_sha256"] = _save(directory / f"{name}.y.npy", y)
            _write_json(directory / f"{name}.json", {**entry, "key": key})
            written += 1
        if dim is not None and entry["dim"] != dim:
            raise ShardError(f"{directory / name}.x.npy: d = {entry['dim']}, other shards {dim}")
        dim = entry["dim"]
        shards.append(entry)
    return {"num_rows": num_rows, "start": start, "stop": stop, "shards": shards}, dim, written


def write_store(
    directory: str | os.PathLike,
    key: str,
    description: Mapping,
    splits: Mapping[str, tuple[int, Callable]],
    *,
    shard_rows: int,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, FeatureShards]:
    """Extracts each split into shards of ``shard_rows`` rows, resuming, then writes the manifest.

    ``splits`` maps a split name to ``(num_rows, produce)``, where ``produce(a, b)`` returns the
    features [b - a, d] and labels [b - a] of rows ``[a, b)`` (only this process's range is
    asked for). Returns a reader per split; the shards it covers were all hashed here.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not (isinstance(shard_rows, int) and shard_rows >= 1):
        raise ValueError(f"shard_rows must be an int >= 1, got {shard_rows!r}")
    manifest = {
        "format": FORMAT,
        "key": key,
        "description": json.loads(json.dumps(description, default=str)),
        "process_index": process_index,
        "process_count": process_count,
        "dtype": "float32",
        "splits": {},
    }
    dims, written = set(), 0
    for split, (num_rows, produce) in splits.items():
        entry, dim, n = write_split(
            directory,
            split,
            int(num_rows),
            produce,
            key=key,
            shard_rows=shard_rows,
            process_index=process_index,
            count=process_count,
        )
        manifest["splits"][split] = entry
        dims |= {dim} - {None}
        written += n
    if len(dims) > 1:
        raise ShardError(f"{directory}: splits have different feature dims {sorted(dims)}")
    manifest["dim"] = dims.pop() if dims else None
    path = directory / f"manifest-p{process_index:05d}.json"
    if written or not path.exists() or json.loads(path.read_text()) != manifest:
        _write_json(path, manifest)
    log.info("feature shards %s: %d written, the rest kept", directory, written)
    return {s: FeatureShards(directory, s, manifest, verified=True) for s in splits}


def open_split(directory: str | os.PathLike, split: str, process_index: int = 0) -> FeatureShards:
    """The reader of ``split`` written by process ``process_index`` (checksums checked on read)."""
    path = pathlib.Path(directory) / f"manifest-p{process_index:05d}.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: no readable feature manifest ({e.__class__.__name__})") from None
    if manifest.get("format") != FORMAT or split not in manifest.get("splits", {}):
        raise ShardError(f"{path}: not a format-{FORMAT} manifest with split {split!r}")
    return FeatureShards(path.parent, split, manifest)


def _parse_npy(raw: bytes, path) -> np.ndarray:
    buf = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buf)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(buf)
    except ValueError as e:
        raise ShardError(f"{path}: not a .npy file ({e})") from None
    if fortran:
        raise ShardError(f"{path}: Fortran-ordered array")
    return np.frombuffer(raw, dtype, count=int(np.prod(shape)), offset=buf.tell()).reshape(shape)


class FeatureShards:
    """One split's features of one host, read shard by shard or gathered by row index.

    Array-like for the trainer's batch loader: ``shape`` (this host's rows, d), ``dtype``,
    ``len``, ``take(indices, axis=0)`` (what ``np.take`` calls) and indexing, which gather only
    the requested rows from memory-mapped shards. ``np.asarray(reader)`` loads every row.
    """

    def __init__(self, directory, split: str, manifest: Mapping, verified: bool = False):
        self.directory = pathlib.Path(directory)
        self.split = split
        entry = manifest["splits"][split]
        self.shards = list(entry["shards"])
        self.num_rows = int(entry["num_rows"])  # of the split, over every host
        self.start = int(entry["start"])
        self.dim = int(manifest["dim"] or 0)
        self.process_index = int(manifest["process_index"])
        self.process_count = int(manifest["process_count"])
        sizes = [int(s["rows"]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._verified = set(range(len(self.shards))) if verified else set()
        self._maps: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._labels = None

    dtype = np.dtype(np.float32)
    ndim = 2

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), self.dim

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def path(self, i: int, part: str = "x") -> pathlib.Path:
        return self.directory / f"{self.shards[i]['name']}.{part}.npy"

    def _read(self, i: int, part: str) -> np.ndarray:
        """Shard i's x or y, read whole and checked against its shape and its sha256 (x: unless
        this reader already hashed it)."""
        path = self.path(i, part)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ShardError(f"{path}: unreadable feature shard ({e.strerror})") from None
        if part == "y" or i not in self._verified:
            if hashlib.sha256(raw).hexdigest() != self.shards[i][f"{part}_sha256"]:
                raise ShardError(f"{path}: sha256 does not match the manifest (corrupted shard)")
        a = _parse_npy(raw, path)
        rows = int(self.shards[i]["rows"])
        if a.shape != ((rows, self.dim) if part == "x" else (rows,)):
            raise ShardError(f"{path}: shape {a.shape}, manifest says {rows} rows of d={self.dim}")
        return a

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(x [rows, d] float32, y [rows] int32)`` of every shard in order, each read once."""
        for i in range(len(self.shards)):
            yield self._read(i, "x"), self._read(i, "y")
            self._verified.add(i)

    @property
    def labels(self) -> np.ndarray:
        """This host's labels [rows] int32 (small: read and kept)."""
        if self._labels is None:
            parts = [self._read(i, "y") for i in range(len(self.shards))]
            self._labels = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return self._labels

    def _map(self, i: int) -> np.ndarray:
        with self._lock:
            if i not in self._maps:
                path = self.path(i)
                if i not in self._verified:
                    if sha256_file(path) != self.shards[i]["x_sha256"]:
                        raise ShardError(f"{path}: sha256 does not match the manifest")
                    self._verified.add(i)
                self._maps[i] = np.load(path, mmap_mode="r")
            return self._maps[i]

    def take(self, indices, axis=0, out=None, mode="raise") -> np.ndarray:
        """Rows ``indices`` (this host's row numbers) [len, d]: only those rows are read."""
        if axis != 0 or out is not None:
            raise ValueError("FeatureShards.take supports axis=0 and out=None only")
        idx = np.asarray(indices, np.int64)
        flat = idx.reshape(-1)
        n = len(self)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"{self.directory}/{self.split}: row index out of range [0, {n})")
        flat = np.where(flat < 0, flat + n, flat)
        result = np.empty((flat.size, self.dim), np.float32)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        for i in np.unique(shard):
            sel = shard == i
            result[sel] = self._map(int(i))[flat[sel] - self.offsets[i]]
        return result.reshape(*idx.shape, self.dim)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        if np.isscalar(index):
            return self.take(np.asarray([index]))[0]
        return self.take(index)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        parts = [x for x, _ in self.iter_shards()]
        a = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"FeatureShards({self.directory}, {self.split!r}, rows={len(self)}, d={self.dim})"
