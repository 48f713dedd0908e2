"""Torchvision-layout ResNet weights load into ImageNetResNet and compute torchvision's function.

No torchvision here: the state dict is generated with torchvision's tensor names and shapes, and
the reference is an independent NCHW implementation of torchvision's ResNet (v1.5) that reads
the state dict directly, so a wrong name, transpose or layer order changes the logits.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from dpft.models import pretrained
from dpft.models.imagenet_resnet import ImageNetResNet
from dpft.paths import DataError
from dpft.train.build import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
HIGHEST = jax.lax.Precision.HIGHEST
LAYOUT = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}  # bottleneck?, blocks per stage


def torchvision_state_dict(depth, classes, seed=0):
    """Random tensors under torchvision's names/shapes for resnet{depth} (OIHW convs)."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, cout, cin, k):
        std = np.sqrt(2.0 / (cin * k * k))
        sd[name + ".weight"] = (std * rng.standard_normal((cout, cin, k, k))).astype(np.float32)

    def bn(name, c):
        sd[name + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[name + ".bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[name + ".running_mean"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[name + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[name + ".num_batches_tracked"] = np.array(1000, np.int64)

    bottleneck, blocks = LAYOUT[depth]
    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for s, n in enumerate(blocks):
        c = 64 * 2**s
        cout = 4 * c if bottleneck else c
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            if bottleneck:
                conv(p + ".conv1", c, cin, 1)
                bn(p + ".bn1", c)
                conv(p + ".conv2", c, c, 3)
                bn(p + ".bn2", c)
                conv(p + ".conv3", cout, c, 1)
                bn(p + ".bn3", cout)
            else:
                conv(p + ".conv1", c, cin, 3)
                bn(p + ".bn1", c)
                conv(p + ".conv2", c, c, 3)
                bn(p + ".bn2", c)
            if i == 0 and (s > 0 or cin != cout):
                conv(p + ".downsample.0", cout, cin, 1)
                bn(p + ".downsample.1", cout)
            cin = cout
    sd["fc.weight"] = (rng.standard_normal((classes, cin)) / np.sqrt(cin)).astype(np.float32)
    sd["fc.bias"] = (0.1 * rng.standard_normal(classes)).astype(np.float32)
    return sd


def reference_logits(sd, depth, x_nhwc):
    """torchvision's ResNet forward (eval mode), NCHW, straight from the state dict."""
    t = {k: jnp.asarray(v) for k, v in sd.items()}

    def conv(x, name, stride, pad):
        return jax.lax.conv_general_dilated(
            x, t[name + ".weight"], (stride, stride), [(pad, pad)] * 2,
            dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=HIGHEST,
        )  # fmt: skip

    def bn(x, name):
        def col(v):
            return v[None, :, None, None]

        scale = t[name + ".weight"] / jnp.sqrt(t[name + ".running_var"] + 1e-5)
        return (x - col(t[name + ".running_mean"])) * col(scale) + col(t[name + ".bias"])

    relu = jax.nn.relu
    x = jnp.transpose(jnp.asarray(x_nhwc), (0, 3, 1, 2))
    x = relu(bn(conv(x, "conv1", 2, 3), "bn1"))
    x = jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), [(0, 0), (0, 0), (1, 1), (1, 1)]
    )
    bottleneck, blocks = LAYOUT[depth]
    for s, n in enumerate(blocks):
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            stride = 2 if (i == 0 and s > 0) else 1
            if bottleneck:  # v1.5: the stride is on the 3x3 convolution
                out = relu(bn(conv(x, p + ".conv1", 1, 0), p + ".bn1"))
                out = relu(bn(conv(out, p + ".conv2", stride, 1), p + ".bn2"))
                out = bn(conv(out, p + ".conv3", 1, 0), p + ".bn3")
            else:
                out = relu(bn(conv(x, p + ".conv1", stride, 1), p + ".bn1"))
                out = bn(conv(out, p + ".conv2", 1, 1), p + ".bn2")
            if p + ".downsample.0.weight" in t:
                x = bn(conv(x, p + ".downsample.0", stride, 0), p + ".downsample.1")
            x = relu(out + x)
    features = jnp.mean(x, axis=(2, 3))
    return features @ t["fc.weight"].T + t["fc.bias"]


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_weights_compute_torchvision_resnet(tmp_path, depth):
    sd = torchvision_state_dict(depth, classes=7)
    file = tmp_path / f"resnet{depth}.safetensors"
    save_file(sd, str(file))
    model, variables = pretrained.load(f"resnet{depth}", path=file)
    assert isinstance(model, ImageNetResNet) and model.depth == depth
    assert model.norm == "frozen_bn" and model.num_classes == 7  # read from fc.weight
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    want = np.asarray(reference_logits(sd, depth, x))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(model.apply(variables, jnp.asarray(x)))
    assert np.std(want) > 0.1  # a non-degenerate function of the input
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def pod_config(arg):
    spec = importlib.util.spec_from_file_location("imagenet_pod", ROOT / "configs/imagenet_pod.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_pod_finetune_config_loads_the_given_weights(tmp_path):
    c = pod_config("finetune")
    image = np.zeros((64, 64, 3), np.float32)  # imagenet_resized/64x64
    with pytest.raises(DataError, match=r"no pretrained resnet18 weights.*pretrained_path"):
        build_model(c, 1000, image)
    file = tmp_path / "resnet18.safetensors"
    save_file(torchvision_state_dict(18, classes=365), str(file))  # e.g. Places365 weights
    c.model.pretrained_path = str(file)
    model, variables = build_model(c, 1000, image)
    loaded = pretrained.load("resnet18", path=file)[1]
    assert model.num_classes == 1000 and model.norm == "frozen_bn"
    assert not np.any(variables["params"]["linear"]["kernel"])  # finetune.head_init='zero'
    np.testing.assert_array_equal(
        variables["params"]["layer4_1"]["conv2"]["kernel"],
        loaded["params"]["layer4_1"]["conv2"]["kernel"],
    )
    c.model.norm = ""  # unset: the pretrained model's frozen BatchNorm, not ResNet-18's GroupNorm
    model, variables = build_model(c, 1000, image)
    assert model.norm == "frozen_bn" and "batch_stats" in variables
    for key, value in (("name", "resnet34"), ("norm", "group_norm")):
        bad = c.copy_and_resolve_references()
        bad.model[key] = value
        with pytest.raises(ValueError, match=r"config\.model\.pretrained='resnet18'"):
            build_model(bad, 1000, image)
    with pytest.raises(ValueError, match="do not combine"):
        pod_config("finetune,smoke")
