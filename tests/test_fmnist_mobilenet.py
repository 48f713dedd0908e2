"""configs/fmnist_mobilenet.py: its variants, its `imagenet@SIZE` inputs (checked against the
reference inputs of the pretrained MobileNetV2) and its smoke run, end to end."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft import data, paths
from dpft.models import get_model, pretrained
from dpft.train.step import partition

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = "pretrained/imagenet/golden_mobilenet_v2.npz"


def shared_file(relative):
    for d in paths.search_dirs():
        if (d / relative).is_file():
            return d / relative
    pytest.skip(f"{relative} is not in the data directories")


def config(arg=""):
    spec = importlib.util.spec_from_file_location(
        "fmnist_mobilenet", ROOT / "configs/fmnist_mobilenet.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_variants():
    c = config()
    assert (c.finetune.mode, c.dp.epsilon, c.dp.delta) == ("head", 3.0, 1e-5)
    assert (c.model.name, c.model.pretrained) == ("mobilenet_v2", "mobilenet_v2")
    assert c.data.preprocessing == "imagenet@64"
    assert config("eps1,px96").dp.epsilon == 1.0
    assert config("eps1,px96").data.preprocessing == "imagenet@96"
    assert config("full").finetune.mode == "full"
    with pytest.raises(ValueError, match="unknown config argument 'px8'"):
        config("px8")

    # 'last' trains exactly the last block, the final 1x1 convolution and the head
    last = config("last")
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
    # chunked (any chunk size) = in one piece
    np.testing.assert_array_equal(data.preprocess(test.images[:8], "imagenet", 64, chunk=3), got)


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
    c = config("smoke")
    c.tensorboard = False
    summary = train_and_evaluate(c, tmp_path / "work")
    assert summary["steps"] == c.train.steps and summary["phases"] == {"head": c.train.steps}
    assert 0 < summary["epsilon"] <= c.dp.epsilon
    assert summary["noise_multiplier"] > 0
    assert 0 <= summary["test_accuracy"] <= 1
    saved = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert saved["epsilon"] == summary["epsilon"]
