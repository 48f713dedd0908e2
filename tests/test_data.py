"""dpft.data: IDX reading, dataset loading (local and TFDS mock), preprocessing, batch loading."""

from __future__ import annotations

import gzip
import pathlib
import threading
import types

import numpy as np
import pytest

from dpft import data, paths
from dpft.data import datasets as datasets_mod
from dpft.paths import DataError
from dpft.privacy.sampling import PoissonSampler, ShuffleSampler

GOLDEN = pathlib.Path("pretrained/resnet-cifar10/golden_resnet20.npz")


def _real_data_dir() -> pathlib.Path:
    try:
        d = paths.data_dir()
    except DataError as e:
        pytest.skip(f"no data dir ({e})")
    if not (d / "mnist").is_dir() or not (d / "fashion-mnist").is_dir():
        pytest.skip(f"data dir {d} has no mnist/ and fashion-mnist/")
    return d


@pytest.fixture(scope="module")
def real() -> dict:
    d = _real_data_dir()
    return {
        (name, split): data.load(name, split, data_dir=d)
        for name in ("mnist", "fashion_mnist")
        for split in ("train", "test")
    }


def _assert_one_line_error(excinfo, path: pathlib.Path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_real_datasets(real, name, split, n):
    ds = real[(name, split)]
    assert ds.name == name and ds.num_classes == 10 and len(ds) == n
    assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int32
    assert set(np.unique(ds.labels).tolist()) == set(range(10))
    assert ds.images.max() == 255 and ds.images.min() == 0


def test_real_fashion_mnist_aliases_and_stats(real):
    d = _real_data_dir()
    ref = real[("fashion_mnist", "test")]
    for alias in ("fmnist", "fashion-mnist", "Fashion_MNIST"):
        ds = data.load(alias, "test", data_dir=d)
        assert ds.name == "fashion_mnist"
        np.testing.assert_array_equal(ds.labels, ref.labels)
    # Fashion-MNIST is balanced: 6000 train / 1000 test per class.
    assert np.bincount(ref.labels).tolist() == [1000] * 10
    mean, std = data.channel_stats(real[("fashion_mnist", "train")].images)
    np.testing.assert_allclose([mean[0], std[0]], [0.2860, 0.3530], atol=1e-4)


# ----------------------------------------------------------------------------- IDX files


def test_idx_round_trip(tmp_path):
    arrays = {
        "a.gz": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        "b": np.array([-3, 7, 1 << 20], np.int32),
        "c.gz": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    }
    for name, a in arrays.items():
        data.write_idx(tmp_path / name, a)
        b = data.read_idx(tmp_path / name)
        assert b.dtype == a.dtype and b.flags.writeable
        np.testing.assert_array_equal(b, a)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "b").read_bytes()[:4] == bytes([0, 0, 0x0C, 1])


def _idx_bytes(magic: bytes, dims: tuple[int, ...], payload: bytes) -> bytes:
    return magic + np.asarray(dims, ">u4").tobytes() + payload


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "missing data file"),
        ("garbage_gz", "expected a gzip file"),
        ("garbage_plain", "expected an IDX magic"),
        ("truncated_gzip", "expected a complete gzip stream"),
        ("bad_crc", "expected a complete gzip stream"),
        ("bad_magic", "expected an IDX magic"),
        ("wrong_ndim", "expected an IDX file with 3 dimensions"),
        ("short_payload", "expected 1568 payload bytes, found only 1567"),
        ("long_payload", "found trailing bytes"),
        ("short_header", "truncated IDX header"),
    ],
)
def test_idx_errors_are_one_line_naming_the_file(tmp_path, case, expected):
    good = _idx_bytes(b"\x00\x00\x08\x03", (2, 28, 28), bytes(2 * 28 * 28))
    path = tmp_path / f"{case}-images-idx3-ubyte.gz"
    if case == "garbage_gz":
        path.write_bytes(b"this is not a gzip file at all" * 10)
    elif case == "garbage_plain":
        path = tmp_path / "garbage-images-idx3-ubyte"
        path.write_bytes(b"<html>404 not found</html>")
    elif case == "truncated_gzip":
        path.write_bytes(gzip.compress(good)[:-20])
    elif case == "bad_crc":
        z = bytearray(gzip.compress(good))
        z[-8] ^= 0xFF
        path.write_bytes(bytes(z))
    elif case == "bad_magic":
        path.write_bytes(gzip.compress(b"\x12\x34" + good[2:]))
    elif case == "wrong_ndim":
        path.write_bytes(gzip.compress(_idx_bytes(b"\x00\x00\x08\x01", (4,), bytes(4))))
    elif case == "short_payload":
        path.write_bytes(gzip.compress(good[:-1]))
    elif case == "long_payload":
        path.write_bytes(gzip.compress(good + b"\x00"))
    elif case == "short_header":
        path.write_bytes(gzip.compress(good[:9]))
    with pytest.raises(DataError) as excinfo:
        data.read_idx(path, expect_ndim=3)
    msg = _assert_one_line_error(excinfo, path)
    assert expected in msg
    if case == "missing":
        assert "DPFT_DATA_DIR" in msg and "config.data.data_dir" in msg


