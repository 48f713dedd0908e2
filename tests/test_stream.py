"""The streaming input pipeline (dpft.data.stream): exact batches, resume, rows, views, eval."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from dpft.config import base_config
from dpft.data import (
    ArrayRecordSource,
    ArraySource,
    BatchLoader,
    ImageTransform,
    StreamLoader,
    StreamSplit,
    TfdsSource,
    preprocess,
    stream_eval_batches,
    write_array_record,
)
from dpft.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from dpft.data.sources import decode_record
from dpft.paths import DataError
from dpft.privacy.sampling import PoissonSampler

N, CLASSES, SIZE = 40, 5, 16


def jpeg(rng, h, w, value=None):
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else value
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Train and eval ArrayRecord files of JPEGs whose sides vary in [20, 80]."""
    d = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    for name, n in (("train", N), ("eval", 13)):
        examples = [(jpeg(rng, *rng.integers(20, 81, 2)), i % CLASSES) for i in range(n)]
        write_array_record(d / f"{name}.array_record", examples)
    return str(d / "train.array_record"), str(d / "eval.array_record")


def train_split(files, workers=0, augmult=1):
    transform = ImageTransform("imagenet", SIZE, train=True)
    return StreamSplit(ArrayRecordSource(files[0]), transform, CLASSES, workers, augmult)


SAMPLER = PoissonSampler(N, 0.25, 3, 16)


def direct(split, step, seed=3):
    """The batch of ``step`` computed here from (seed, step): the reference."""
    indices, mask = SAMPLER.batch_at(step)
    image = np.zeros((len(mask), SIZE, SIZE, 3), np.float32)
    label = np.zeros(len(mask), np.int32)
    for r in np.flatnonzero(mask):
        item = split.source[int(indices[r])]
        rng = np.random.default_rng([seed, step, int(indices[r]), 0])
        image[r], label[r] = split.transform(item["image"], rng), item["label"]
    return image, label, mask.astype(np.float32)


def test_streamed_batch_is_the_one_of_seed_and_step_in_workers(files):
    split = train_split(files, workers=2)
    with StreamLoader(split, SAMPLER, start_step=2, stop_step=6) as loader:
        got = list(loader)
    assert [s for s, _, _ in got] == [2, 3, 4, 5]
    for step, batch, mask in got:
        image, label, want_mask = direct(split, step)
        np.testing.assert_array_equal(mask, want_mask)
        assert 0 < mask.sum() < len(mask)  # real rows and padding rows
        np.testing.assert_array_equal(batch["image"], image)  # padding rows are zeros
        np.testing.assert_array_equal(batch["label"], label)
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32


def test_resume_and_rows_slice_equal_the_full_stream(files):
    split = train_split(files)
    full = list(StreamLoader(split, SAMPLER, start_step=0, stop_step=6))
    resumed = list(StreamLoader(split, SAMPLER, start_step=4, stop_step=6))
    part = list(StreamLoader(split, SAMPLER, start_step=0, stop_step=6, rows=(5, 11)))
    for (s, a, m), (t, b, n) in zip(full[4:], resumed, strict=True):
        assert s == t
        np.testing.assert_array_equal(m, n)
        np.testing.assert_array_equal(a["image"], b["image"])
    for (_, a, m), (_, b, n) in zip(full, part, strict=True):
        np.testing.assert_array_equal(m[5:11], n)
        np.testing.assert_array_equal(a["image"][5:11], b["image"])
        np.testing.assert_array_equal(a["label"][5:11], b["label"])


def test_views_are_distinct_and_deterministic(files):
    split = train_split(files, augmult=3)
    loader = StreamLoader(split, SAMPLER, start_step=1, stop_step=2)
    step, batch, mask = next(loader)
    image = batch["image"]
    assert image.shape == (16, 3, SIZE, SIZE, 3)
    again = loader.gather(step)[1]["image"]
    np.testing.assert_array_equal(image, again)
    for r in np.flatnonzero(mask):
        v = image[r].reshape(3, -1)
        assert not np.array_equal(v[0], v[1]) and not np.array_equal(v[1], v[2])
    single = direct(train_split(files), step)[0]
    np.testing.assert_array_equal(image[:, 0], single)  # view 0 is the K = 1 image


