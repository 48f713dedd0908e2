"""The TPU-pod ImageNet config: its ResNet's shapes, and its :smoke variant end to end on CPU."""

import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft import models

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "stem", "features"),
    [("resnet18", "imagenet", 512), ("resnet50", "imagenet", 2048), ("resnet18", "cifar", 512)],
)
def test_imagenet_resnet_shapes(name, stem, features):
    model = models.get_model(name, 7, stem=stem, groups=8)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 7)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.features), variables, x)
    assert feats.shape == (2, features)
    params = variables["params"]
    assert params["linear"]["kernel"].shape == (features, 7)
    assert ("downsample_conv" in params["layer2_0"]) and "downsample_conv" not in params["layer2_1"]
    if name == "resnet18":  # torchvision's resnet18 with a 7-class head: 11,180,103 params
        n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
        assert n == 11_180_103 if stem == "imagenet" else n < 11_180_103


def test_imagenet_resnet_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        models.ImageNetResNet(depth=19)
    with pytest.raises(ValueError, match="stem"):
        models.ImageNetResNet(stem="tiny")
    with pytest.raises(ValueError, match="groups"):
        models.ImageNetResNet(groups=48)


def _config(arg):
    spec = importlib.util.spec_from_file_location("imagenet_pod", ROOT / "configs/imagenet_pod.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_pod_config_sizes():
    c = _config("")
    assert c.data.name == "imagenet_resized/64x64" and c.parallel.data == 0
    assert c.train.batch_size % 16 == 0  # 16 devices on a v4-32
    assert c.model.name == "resnet18" and c.model.norm == "group_norm"


@pytest.mark.skipif(
    not os.environ.get("DPFT_SLOW_TESTS"),
    reason="about 40 s of CPU (TFDS import, accounting, compile): set DPFT_SLOW_TESTS=1",
)
def test_smoke_config_runs_on_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from dpft.train import train_and_evaluate

    c = _config("smoke")
    c.data.tfds_data_dir = str(tmp_path / "tfds")
    c.tensorboard = False
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = train_and_evaluate(c, tmp_path / "work")
    assert summary["steps"] == 2 and 0 < summary["epsilon"] < float("inf")
    assert (tmp_path / "work" / "summary.json").exists()