# ----------------------------------------------------------------------------- local datasets


def _fake_data_dir(root: pathlib.Path, labels: np.ndarray, n_images: int | None = None):
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels) if n_images is None else n_images
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return images, folder


def test_local_dataset_from_given_dir(tmp_path):
    labels = np.array([0, 9, 3, 3, 1])
    images, _ = _fake_data_dir(tmp_path, labels)
    ds = data.load("fmnist", "train", data_dir=tmp_path)
    assert ds.images.shape == (5, 28, 28, 1) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    with pytest.raises(ValueError, match="splits"):
        data.load("fashion_mnist", "validation", data_dir=tmp_path)


@pytest.mark.parametrize(
    "labels,n_images,expected",
    [
        (np.array([0, 10, 2]), None, "expected labels in [0, 10), found 10"),
        (np.array([0, 1, 2]), 4, "expected one label per image"),
        (np.zeros(0, np.uint8), None, "expected at least one example"),
    ],
)
def test_local_dataset_validation_errors(tmp_path, labels, n_images, expected):
    _, folder = _fake_data_dir(tmp_path, labels, n_images)
    with pytest.raises(DataError) as excinfo:
        data.load("fashion_mnist", "test", data_dir=tmp_path)
    msg = _assert_one_line_error(excinfo, folder / "t10k-labels-idx1-ubyte.gz")
    assert expected in msg


def test_local_dataset_missing_file(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(DataError) as excinfo:
        data.load("mnist", "train", data_dir=tmp_path)
    msg = _assert_one_line_error(excinfo, tmp_path / "mnist" / "train-images-idx3-ubyte.gz")
    assert "DPFT_DATA_DIR" in msg and "config.data.data_dir" in msg
    with pytest.raises(DataError, match="config.data.data_dir"):
        data.load("mnist", "train", data_dir=tmp_path / "nowhere")


def test_dataset_validate_label_range():
    ds = data.Dataset(np.zeros((3, 2, 2, 1), np.uint8), np.array([0, -1, 2], np.int32), 3, "x")
    with pytest.raises(DataError, match=r"src: expected labels in \[0, 3\), found values in"):
        ds.validate("src")


def test_split_validation_disjoint_and_seeded():
    n = 1000
    ds = data.Dataset(
        np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), np.arange(n, dtype=np.int32), n, "t"
    )
    train, val = data.split_validation(ds, 0.1, seed=4)
    assert len(val) == 100 and len(train) == 900
    assert set(train.labels).isdisjoint(val.labels)
    assert sorted(np.concatenate([train.labels, val.labels]).tolist()) == list(range(n))
    assert np.all(np.diff(val.labels) > 0)  # original order kept
    np.testing.assert_array_equal(train.images[:, 0, 0, 0], train.labels.astype(np.uint8))
    again, val2 = data.split_validation(ds, 0.1, seed=4)
    np.testing.assert_array_equal(val.labels, val2.labels)
    _, other = data.split_validation(ds, 0.1, seed=5)
    assert not np.array_equal(val.labels, other.labels)
    with pytest.raises(ValueError, match="validation_fraction"):
        data.split_validation(ds, 1.0, seed=0)


# ----------------------------------------------------------------------------- TFDS


