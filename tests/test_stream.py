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
    shm_pool,
    stream_eval_batches,
    transforms,
    write_array_record,
)
from dpft.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from dpft.data.sources import decode_record
from dpft.data.stream_batches import _StepBatches
from dpft.paths import DataError
from dpft.privacy.sampling import PoissonSampler

N, CLASSES, SIZE = 40, 5, 16


def jpeg(rng, h, w, value=None, **kw):
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else value
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", **{"quality": 90, **kw})
    return out.getvalue()


def smooth(rng, h, w):
    """A photo-like image (bilinear upsampling of a coarse random grid)."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Train and eval ArrayRecord files of JPEGs whose sides vary in [20, 80]."""
    d = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    for name, n in (("train", N), ("eval", 13)):
        examples = [(jpeg(rng, *rng.integers(20, 81, 2)), i % CLASSES) for i in range(n)]
        write_array_record(d / f"{name}.array_record", examples)
    return str(d / "train.array_record"), str(d / "eval.array_record")


def train_split(files, workers=0, augmult=1, output="uint8"):
    transform = ImageTransform("imagenet", SIZE, train=True)
    source = ArrayRecordSource(files[0])
    return StreamSplit(source, transform, CLASSES, workers, augmult, output=output)


SAMPLER = PoissonSampler(N, 0.25, 3, 16)


def direct(split, step, seed=3):
    """The uint8 batch of ``step`` computed here from (seed, step): the reference."""
    indices, mask = SAMPLER.batch_at(step)
    image = np.zeros((len(mask), SIZE, SIZE, 3), np.uint8)
    label = np.zeros(len(mask), np.int32)
    for r in np.flatnonzero(mask):
        item = split.source[int(indices[r])]
        rng = np.random.default_rng([seed, step, int(indices[r]), 0])
        image[r], label[r] = split.transform.pixels(item["image"], rng), item["label"]
    return image, label, mask.astype(np.float32)


def test_streamed_batch_is_the_one_of_seed_and_step_in_workers(files):
    # 14 steps over 2 workers with 5 pool blocks each: blocks are reused (holding older batches)
    split = train_split(files, workers=2)
    with StreamLoader(split, SAMPLER, start_step=2, stop_step=16, prefetch=1) as loader:
        steps, padding = [], 0
        for step, batch, mask in loader:  # each batch dropped before the next: blocks recycle
            steps.append(step)
            image, label, want_mask = direct(split, step)
            np.testing.assert_array_equal(mask, want_mask)
            padding += int((mask == 0).sum())
            assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
            np.testing.assert_array_equal(batch["image"], image)  # padding rows are zeros
            np.testing.assert_array_equal(batch["label"], label)
    assert steps == list(range(2, 16)) and padding > 0


def test_pool_block_is_reused_with_stale_rows_zeroed(files):
    """One block, written for a step, read, dropped, then rewritten for a step with fewer
    sampled rows; while a batch is held, the next one falls back to a one-shot block."""
    split = train_split(files)
    import jax

    sizes = [int(SAMPLER.batch_at(t)[1].sum()) for t in range(10)]
    big, small = int(np.argmax(sizes)), int(np.argmin(sizes))
    assert sizes[big] > sizes[small]  # rows of the first are padding in the second
    pool = shm_pool.BlockPool(1, 1, split.batch_spec(16)["image"][0], np.uint8)
    batches = _StepBatches(split, SAMPLER, 3, 0, (0, 16), pool.spec)
    shm_pool.set_worker(0)  # this process plays worker 0
    try:
        first = batches(big)
        assert isinstance(first["image"], str)  # the block's name
        held = pool.view(first["image"])
        np.testing.assert_array_equal(held, direct(split, big)[0])
        one_shot = batches(small)["image"]  # the only block is in use: a grain block instead
        assert not isinstance(one_shot, str)
        one_shot.unlink_on_del()
        del held  # the block is FREE again
        second = batches(small)
        assert second["image"] == first["image"]
        image, _, mask = direct(split, small)
        held = pool.view(second["image"])  # (each block hand-out is viewed once)
        np.testing.assert_array_equal(held, image)
        np.testing.assert_array_equal(np.frombuffer(second["mask"], np.float32), mask)
        # a device array of the batch keeps its values while the next batches are written
        # (JAX on CPU aliases the block's memory: it stays BUSY until that array is deleted)
        on_device = jax.device_put(held)
        del held
        for step in (big, small, big):
            third = batches(step)["image"]
            if not isinstance(third, str):
                third.unlink_on_del()
        np.testing.assert_array_equal(np.asarray(on_device), image)
        del on_device  # the block's last reader: FREE, before the pool is closed
    finally:
        shm_pool.set_worker(None)
        pool.close()


