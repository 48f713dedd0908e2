"""A pretrained ViT checkpoint in the trainer, and backbone features extracted from a stream.

The checkpoints are small random big_vision ``.npz`` files (`vit_checkpoints`: 8-pixel patches,
32 px images). Fashion-MNIST / MNIST through the ``cifar_pretrained`` preset give 32x32x3
inputs. Streamed extraction is compared with the in-memory extraction of the same images, and a
head trained on streamed cached features with the head trained on the streamed images.
"""

import numpy as np
import pytest
from conftest import latest_checkpoint, needs_data
from vit_checkpoints import canonical, write_big_vision

from dpft import data as dpdata
from dpft.config import base_config
from dpft.data.sources import ArraySource
from dpft.data.stream import StreamSplit
from dpft.data.transforms import ImageTransform
from dpft.models import pretrained
from dpft.paths import DataError
from dpft.train import build, feature_store, train_and_evaluate
from dpft.train.checkpoint import Checkpointer
from dpft.train.features import feature_shards
from dpft.train.step import flatten

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "vit.npz"
    return str(write_big_vision(canonical(0), path))


def vit_config(path, mode="full", **over):
    c = base_config()
    c.name = "vit"
    c.tensorboard = False
    c.data.name = "fashion_mnist"
    c.data.preprocessing = "cifar_pretrained"  # 32x32x3
    c.data.train_subset = 48
    c.data.eval_subset = 16
    c.model.name = "vit"
    c.model.pretrained = "vit"
    c.model.pretrained_path = path
    c.finetune.mode = mode
    c.finetune.head_init = "zero"
    c.finetune.feature_cache = False
    c.dp.noise_multiplier = 1.0
    c.dp.delta = 1e-3
    c.dp.accountant = "rdp"  # fast to evaluate for these tiny runs
    c.train.batch_size = 8
    c.train.steps = 2
    c.train.learning_rate = 0.5
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval_batch_size = 16
    for key, value in over.items():
        section, name = key.split("__")
        setattr(c[section], name, value)
    return c


@needs_data
def test_vit_trains_with_ghost_norms_head_phase_keeps_the_backbone(
    tmp_path, checkpoint, ghost_traces
):
    # lp_ft: step 1 trains the head only (backbone frozen), step 2 every parameter
    c = vit_config(checkpoint, "lp_ft", train__checkpoint_every=1)
    summary = train_and_evaluate(c, tmp_path / "run")
    assert summary["steps"] == 2 and summary["phases"] == {"lp": 1, "ft": 1}
    assert np.isfinite(summary["test_loss"]) and ghost_traces  # ghost norms were traced
    _, loaded = pretrained.load("vit", checkpoint)
    want = flatten(loaded)
    names = sorted(want)
    backbone = [k for k in names if "linear" not in k]
    ck = Checkpointer(tmp_path / "run")
    try:
        head_phase, meta = ck.load_arrays(1)
        full_phase, _ = ck.load_arrays(2)
    finally:
        ck.close()
    assert meta["phase"] == 0
    # head phase state: step, head bias and kernel, optimizer state, then the frozen backbone
    frozen = dict(zip(backbone, head_phase[-len(backbone) :], strict=True))
    for k in backbone:  # bit for bit the checkpoint's
        np.testing.assert_array_equal(frozen[k], want[k], err_msg=k)
    assert head_phase[1].shape == (10,) and head_phase[2].shape == (32, 10)
    assert np.abs(head_phase[2]).max() > 0  # the zero-initialised head moved
    # full phase state: step, then every parameter (sorted paths)
    got = dict(zip(names, full_phase[1 : 1 + len(names)], strict=True))
    assert got["params/linear/kernel"].shape == (32, 10)
    assert [k for k in backbone if not np.allclose(got[k], want[k])]  # the backbone moved


