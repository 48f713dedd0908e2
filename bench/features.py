"""Out-of-core features: the single full-batch DP step on 1M x 2048 float32 rows in bounded memory.

Writes ``--rows`` synthetic rows of ``--dim`` float32 features (class means plus Gaussian noise,
``--classes`` labels) as shards of the feature store (`dpft.train.feature_store`, about
``--shard-mib`` MiB each) under ``--dir``, then runs `dpft.linear.dp_gd` with ``steps=1`` (the
single full-batch step, noise calibrated to epsilon 1) on the sharded reader: the clipped
gradient sum is accumulated shard by shard and noised once. Each phase runs in a fresh
subprocess, so its peak RSS (``resource.getrusage``) is its own; the step's phase includes
opening the reader and checking every shard's sha256 as it is read.

    python -m bench.features [--rows 1000000] [--dim 2048] [--dir /tmp/dpft-bench-features]

Prints one JSON line: rows, dim, shards, bytes on disk, write and step seconds and peak RSS in
MB of each phase. The shards are deleted afterwards unless ``--keep`` is given. If the disk
holds less than the shards need (plus 5%), the rows are reduced to fit and ``reduced_from``
says from how many.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

SEED = 0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(rows: int, dim: int, classes: int):
    """``produce(a, b)`` of rows [a, b): a deterministic function of (SEED, a)."""
    means = np.random.default_rng(SEED).normal(size=(classes, dim)).astype(np.float32)
    means *= 2.0 / np.linalg.norm(means, axis=1, keepdims=True)

    def produce(a, b):
        rng = np.random.default_rng([SEED, a])
        y = rng.integers(0, classes, b - a).astype(np.int32)
        x = rng.standard_normal((b - a, dim), dtype=np.float32)
        x *= np.float32(1 / np.sqrt(dim))
        x += means[y]
        return x, y

    return produce


def write(directory: pathlib.Path, rows: int, dim: int, classes: int, shard_mib: int) -> dict:
    from dpft.train import feature_store

    t0 = time.time()
    shard_rows = max(1, (shard_mib << 20) // (4 * dim))
    readers = feature_store.write_store(
        directory,
        "bench",
        {"bench": "synthetic", "rows": rows, "dim": dim, "classes": classes},
        {"train": (rows, synthetic(rows, dim, classes))},
        shard_rows=shard_rows,
    )
    size = sum(p.stat().st_size for p in directory.iterdir())
    return {
        "shards": len(readers["train"].shards),
        "shard_rows": shard_rows,
        "bytes": size,
        "write_seconds": round(time.time() - t0, 2),
        "write_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def step(directory: pathlib.Path, classes: int) -> dict:
    import jax

    from dpft import linear
    from dpft.train import feature_store

    rss0 = peak_rss_mb()
    t0 = time.time()
    reader = feature_store.open_split(directory, "train")
    params, info = linear.dp_gd(
        reader,
        None,
        classes,
        epsilon=1.0,
        delta=1.0 / (10 * reader.num_rows),
        clip_norm=1.0,
        steps=1,
        learning_rate=1.0,
        key=jax.random.key(SEED),
    )
    jax.block_until_ready(params)
    seconds = time.time() - t0
    return {
        "rows": reader.num_rows,
        "dim": reader.dim,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_imports_mb": round(rss0, 1),
        "epsilon": round(info["epsilon"], 4),
        "noise_multiplier": round(info["noise_multiplier"], 4),
        "weights_norm": float(np.linalg.norm(np.asarray(params.weights))),
    }


def _phase(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.features", *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--shard-mib", type=int, default=128)
    ap.add_argument("--dir", default="/tmp/dpft-bench-features")
    ap.add_argument("--keep", action="store_true", help="keep the shards")
    ap.add_argument("--phase", choices=("all", "write", "step"), default="all")
    a = ap.parse_args(argv)
    directory = pathlib.Path(a.dir)
    if a.phase == "write":
        print(json.dumps(write(directory, a.rows, a.dim, a.classes, a.shard_mib)))
        return
    if a.phase == "step":
        print(json.dumps(step(directory, a.classes)))
        return
    directory.mkdir(parents=True, exist_ok=True)
    rows, note = a.rows, {}
    free = shutil.disk_usage(directory).free
    if rows * a.dim * 4 * 1.05 > free:
        rows = int(free / 1.05 / (a.dim * 4 + 4)) // 1000 * 1000
        note = {"reduced_from": a.rows, "free_bytes": free}
    common = ["--dir", str(directory), "--classes", str(a.classes)]
    try:
        wrote = _phase(
            ["--phase", "write", "--rows", str(rows), "--dim", str(a.dim)]
            + common
            + ["--shard-mib", str(a.shard_mib)]
        )
        stepped = _phase(["--phase", "step"] + common)
    finally:
        if not a.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps({**stepped, **wrote, **note}))


if __name__ == "__main__":
    main()