def test_tfds_path_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # USE_CODE builds the dataset info from the builder class: no metadata files, no network, no
    # TensorFlow (tfds.data_source is served by a mocked ArrayRecord source of random examples).
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load("cifar10", "train", tfds_data_dir=tmp_path)
        gray = data.load("kmnist", "test", tfds_data_dir=tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (6,) and ds.labels.dtype == np.int32
    assert ds.labels.min() >= 0 and ds.labels.max() < 10
    assert gray.images.shape == (6, 28, 28, 1)
    x = data.preprocess(ds.images, data.default_preprocessing("cifar10", "wrn16_4"))
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.float32


def test_tfds_fallback_to_load_and_errors(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    info = types.SimpleNamespace(
        features={"image": None, "label": types.SimpleNamespace(num_classes=3)}
    )
    calls = []

    def fake_load(name, split, data_dir, batch_size, with_info):
        calls.append((name, split, data_dir, batch_size))
        return {"image": images, "label": np.array([0, 2, 1, 2])}, info

    monkeypatch.delattr(tfds, "data_source")
    monkeypatch.setattr(tfds, "load", fake_load)
    monkeypatch.setattr(tfds, "as_numpy", lambda x: x)
    ds = data.load("toy", "train[:4]", tfds_data_dir="/tfds")
    assert calls == [("toy", "train[:4]", "/tfds", -1)]
    assert ds.images.shape == (4, 8, 8, 1) and ds.num_classes == 3
    monkeypatch.setattr(
        tfds, "load", lambda *a, **k: ({"image": images, "label": np.array([0, 3, 1, 2])}, info)
    )
    with pytest.raises(DataError, match=r"TFDS toy/train: expected labels in \[0, 3\)"):
        data.load("toy", "train")
    monkeypatch.setattr(tfds, "load", lambda *a, **k: (_ for _ in ()).throw(OSError("no\nnet")))
    with pytest.raises(DataError, match="tfds_data_dir") as excinfo:
        data.load("toy", "train")
    assert "\n" not in str(excinfo.value) and "OSError: no" in str(excinfo.value)


def test_tfds_unknown_dataset_is_one_line_error():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="no_such_dataset_xyz") as excinfo:
        datasets_mod.load("no_such_dataset_xyz", "train")
    assert "\n" not in str(excinfo.value)


# ----------------------------------------------------------------------------- preprocessing


def test_cifar_pretrained_matches_golden_inputs(real):
    golden_path = _real_data_dir() / GOLDEN
    if not golden_path.is_file():
        pytest.skip(f"{golden_path} absent")
    golden = np.load(golden_path)
    # Rows 0-15 are Fashion-MNIST test images; source_rows says which (0, 313, 626, ...).
    rows = golden["source_rows"][:16]
    assert np.all(rows >= 0) and np.all(golden["source_rows"][16:] == -1)
    test = real[("fashion_mnist", "test")]
    x = data.preprocess(test.images[rows], "cifar_pretrained")
    assert x.shape == (16, 32, 32, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x, golden["inputs_nhwc"][:16], rtol=0, atol=1e-5)


def test_presets_shapes_and_values():
    imgs = np.zeros((2, 28, 28, 1), np.uint8)
    imgs[:, 10, 10] = 255
    x = data.preprocess(imgs, "mnist")
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, 0, 0], -0.1307 / 0.3081, rtol=1e-6)
    np.testing.assert_allclose(x[0, 10, 10, 0], (1 - 0.1307) / 0.3081, rtol=1e-6)
    f = data.preprocess(imgs, "fashion_mnist")
    np.testing.assert_allclose(f[1, 10, 10, 0], (1 - 0.2860) / 0.3530, rtol=1e-6)
    c = data.preprocess(imgs, "cifar_pretrained")
    assert c.shape == (2, 32, 32, 3)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(c[0, 0, 0], -mean / std, rtol=1e-6)  # black padding
    np.testing.assert_allclose(c[0, 12, 12], (1 - mean) / std, rtol=1e-6)  # shifted by 2
    rgb = np.full((1, 32, 32, 3), 51, np.uint8)
    assert data.preprocess(rgb, "cifar_pretrained").shape == (1, 32, 32, 3)
    np.testing.assert_allclose(data.to_float(rgb), 0.2)
    assert data.pad_to_32_rgb(np.ones((1, 28, 28, 1), np.float32))[0, :, :, 0].sum() == 28 * 28
    np.testing.assert_allclose(data.preprocess(rgb, "unit"), 0.2)
    np.testing.assert_allclose(data.preprocess(rgb, "standard"), -0.6, rtol=1e-6)
    p = data.Preset.from_images(rgb)
    np.testing.assert_allclose(data.preprocess(rgb, p), 0.0, atol=1e-3)
    with pytest.raises(ValueError, match="config.data.preprocessing"):
        data.preprocess(imgs, "nope")
    with pytest.raises(ValueError, match="channels"):
        data.preprocess(imgs, "imagenet")