def test_vit_config_errors_are_one_line(tmp_path, checkpoint):
    x = np.zeros((32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="config.model.name='vit_b16' but .* holds a ViT"):
        build.build_model(vit_config(checkpoint, model__name="vit_b16"), 10, x)
    with pytest.raises(ValueError, match="expected config.model.name 'vit' or one of"):
        build.build_model(vit_config(checkpoint, model__name="resnet20"), 10, x)
    with pytest.raises(ValueError, match="head_init='keep' but the pretrained head has 5"):
        build.build_model(vit_config(checkpoint, finetune__head_init="keep"), 10, x)
    with pytest.raises(DataError, match="config.model.pretrained_path"):
        build.build_model(vit_config(""), 10, x)
    # other image sizes: the position embeddings are interpolated to the images' grid
    model, variables = build.build_model(vit_config(checkpoint), 10, np.zeros((48, 48, 3)))
    assert variables["params"]["pos_embedding"].shape == (1, 37, 32)
    assert np.all(variables["params"]["linear"]["kernel"] == 0)


def _mnist_split(n=40):
    ds = dpdata.load("mnist", "train")
    return ds.images[:n], ds.labels[:n].astype(np.int32)


@needs_data
def test_streamed_extraction_equals_in_memory(tmp_path, checkpoint):
    images, labels = _mnist_split()
    c = vit_config(checkpoint, "head", finetune__shard_rows=16)  # 3 shards, the last partial
    model, variables = build.build_model(c, 10, np.zeros((32, 32, 3), np.float32))
    full = flatten(variables)
    arrays = {"image": dpdata.preprocess(images, "cifar_pretrained"), "label": labels}
    memory = feature_shards(c, tmp_path / "memory", model, full, arrays, arrays)
    source = ArraySource(images, labels, "mnist train")
    split = StreamSplit(source, ImageTransform("cifar_pretrained", train=True), 10, 0)
    streamed = feature_shards(c, tmp_path / "stream", model, full, split, split)
    assert len(streamed["train"].shards) == 3
    for name in ("train", "eval"):
        np.testing.assert_array_equal(streamed[name].labels, labels)
        np.testing.assert_allclose(
            np.asarray(streamed[name]), np.asarray(memory[name]), rtol=1e-5, atol=1e-5
        )
    # an independent reference: the backbone on the preprocessed images in one call
    ref = model.apply(variables, arrays["image"], method=model.features)
    np.testing.assert_allclose(np.asarray(streamed["train"]), ref, rtol=1e-5, atol=1e-5)
    # resumable: a lost shard is recomputed, the others kept
    directory = streamed["train"].directory
    lost = directory / "train-p00000-00001.x.npy"
    kept = directory / "train-p00000-00000.x.npy"
    before = kept.stat().st_mtime_ns
    lost.unlink()
    again = feature_shards(c, tmp_path / "stream", model, full, split, split)
    assert lost.exists() and kept.stat().st_mtime_ns == before
    np.testing.assert_array_equal(np.asarray(again["train"]), np.asarray(streamed["train"]))
    # a checksummed manifest per host
    reread = feature_store.open_split(directory, "eval")
    np.testing.assert_array_equal(np.asarray(reread), np.asarray(streamed["eval"]))


@needs_data
def test_lp_ft_on_streamed_features_equals_lp_ft_on_streamed_images(tmp_path, checkpoint):
    # grain pipeline; step 1 trains the head on cached streamed features (or on the streamed
    # images through the frozen backbone), step 2 every parameter on the streamed images
    over = dict(data__name="mnist", data__pipeline="grain", data__num_workers=0)
    cached = vit_config(checkpoint, "lp_ft", finetune__feature_cache=True, **over)
    a_sum = train_and_evaluate(cached, tmp_path / "cached")
    direct = vit_config(checkpoint, "lp_ft", **over)  # image_size 0: no crop or flip
    b_sum = train_and_evaluate(direct, tmp_path / "direct")
    assert list((tmp_path / "cached" / "features").glob("features-*/manifest-p00000.json"))
    assert not (tmp_path / "direct" / "features").exists()
    a, meta = latest_checkpoint(tmp_path / "cached")
    b, _ = latest_checkpoint(tmp_path / "direct")
    assert meta["step"] == 2 and len(a) == len(b)
    for x, y in zip(a, b, strict=True):  # same keys, sampler and steps: the same model
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
    assert a_sum["epsilon"] == b_sum["epsilon"]
    assert abs(a_sum["test_accuracy"] - b_sum["test_accuracy"]) <= 1 / 16 + 1e-9