def test_device_normalisation_equals_host_normalisation(files):
    import jax

    from dpft.data import normalizing_apply
    from dpft.data.transforms import normalize_on_device

    uint8 = next(StreamLoader(train_split(files), SAMPLER, 1, 2))[1]["image"]
    host = next(StreamLoader(train_split(files, output="float32"), SAMPLER, 1, 2))
    _, batch, mask = host
    keep = mask > 0
    np.testing.assert_array_equal(batch["image"][keep], preprocess(uint8[keep], "imagenet"))
    device = np.asarray(jax.jit(lambda x: normalize_on_device(x, "imagenet"))(uint8))
    np.testing.assert_allclose(device[keep], batch["image"][keep], rtol=0, atol=1e-6)
    # 28x28 grayscale through the 32x32 RGB padding preset, and a model's view of the batch
    gray = np.random.default_rng(2).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    apply = jax.jit(normalizing_apply(lambda variables, x: x * variables, "cifar_pretrained"))
    got = np.asarray(apply(np.float32(2.0), gray))
    np.testing.assert_allclose(got, 2 * preprocess(gray, "cifar_pretrained"), atol=2e-6)


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


def test_chunks_are_the_batch_in_order(files):
    split = train_split(files)
    whole = list(StreamLoader(split, SAMPLER, 0, 3))
    with StreamLoader(split, SAMPLER, 0, 3, chunk_size=4) as loader:
        for (s, a, m), (t, chunks, n) in zip(whole, loader, strict=True):
            assert s == t
            np.testing.assert_array_equal(m, n)
            parts = list(chunks)
            assert [o for o, _ in parts] == [0, 4, 8, 12]
            for k in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([p[k] for _, p in parts]), a[k])
            np.testing.assert_array_equal(np.concatenate([p["mask"] for _, p in parts]), m)
    # the shapes train.microbatch_size = -1 compiles its candidates for
    for got, k in ((parts[0][1], "image"), (parts[0][1], "label")):
        assert split.batch_spec(4)[k] == (got[k].shape, got[k].dtype)
    with pytest.raises(ValueError, match="chunk_size must divide the 16 rows"):
        StreamLoader(split, SAMPLER, 0, 3, chunk_size=5)


def test_streamed_chunks_accumulate_like_the_in_memory_chunks():
    """The trainer's streamed host-chunked step (`_run_streamed_chunks`) makes the calls of
    `accumulate.run_chunked` on the same batch: same chunks, offsets, skipped padding chunks."""
    from dpft.train import accumulate
    from dpft.train.trainer import _run_streamed_chunks

    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (N, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, N).astype(np.int32)
    arrays = {"image": preprocess(images, "mnist"), "label": labels}
    transform = ImageTransform("mnist", 0, True)
    split = StreamSplit(ArraySource(images, labels), transform, 10, output="float32")
    sampler = PoissonSampler(N, 0.05, 3, 16)  # small batches: some chunks are padding only

    def recorder(calls):
        def accumulate_fn(acc, state, chunk, key, offset):
            calls.append((int(offset), {k: np.array(v) for k, v in chunk.items()}))
            return acc + float((chunk["image"].sum((1, 2, 3)) * chunk["mask"]).sum())

        return accumulate.AccumulatingStep(
            lambda state: 0.0, accumulate_fn, lambda state, acc: (state, {"sum": acc})
        )

    skipped = 0
    with StreamLoader(split, sampler, 0, 4, chunk_size=4) as loader:
        for step, chunks, mask in loader:
            indices, want_mask = sampler.batch_at(step)
            np.testing.assert_array_equal(mask, want_mask)
            mem, streamed = [], []
            _, want = accumulate.run_chunked(recorder(mem), "s", arrays, indices, want_mask, 4, 0)
            _, got = _run_streamed_chunks(recorder(streamed), "s", chunks, 0)
            assert got == want and len(streamed) == len(mem)
            skipped += 4 - len(mem)
            for (o, a), (p, b) in zip(mem, streamed, strict=True):
                assert o == p
                np.testing.assert_array_equal(a["mask"], b["mask"])
                keep = b["mask"] > 0  # padding rows: gathered in memory, zeros when streamed
                for k in ("image", "label"):
                    np.testing.assert_array_equal(a[k][keep], b[k][keep])
                assert not b["image"][~keep].any()
    assert skipped > 0  # padding-only chunks were left out by both


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