def test_eval_transform_shape_normalisation_and_coverage(tmp_path, files):
    flat = np.full((30, 50, 3), (200, 100, 50), np.uint8)
    t = ImageTransform("imagenet", 24)
    x = t(jpeg(None, 30, 50, flat))
    assert x.shape == (24, 24, 3)
    want = (np.array([200, 100, 50]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.mean((0, 1)), want, atol=0.05)  # JPEG is lossy
    source = ArrayRecordSource(files[1])
    split = StreamSplit(source, ImageTransform("imagenet", SIZE), CLASSES, num_workers=2)
    batches = list(stream_eval_batches(split, 5))
    assert [m.sum() for _, m in batches] == [5, 5, 3]
    assert all(b["image"].shape == (5, SIZE, SIZE, 3) for b, _ in batches)
    assert not batches[-1][0]["image"][3:].any()  # padding rows are zeros
    for i in range(13):
        b, _ = batches[i // 5]
        np.testing.assert_array_equal(b["image"][i % 5], split.transform(source[i]["image"]))
        assert b["label"][i % 5] == i % CLASSES


def test_memory_source_at_size_zero_gives_the_in_memory_inputs():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (N, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, N)
    split = StreamSplit(ArraySource(images, labels), ImageTransform("mnist", 0, True), 10)
    arrays = {"image": preprocess(images, "mnist"), "label": labels.astype(np.int32)}
    with BatchLoader(arrays, SAMPLER, start_step=0, stop_step=3, prefetch=0) as ref:
        for (s, a, m), (t, b, n) in zip(ref, StreamLoader(split, SAMPLER, 0, 3), strict=True):
            assert s == t
            np.testing.assert_array_equal(m, n)
            keep = m > 0
            np.testing.assert_array_equal(a["image"][keep], b["image"][keep])
            np.testing.assert_array_equal(a["label"][keep], b["label"][keep])


def test_tfds_mock_data_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=N):
        source = TfdsSource("mnist", "train")
        assert len(source) == N and source.num_classes == 10
        split = StreamSplit(source, ImageTransform("mnist", SIZE, train=True), 10)
        step, batch, mask = next(StreamLoader(split, SAMPLER, 0, 1))
    assert batch["image"].shape == (16, SIZE, SIZE, 1)
    assert np.isfinite(batch["image"]).all() and not batch["image"][mask == 0].any()


def test_bad_records_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="record 7: expected a dpft ArrayRecord record"):
        decode_record(b"not a record", "record 7")
    with pytest.raises(DataError, match="example 3: expected an encoded image"):
        ImageTransform("imagenet", 8)(b"\xff\xd8 broken", where="example 3")
    with pytest.raises(DataError, match="config.data.train_files: expected ArrayRecord files"):
        ArrayRecordSource(str(tmp_path / "none*.array_record"))


@pytest.mark.parametrize("augmult", [2])  # K = 2 views through the pipeline and the loss
def test_training_run_with_grain_pipeline(tmp_path, files, augmult):
    from dpft.train import train_and_evaluate

    c = base_config()
    c.data.augmult = augmult  # K > 1: the pipeline's views, averaged by the loss
    c.name, c.tensorboard, c.seed = "stream", False, 0
    c.data.pipeline, c.data.image_size, c.data.num_workers = "grain", SIZE, 0
    c.data.train_files, c.data.eval_files, c.data.num_classes = *files, CLASSES
    c.data.preprocessing = "imagenet"
    c.model.name = "sample_convnet"
    c.dp.noise_multiplier, c.dp.delta = 1.0, 1e-3
    c.train.batch_size, c.train.steps, c.train.microbatch_size = 8, 2, 0
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 2
    c.eval_batch_size = 8
    summary = train_and_evaluate(c, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 2
    assert on_disk["num_train_examples"] == N
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0 and np.isfinite(on_disk["test_loss"])