def test_default_preprocessing():
    for model in ("resnet20", "resnet32", "resnet44", "resnet56"):
        assert data.default_preprocessing("fashion_mnist", model) == "cifar_pretrained"
    assert data.default_preprocessing("mnist", "sample_convnet") == "mnist"
    assert data.default_preprocessing("fmnist", "tramer_boneh_cnn") == "fashion_mnist"
    assert data.default_preprocessing("cifar10", "wrn16_4") == "cifar10"
    assert data.default_preprocessing("colorectal_histology", "wrn16_4") == "standard"


# ----------------------------------------------------------------------------- batch loading


def _arrays(n: int = 50) -> dict:
    return {"x": np.arange(n, dtype=np.float32) * 10, "y": np.arange(n, dtype=np.int32)}


def _take(loader, k: int) -> list:
    out = []
    for item in loader:
        out.append(item)
        if len(out) == k:
            break
    return out


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (s1, b1, m1), (s2, b2, m2) in zip(a, b, strict=True):
        assert s1 == s2
        np.testing.assert_array_equal(m1, m2)
        for k in b1:
            np.testing.assert_array_equal(b1[k], b2[k])


def test_batch_loader_deterministic_and_resumable():
    arrays = _arrays()
    sampler = PoissonSampler(50, 0.2, seed=3)
    with data.BatchLoader(arrays, sampler, prefetch=2) as a, data.BatchLoader(arrays, sampler) as b:
        first, second = _take(a, 15), _take(b, 15)
    _assert_same(first, second)
    assert [s for s, _, _ in first] == list(range(15))
    with data.BatchLoader(arrays, sampler, start_step=5, prefetch=3) as c:
        _assert_same(_take(c, 10), first[5:])
    sync = data.BatchLoader(arrays, sampler, start_step=5, prefetch=0, stop_step=15)
    _assert_same(list(sync), first[5:])
    assert sampler.step == 0  # the loader never advances the sampler's own state
    for step, batch, mask in first:
        ib = sampler.batch_at(step)
        assert batch["x"].shape == (sampler.max_batch_size,) and mask.dtype == np.float32
        np.testing.assert_array_equal(mask, ib.mask.astype(np.float32))
        np.testing.assert_array_equal(batch["y"][mask == 1], ib.indices[ib.mask])
        assert np.all(batch["y"][mask == 0] == 0) and np.all(batch["x"][mask == 0] == 0)
    assert any(m.sum() < len(m) for _, _, m in first)  # padding rows occurred


def test_batch_loader_shuffle_sampler_and_checks():
    arrays = _arrays(20)
    with data.BatchLoader(arrays, ShuffleSampler(20, 4, seed=0), stop_step=5) as loader:
        ys = np.concatenate([b["y"] for _, b, m in loader])
    assert sorted(ys.tolist()) == list(range(20))
    with pytest.raises(ValueError, match="arrays hold 20"):
        data.BatchLoader(arrays, PoissonSampler(30, 0.1, seed=0))
    with pytest.raises(ValueError, match="leading dimension"):
        data.BatchLoader({"a": np.zeros(3), "b": np.zeros(4)}, ShuffleSampler(3, 1, seed=0))


class _FailingSampler:
    max_batch_size = 4

    def batch_at(self, step: int):
        if step == 3:
            raise ZeroDivisionError("boom at step 3")
        return np.arange(4, dtype=np.int64), np.ones(4, bool)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batch_loader_worker_exception_propagates(prefetch):
    loader = data.BatchLoader(_arrays(10), _FailingSampler(), prefetch=prefetch)
    steps = []
    with pytest.raises(ZeroDivisionError, match="boom at step 3"):
        for step, _, _ in loader:
            steps.append(step)
    assert steps == [0, 1, 2] and loader.closed
    with pytest.raises(StopIteration):
        next(loader)


def test_batch_loader_close_stops_thread():
    before = threading.active_count()
    loader = data.BatchLoader(_arrays(), PoissonSampler(50, 0.5, seed=1), prefetch=1)
    next(loader)
    loader.close()
    loader.close()  # idempotent
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(loader)


def test_eval_batches_cover_every_example_once():
    arrays = _arrays(23)
    batches = list(data.eval_batches(arrays, 5))
    assert len(batches) == 5
    assert all(b["x"].shape == (5,) and m.shape == (5,) for b, m in batches)
    seen = np.concatenate([b["y"][m == 1] for b, m in batches])
    np.testing.assert_array_equal(seen, np.arange(23))
    np.testing.assert_array_equal(batches[-1][1], [1, 1, 1, 0, 0])
    assert sum(int(m.sum()) for _, m in batches) == 23
    assert len(list(data.eval_batches(arrays, 23))) == 1
    with pytest.raises(ValueError, match="batch_size"):
        list(data.eval_batches(arrays, 0))