def test_eval_transform_shape_normalisation_and_coverage(files):
    flat = np.full((30, 50, 3), (200, 100, 50), np.uint8)
    t = ImageTransform("imagenet", 24)
    x = t(jpeg(None, 30, 50, flat))
    assert x.shape == (24, 24, 3) and x.dtype == np.float32
    want = (np.array([200, 100, 50]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.mean((0, 1)), want, atol=0.05)  # JPEG is lossy
    source = ArrayRecordSource(files[1])
    split = StreamSplit(source, ImageTransform("imagenet", SIZE), CLASSES, num_workers=1)
    batches = list(stream_eval_batches(split, 5))
    assert [m.sum() for _, m in batches] == [5, 5, 3]
    assert all(b["image"].shape == (5, SIZE, SIZE, 3) for b, _ in batches)
    assert not batches[-1][0]["image"][3:].any()  # padding rows are zeros
    for i in range(13):
        b, _ = batches[i // 5]
        np.testing.assert_array_equal(b["image"][i % 5], split.transform.pixels(source[i]["image"]))
        assert b["label"][i % 5] == i % CLASSES


def test_reduced_decode_follows_the_full_decode():
    """A box >= 4x the output is decoded at 1/4 scale: close to the full-size decode."""
    rng = np.random.default_rng(5)
    data = jpeg(None, 480, 640, smooth(rng, 480, 640), quality=95)
    t = ImageTransform("imagenet", 64)  # centre box of side 420: reduction 4
    box = transforms.centre_box(640, 480, t.crop_fraction)
    assert transforms._reduction(box, 64) == 4
    full = transforms.decode_pixels(data, 3)[box[1] : box[3], box[0] : box[2]]
    ref = np.asarray(Image.fromarray(full).resize((64, 64), Image.Resampling.BOX), np.float32)
    got = t.pixels(data).astype(np.float32)
    assert got.shape == (64, 64, 3)
    assert np.abs(got - ref).mean() < 2.0  # in 0..255 levels


def test_jpeg_header_and_channels():
    rng = np.random.default_rng(4)
    rgb = smooth(rng, 37, 51)
    for mode in ("L", "RGB", "CMYK"):
        for progressive in (False, True):
            out = io.BytesIO()
            Image.fromarray(rgb).convert(mode).save(out, "JPEG", progressive=progressive)
            data = out.getvalue()
            assert transforms.image_info(data) == (51, 37, 1 if mode == "L" else 3, True)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    assert transforms.image_info(png.getvalue()) == (51, 37, 3, False)
    # a grayscale JPEG among RGB ones: pinned to example 0's three channels
    gray = io.BytesIO()
    Image.fromarray(rgb).convert("L").save(gray, "JPEG")
    images = [jpeg(None, 37, 51, rgb), gray.getvalue()]

    class Listed:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"image": images[i], "label": i}

    split = StreamSplit(Listed(), ImageTransform("imagenet", SIZE), CLASSES)
    (batch, mask), *_ = stream_eval_batches(split, 2)
    assert batch["image"].shape == (2, SIZE, SIZE, 3)
    g = batch["image"][1].astype(int)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()


def test_memory_source_at_size_zero_gives_the_in_memory_inputs():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (N, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, N)
    transform = ImageTransform("mnist", 0, True)
    split = StreamSplit(ArraySource(images, labels), transform, 10, output="float32")
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
    assert batch["image"].shape == (16, SIZE, SIZE, 1) and batch["image"].dtype == np.uint8
    assert batch["image"][mask > 0].any() and not batch["image"][mask == 0].any()


def test_bad_records_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="record 7: expected a dpft ArrayRecord record"):
        decode_record(b"not a record", "record 7")
    with pytest.raises(DataError, match="example 3: expected an encoded image"):
        ImageTransform("imagenet", 8)(b"\xff\xd8 broken", where="example 3")
    with pytest.raises(DataError, match="config.data.train_files: expected ArrayRecord files"):
        ArrayRecordSource(str(tmp_path / "none*.array_record"))


def grain_config(files, augmult=1):
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
    return c


def test_training_run_with_grain_pipeline(tmp_path, files):
    from dpft.train import train_and_evaluate

    c = grain_config(files, augmult=2)
    c.train.host_chunk_size = 4  # host-chunked steps: the batch streamed chunk by chunk
    summary = train_and_evaluate(c, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 2
    assert on_disk["num_train_examples"] == N
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0 and np.isfinite(on_disk["test_loss"])


def test_two_process_stream_equals_one_process(tmp_path):
    """2 processes x 2 CPU devices, each reading only its devices' rows, give the global
    batches of one process over 4 devices (and of the plain one-process stream)."""
    import jax
    from jax.sharding import Mesh

    from tests.dist_case import write_tiny_mnist
    from tests.mh_stream import stream_case

    write_tiny_mnist(tmp_path)
    from conftest import ROOT, run_two_processes

    out = tmp_path / "two.npz"
    script = ROOT / "tests" / "mh_stream.py"
    logs = run_two_processes(lambda i: [script, tmp_path, out])
    assert "process 0 rows (0, 32)" in logs[0] and "process 1 rows (32, 64)" in logs[1]
    two = dict(np.load(out))
    one = stream_case(Mesh(np.asarray(jax.devices()[:4]), ("data",)), str(tmp_path))
    for k in ("image", "label", "mask"):
        np.testing.assert_array_equal(two[k], one[k])
    assert two["mask"].sum() > 0 and two["image"].any()
