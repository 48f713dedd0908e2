"""MobileNetV2: the ImageNet weights reproduce the reference outputs; ghost norms match vmap;
configs/fmnist_mobilenet.py: its variants, its `imagenet@SIZE` inputs (checked against the
reference inputs of the pretrained MobileNetV2) and its smoke run, end to end.

The golden file holds the features and logits of an independent PyTorch implementation of
torchvision's MobileNetV2 on the same weights, so a wrong tensor name, transpose, padding or
layer order changes the outputs. Tests that need the shared weights skip when they are absent.
The config's tests are in this file so that its smoke run finds the ops of the model's (eager)
initialisation compiled by `test_build_model_from_config` in the same process.
"""

import importlib.util
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ghost import compare, setup

from dpft import data, paths
from dpft.models import MobileNetV2, get_model, pretrained
from dpft.paths import DataError
from dpft.privacy import clipping as C
from dpft.train.build import build_model
from dpft.train.step import partition

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = "pretrained/imagenet/golden_mobilenet_v2.npz"
ROWS_224 = 2  # rows of the 224 px reference checked (the CPU forward is the slow part)


def shared_file(relative):
    """The file in a data directory that already exists, or skip (no download)."""
    for d in paths.search_dirs():
        if (d / relative).is_file():
            return d / relative
    pytest.skip(f"{relative} is not in the data directories")


