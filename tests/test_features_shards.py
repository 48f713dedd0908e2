"""The out-of-core feature store (dpft.train.feature_store) and the streamed releases of the
feature methods (dpft.privacy.streaming, dpft.linear.data): streamed = in-memory, resume,
checksums, per-host layout."""

import json
import math
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dpft import linear as L  # noqa: E402
from dpft.data import BatchLoader  # noqa: E402
from dpft.privacy import rows as R  # noqa: E402
from dpft.privacy import sampling  # noqa: E402
from dpft.privacy import streaming as S  # noqa: E402
from dpft.train import feature_store as FS  # noqa: E402

N, D, K = 301, 6, 3
KEY = "k0"


def dataset(n=N, d=D, k=K, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n).astype(np.int32)
    X = (2.0 * np.eye(k, d)[y] + rng.normal(size=(n, d))).astype(np.float32)
    return X, y


def producer(X, y, calls=None, fail_after=None):
    def produce(a, b):
        if calls is not None:
            calls.append((a, b))
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt("simulated crash")
        return X[a:b], y[a:b]

    return produce


def store(directory, X, y, shard_rows=64, **kw):
    calls = kw.pop("calls", None)
    fail_after = kw.pop("fail_after", None)
    splits = {"train": (len(X), producer(X, y, calls, fail_after))}
    return FS.write_store(directory, KEY, {"test": 1}, splits, shard_rows=shard_rows, **kw)


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if ".tmp" not in p.name}


# ------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------


def test_shards_round_trip_and_random_access(tmp_path):
    X, y = dataset()
    reader = store(tmp_path, X, y)["train"]
    assert reader.shape == (N, D) and reader.num_rows == N and len(reader.shards) == 5
    manifest = json.loads((tmp_path / "manifest-p00000.json").read_text())
    assert manifest["key"] == KEY and manifest["dim"] == D and manifest["dtype"] == "float32"
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [64] * 4 + [45]
    assert all(len(s["x_sha256"]) == 64 for s in manifest["splits"]["train"]["shards"])
    fresh = FS.open_split(tmp_path, "train")
    np.testing.assert_array_equal(np.asarray(fresh), X)
    np.testing.assert_array_equal(fresh.labels, y)
    got = list(fresh.iter_shards())
    np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), X)
    np.testing.assert_array_equal(np.concatenate([t for _, t in got]), y)
    idx = np.array([300, 0, 63, 64, 7, 7, 299])
    np.testing.assert_array_equal(np.take(fresh, idx, axis=0), X[idx])
    np.testing.assert_array_equal(fresh[5], X[5])
    np.testing.assert_array_equal(fresh[10:70:3], X[10:70:3])
    with pytest.raises(IndexError):
        fresh.take([N])


def test_batch_loader_gathers_the_same_batches_from_the_memory_mapped_reader(tmp_path):
    X, y = dataset()
    store(tmp_path, X, y)
    reader = FS.open_split(tmp_path, "train")
    sampler = sampling.PoissonSampler(N, 0.05, seed=3, max_batch_size=40)
    a = BatchLoader({"image": reader, "label": y}, sampler, prefetch=0, stop_step=4)
    b = BatchLoader({"image": X, "label": y}, sampler, prefetch=0, stop_step=4)
    for (s1, b1, m1), (s2, b2, m2) in zip(a, b, strict=True):
        assert s1 == s2
        np.testing.assert_array_equal(b1["image"], b2["image"])
        np.testing.assert_array_equal(m1, m2)
    assert reader._maps and all(isinstance(m, np.memmap) for m in reader._maps.values())


def test_resumed_extraction_equals_uninterrupted(tmp_path):
    X, y = dataset()
    store(tmp_path / "whole", X, y)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        store(tmp_path / "resumed", X, y, calls=calls, fail_after=2)
    assert not (tmp_path / "resumed" / "manifest-p00000.json").exists()  # written last
    # a crash mid-write: shard 2's features are partial and its sidecar was never written
    partial = tmp_path / "resumed" / "train-p00000-00002.x.npy"
    partial.write_bytes(b"\x93NUMPY garbage")
    calls.clear()
    reader = store(tmp_path / "resumed", X, y, calls=calls)["train"]
    assert calls == [(128, 192), (192, 256), (256, 301)]  # shards 0, 1 kept, 2.. recomputed
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    np.testing.assert_array_equal(np.asarray(reader), X)
    calls.clear()
    store(tmp_path / "resumed", X, y, calls=calls)  # complete: nothing recomputed
    assert calls == []


def test_a_corrupted_shard_is_detected_naming_the_file_and_recomputed_by_a_rerun(tmp_path):
    X, y = dataset()
    store(tmp_path, X, y)
    path = tmp_path / "train-p00000-00001.x.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in a feature
    path.write_bytes(bytes(raw))
    reader = FS.open_split(tmp_path, "train")
    with pytest.raises(FS.ShardError, match="train-p00000-00001.x.npy.*sha256") as e:
        list(reader.iter_shards())
    assert "\n" not in str(e.value)
    with pytest.raises(FS.ShardError, match="train-p00000-00001.x.npy"):
        reader.take([70])
    np.testing.assert_array_equal(reader.take([3]), X[[3]])  # an intact shard still reads
    calls = []
    store(tmp_path, X, y, calls=calls)
    assert calls == [(64, 128)]  # only the corrupted shard is recomputed
    np.testing.assert_array_equal(np.asarray(FS.open_split(tmp_path, "train")), X)


def test_missing_manifest_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(FS.ShardError, match="manifest-p00000.json") as e:
        FS.open_split(tmp_path, "train")
    assert "\n" not in str(e.value)