def config_file(name, arg=""):
    """``get_config(arg)`` of configs/NAME.py."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def loaded():
    shared_file(pretrained.MOBILENET_FILE)
    return pretrained.load("mobilenet_v2")


def test_golden_features_and_logits(loaded):
    model, variables = loaded
    golden = np.load(shared_file(GOLDEN))
    fn = jax.jit(lambda v, x: (model.apply(v, x, method=model.features), model.apply(v, x)))
    for size, rows in ((64, None), (224, ROWS_224)):
        x = golden[f"inputs_nhwc_{size}"][:rows]
        for key, got in zip(("features", "logits"), fn(variables, jnp.asarray(x)), strict=True):
            want = golden[f"{key}_{size}"][:rows]
            got = np.asarray(got)
            assert got.shape == want.shape, (key, size)
            np.testing.assert_allclose(
                got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=f"{key}_{size}"
            )


def test_loaded_tree_and_frozen_bn(loaded):
    model, variables = loaded
    assert isinstance(model, MobileNetV2) and model.norm == "frozen_bn"
    assert model.num_classes == 1000
    params = variables["params"]
    assert params["linear"]["kernel"].shape == (1280, 1000)
    assert params["features_0_0"]["kernel"].shape == (3, 3, 3, 32)
    assert params["features_1"]["conv_0_0"]["kernel"].shape == (3, 3, 1, 32)  # depthwise
    assert params["features_17"]["conv_1_0"]["kernel"].shape == (3, 3, 1, 960)
    assert params["features_18_0"]["kernel"].shape == (1, 1, 320, 1280)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n == 3_504_872  # torchvision's mobilenet_v2 parameter count
    # folded BatchNorm: gamma 1, mean 0, var 1 - eps
    bn = variables["batch_stats"]["features_0_1"]
    np.testing.assert_allclose(np.asarray(bn["mean"]), 0.0)
    np.testing.assert_allclose(np.asarray(bn["var"]), 1 - 1e-5, rtol=1e-6)


def test_registry_shapes_and_small_inputs():
    model = get_model("mobilenet_v2", 7, conv="im2col")  # depthwise convs fall back to XLA
    x = jnp.zeros((2, 32, 32, 3))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert jax.eval_shape(model.apply, shapes, x).shape == (2, 7)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.features), shapes, x)
    assert feats.shape == (2, 1280)
    gn = get_model("mobilenet_v2", 7, norm="group_norm")
    gn_shapes = jax.eval_shape(gn.init, jax.random.PRNGKey(0), x)
    assert set(gn_shapes) == {"params"}  # GroupNorm: no batch statistics
    with pytest.raises(ValueError, match="norm"):
        MobileNetV2(norm="batch_norm")
    with pytest.raises(ValueError, match="groups"):
        MobileNetV2(norm="group_norm", groups=3)


def test_build_model_from_config(loaded):
    """``config.model.name = config.model.pretrained = 'mobilenet_v2'`` loads the weights."""
    c = config_file("imagenet_pod", "finetune")
    c.model.name = c.model.pretrained = "mobilenet_v2"
    c.model.pretrained_path = ""
    model, variables = build_model(c, 10, np.zeros((32, 32, 3), np.float32))
    assert isinstance(model, MobileNetV2) and model.num_classes == 10
    assert variables["params"]["linear"]["kernel"].shape == (1280, 10)
    assert not np.any(variables["params"]["linear"]["kernel"])  # finetune.head_init='zero'
    np.testing.assert_array_equal(
        variables["params"]["features_9"]["conv_1_0"]["kernel"],
        loaded[1]["params"]["features_9"]["conv_1_0"]["kernel"],
    )


# ------------------------------------------------------------- configs/fmnist_mobilenet.py


def fmnist_config(arg=""):
    return config_file("fmnist_mobilenet", arg)


def test_variants():
    c = fmnist_config()
    assert (c.finetune.mode, c.dp.epsilon, c.dp.delta) == ("head", 3.0, 1e-5)
    assert (c.model.name, c.model.pretrained) == ("mobilenet_v2", "mobilenet_v2")
    assert c.data.preprocessing == "imagenet@64"
    assert fmnist_config("eps1,px96").dp.epsilon == 1.0
    assert fmnist_config("eps1,px96").data.preprocessing == "imagenet@96"
    assert fmnist_config("full").finetune.mode == "full"
    with pytest.raises(ValueError, match="unknown config argument 'px8'"):
        fmnist_config("px8")

    # 'last' trains exactly the last block, the final 1x1 convolution and the head
    last = fmnist_config("last")
    assert last.finetune.mode == "partial"
    model = get_model("mobilenet_v2", 10)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    trainable, frozen = partition(shapes, last.finetune.trainable)
    modules = {k.split("/")[1] for k in trainable}
    assert modules == {"features_17", "features_18_0", "features_18_1", "linear"}
    assert not any(k.startswith("params/features_17/") for k in frozen)


def test_imagenet_at_64_px_is_the_reference_input():
    """The golden file's first 8 rows at 64 px: Fashion-MNIST test images 0-7, resized
    bilinearly by PyTorch, repeated to 3 channels, ImageNet-normalised."""
    with np.load(shared_file(GOLDEN)) as f:
        want = f["inputs_nhwc_64"][:8]
    test = data.load("fashion_mnist", "test")
    got = data.preprocess(test.images[:8], "imagenet@64")
    assert got.shape == (8, 64, 64, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    # chunked (any chunk size) = in one piece, to float32 rounding (XLA may vectorise the resize
    # differently for another batch shape)
    chunked = data.preprocess(test.images[:8], "imagenet", 64, chunk=3)
    np.testing.assert_allclose(chunked, got, rtol=1e-6, atol=1e-6)


def test_bad_preprocessing_names():
    images = np.zeros((2, 28, 28, 1), np.uint8)
    for bad in ("imagenet@", "imagenet@0", "imagenet@x", "nope@64"):
        with pytest.raises(ValueError, match="config.data.preprocessing.*NAME@SIZE"):
            data.preprocess(images, bad)
    with pytest.raises(ValueError, match="pads to 32x32"):
        data.preprocess(images, "cifar_pretrained@64")
    # one-statistic presets keep one channel
    assert data.preprocess(images, "fashion_mnist@40").shape == (2, 40, 40, 1)


def test_smoke_config_trains_within_its_budget(tmp_path):
    from dpft.train import train_and_evaluate

    shared_file(pretrained.MOBILENET_FILE)
    c = fmnist_config("smoke")
    c.tensorboard = False
    summary = train_and_evaluate(c, tmp_path / "work")
    assert summary["steps"] == c.train.steps and summary["phases"] == {"head": c.train.steps}
    assert 0 < summary["epsilon"] <= c.dp.epsilon
    assert summary["noise_multiplier"] > 0
    assert 0 <= summary["test_accuracy"] <= 1
    saved = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert saved["epsilon"] == summary["epsilon"]


# ------------------------------------------------------------------------------ the model


def test_corrupt_file_names_file_and_tensor(loaded, tmp_path):
    from safetensors.numpy import save_file

    tensors = pretrained.read_safetensors(pretrained.weights_path("mobilenet_v2"))
    missing = dict(tensors)
    del missing["features.5.conv.1.0.weight"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(DataError, match=r"missing\.safetensors.*features\.5\.conv\.1\.0\.weight"):
        pretrained.load("mobilenet_v2", tmp_path / "missing.safetensors")
    extra = {**tensors, "features.19.0.weight": np.zeros((1,), np.float32)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(DataError, match=r"extra\.safetensors.*features\.19\.0\.weight") as e:
        pretrained.load("mobilenet_v2", tmp_path / "extra.safetensors")
    assert "\n" not in str(e.value)


def test_ghost_norms_equal_vmap_norms():
    """The whole model (32- to 960-channel depthwise convolutions) on 32x32 inputs, every
    parameter trainable and a random head, so the backbone's per-example gradients are nonzero."""
    model = get_model("mobilenet_v2", 5)
    # eager init: its ops are compiled already (build_model's initialisation, above)
    per_example, params, batch = setup(model, (32, 32, 3), 2, 5, spread=False, eager_init=True)
    start = time.perf_counter()
    (out,) = compare(per_example, [C.FlatClip(1e-3)], params, batch, jnp.ones(2))
    assert int(out.num_clipped) == 2
    assert np.all(np.asarray(out.norms) > 1e-3)
    print(f"ghost vs vmap (compile + run): {time.perf_counter() - start:.1f} s")