def test_each_host_writes_its_own_rows_and_manifest(tmp_path):
    X, y = dataset()
    readers = [store(tmp_path, X, y, process_index=p, process_count=2)["train"] for p in (0, 1)]
    assert [(r.start, len(r)) for r in readers] == [(0, 150), (150, 151)]
    assert {p.name for p in tmp_path.glob("manifest-*")} == {
        "manifest-p00000.json",
        "manifest-p00001.json",
    }
    assert all(
        n.startswith(f"train-p0000{p}-")
        for p in (0, 1)
        for n in [s["name"] for s in readers[p].shards]
    )
    # the sums of the two hosts' shards add up to the in-memory sum (what process_sum does)
    parts = [S.streamed_gram_sum(r.iter_shards(), D, 1.5) for r in readers]
    np.testing.assert_allclose(parts[0] + parts[1], R.gram_sum(X, 1.5), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Streamed releases = in-memory releases (same key, same noise)
# ------------------------------------------------------------------------------------------------


def test_streamed_sums_equal_in_memory_sums(tmp_path):
    X, y = dataset()
    reader = store(tmp_path, X, y)["train"]
    rng = np.random.default_rng(1)
    WB = rng.normal(size=(D + 1, K)).astype(np.float32)
    key = jax.random.key(5)
    Y = np.eye(K, dtype=np.float32)[y]
    Xa = R.augment(X)
    pairs = [
        (
            S.noisy_streamed_head_grad_sum(WB, reader.iter_shards(), 0.7, 2.0, key),
            R.noisy_head_grad_sum(WB, Xa, y, 0.7, 2.0, key),
        ),
        (
            S.noisy_streamed_gram_sum(reader.iter_shards(), D, 1.5, 2.0, key, append_one=True),
            R.noisy_gram_sum(X, 1.5, 2.0, key, append_one=True),
        ),
        (
            S.noisy_streamed_xty_sum(
                ((x, np.eye(K, dtype=np.float32)[t]) for x, t in reader.iter_shards()),
                D,
                K,
                1.5,
                2.0,
                key,
            ),
            R.noisy_xty_sum(X, Y, 1.5, 2.0, key),
        ),
        (
            S.noisy_streamed_curvature_sum(WB, reader.iter_shards(), 1.5, 2.0, key),
            R.noisy_curvature_sum(WB, X, 1.5, 2.0, key),
        ),
    ]
    for streamed, in_memory in pairs:
        assert streamed.shape == in_memory.shape
        np.testing.assert_allclose(streamed, in_memory, rtol=1e-5, atol=2e-4)
    # the sums without noise are not trivially equal to the noise
    assert np.abs(S.streamed_gram_sum(reader.iter_shards(), D, 1.5)).max() > 10
    assert S.process_sum(pairs[0][0]) is pairs[0][0]  # one process: the identity


METHODS = {
    "single_step_sgd": (L.dp_gd, dict(clip_norm=1.0, steps=1, learning_rate=2.0)),
    "single_step_adam": (L.dp_gd, dict(clip_norm=1.0, steps=1, learning_rate=0.1, update="adam")),
    "dp_gd": (L.dp_gd, dict(clip_norm=1.0, steps=3, learning_rate=1.0, weight_decay=1e-3)),
    "dp_least_squares": (L.dp_least_squares, dict(feature_clip=2.0, reg=5.0)),
    "dp_least_squares_pm1": (L.dp_least_squares, dict(feature_clip=2.0, reg=5.0, targets="pm1")),
    "dp_newton": (L.dp_newton, dict(feature_clip=2.0, steps=2, reg=1e-2)),
    "dp_newton_bohning": (
        L.dp_newton,
        dict(feature_clip=2.0, steps=2, reg=1e-2, hessian="bohning"),
    ),
    "dp_fc": (
        L.dp_fc,
        dict(
            feature_clip=2.0, clip_norm=1.0, steps=2, learning_rate=0.5, cov_fraction=0.3, reg=0.1
        ),
    ),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("epsilon", [4.0, math.inf])
def test_every_method_on_shards_equals_in_memory(method, epsilon, tmp_path):
    X, y = dataset()
    reader = store(tmp_path, X, y)["train"]
    fn, kw = METHODS[method]
    key = jax.random.key(11)
    a, info_a = fn(X, y, K, epsilon=epsilon, delta=1e-3, key=key, **kw)
    b, info_b = fn(reader, None, K, epsilon=epsilon, delta=1e-3, key=key, **kw)
    c, _ = fn(reader, y, K, epsilon=epsilon, delta=1e-3, key=key, **kw)  # labels passed in
    assert info_a["releases"] == info_b["releases"] and info_a["epsilon"] == info_b["epsilon"]
    for got in (b, c):
        for u, v in zip(a, got, strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(a.weights)).max() > 1e-3  # the head moved
    # a different key gives a different head when there is noise: the comparison can fail
    if epsilon < math.inf:
        d, _ = fn(reader, None, K, epsilon=epsilon, delta=1e-3, key=jax.random.key(12), **kw)
        assert np.abs(np.asarray(d.weights) - np.asarray(a.weights)).max() > 1e-3


def test_streamed_methods_check_every_shard(tmp_path):
    X, y = dataset()
    y_bad = y.copy()
    y_bad[200] = K  # a label out of range in shard 3
    reader = store(tmp_path, X, y_bad)["train"]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) \(shard 3 of"):
        L.dp_gd(
            reader,
            None,
            K,
            epsilon=1.0,
            delta=1e-3,
            key=jax.random.key(0),
            clip_norm=1.0,
            learning_rate=1.0,
        )
    with pytest.raises(ValueError, match="delta"):
        L.dp_least_squares(
            reader, y, K, epsilon=1.0, delta=0.1, key=jax.random.key(0), feature_clip=1.0, reg=1.0
        )
