"""Tests of dpft.models: architectures, registry, pretrained CIFAR ResNets (needs the data dir)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft import models
from dpft.models import pretrained
from dpft.models.cnn import SampleConvNet, TramerBonehCNN
from dpft.models.resnet import CifarResNet, WideResNet
from dpft.paths import DataError, data_dir

KEY = jax.random.PRNGKey(0)


def _data_dir() -> pathlib.Path:
    try:
        return data_dir()
    except DataError as e:
        pytest.skip(f"no data directory ({e})")


def _weights_dir() -> pathlib.Path:
    d = _data_dir() / pretrained.SUBDIR
    if not d.is_dir():
        pytest.skip(f"no pretrained weights in {d}")
    return d


@pytest.fixture(scope="module")
def resnet20_pretrained():
    _weights_dir()
    return pretrained.load("resnet20")


def _shapes(tree):
    return jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)


def _cheap_init(model, x, seed: int = 0):
    """Variables of ``model`` filled with numpy Gaussians (N(0, 0.1^2)).

    ``model.init`` compiles a random initializer per parameter shape, which takes seconds on a
    small CPU; shape tests only need some values of the right shapes. `test_sample_convnet...`
    and `test_get_model_registry` run the real ``init``.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, KEY, x)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape).astype(np.float32)), shapes
    )


# ----------------------------------------------------------------------------- small CNNs


def test_sample_convnet_matches_opacus_param_count():
    model = SampleConvNet()
    variables = model.init(KEY, jnp.zeros((1, 28, 28, 1)))
    assert models.count_params(variables) == 26_010
    assert set(variables) == {"params"}
    assert set(variables["params"]) == {"conv1", "conv2", "fc1", "linear"}
    x = jax.random.normal(KEY, (3, 28, 28, 1))
    assert model.apply(variables, x).shape == (3, 10)
    assert model.apply(variables, x, method=model.features).shape == (3, 32)


def test_tramer_boneh_cnn_is_tanh_convnet():
    model = TramerBonehCNN(num_classes=7)
    assert model.activation == "tanh" and isinstance(model, SampleConvNet)
    x = jax.random.normal(KEY, (2, 28, 28, 1))
    variables = _cheap_init(model, x)
    assert models.count_params(variables) == 26_010 - 3 * 33  # 7 instead of 10 outputs
    logits = model.apply(variables, x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    # Same parameters, ReLU network: different function.
    relu = SampleConvNet(num_classes=7).apply(variables, x)
    assert not np.allclose(logits, relu)


def test_bad_activation_fails_at_construction():
    with pytest.raises(ValueError, match="activation must be one of"):
        SampleConvNet(activation="swish-ish")


# ----------------------------------------------------------------------------- ResNets


def test_group_norm_resnet20_shapes_and_no_batch_stats():
    model = models.get_model("resnet20", 5, norm="group_norm")
    x = jax.random.normal(KEY, (2, 32, 32, 3))
    variables = _cheap_init(model, x)
    assert set(variables) == {"params"}
    assert model.apply(variables, x).shape == (2, 5)
    assert model.apply(variables, x, method=model.features).shape == (2, 64)
    assert models.count_params(variables) == 269_722 - 65 * 10 + 65 * 5  # 5-way head


def test_resnet_param_tree_mirrors_torch_names():
    model = CifarResNet(depth=20)
    variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)))
    blocks = [f"layer{s}_{i}" for s in (1, 2, 3) for i in range(3)]
    assert set(variables["params"]) == {"conv1", "bn1", "linear", *blocks}
    assert set(variables["batch_stats"]) == {"bn1", *blocks}
    assert set(variables["params"]["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert variables["params"]["layer2_0"]["conv1"]["kernel"].shape == (3, 3, 16, 32)
    assert set(variables["params"]["bn1"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]["bn1"]) == {"mean", "var"}
    assert variables["params"]["linear"]["kernel"].shape == (64, 10)


def test_resnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth=18)
    with pytest.raises(ValueError, match="norm"):
        CifarResNet(norm="batch_norm")
    with pytest.raises(ValueError, match="groups"):
        CifarResNet(norm="group_norm", groups=3)


def test_wrn16_4_forward():
    model = models.get_model("wrn16_4", 10)
    assert isinstance(model, WideResNet) and (model.depth, model.width) == (16, 4)
    x = jax.random.normal(KEY, (2, 32, 32, 3))
    variables = _cheap_init(model, x)
    assert set(variables) == {"params"}
    assert {"conv1", "layer1_0", "layer3_1", "norm", "linear"} <= set(variables["params"])
    assert "shortcut" in variables["params"]["layer2_0"]
    logits = model.apply(variables, x)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert model.apply(variables, x, method=model.features).shape == (2, 256)
    assert 2_500_000 < models.count_params(variables) < 3_000_000


# ----------------------------------------------------------------------------- registry


def test_get_model_registry():
    assert set(models.MODEL_NAMES) == {
        "sample_convnet",
        "tramer_boneh_cnn",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "wrn16_4",
        "resnet18",
        "resnet34",
        "resnet50",
        "linear",
        "mobilenet_v2",
        "vit_ti16",
        "vit_s16",
        "vit_b16",
        "vit_l16",
        "scatternet",
        "scatternet_mobilenet",
    }
    assert models.get_model("resnet44", 3).depth == 44
    assert models.get_model("resnet50", 5).depth == 50
    assert isinstance(models.get_model("tramer_boneh_cnn", 10), TramerBonehCNN)
    head = models.get_model("linear", 4)
    x = jnp.ones((2, 64))
    variables = head.init(KEY, x)
    assert _shapes(variables["params"]) == {"linear": {"kernel": (64, 4), "bias": (4,)}}
    assert head.apply(variables, x).shape == (2, 4)


def test_get_model_unknown_name():
    with pytest.raises(ValueError, match="valid names are") as info:
        models.get_model("resnet101", 10)
    for name in models.MODEL_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="does not take"):
        models.get_model("sample_convnet", 10, norm="group_norm")


# ----------------------------------------------------------------------------- pretrained


def test_pretrained_resnet20_reproduces_golden(resnet20_pretrained):
    golden_file = _weights_dir() / "golden_resnet20.npz"
    if not golden_file.is_file():
        pytest.skip(f"no {golden_file}")
    golden = np.load(golden_file)
    model, variables = resnet20_pretrained
    x = jnp.asarray(golden["inputs_nhwc"])
    assert x.shape == (32, 32, 32, 3)
    logits = np.asarray(model.apply(variables, x))
    features = np.asarray(model.apply(variables, x, method=model.features))
    np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(features, golden["features"], rtol=0, atol=1e-4)


def test_pretrained_variables_layout(resnet20_pretrained):
    model, variables = resnet20_pretrained
    assert isinstance(model, CifarResNet) and model.norm == "frozen_bn"
    assert set(variables) == {"params", "batch_stats"}
    fresh = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)))
    assert _shapes(variables) == _shapes(fresh)
    leaves = jax.tree_util.tree_leaves(variables)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)


def test_all_pretrained_depths_load():
    _weights_dir()
    x = jax.random.normal(KEY, (2, 32, 32, 3))
    counts = {}
    for name in pretrained.NAMES:
        model, variables = pretrained.load(name)
        logits = model.apply(variables, x)
        assert logits.shape == (2, 10)
        assert bool(jnp.all(jnp.isfinite(logits)))
        counts[name] = models.count_params(variables)
    assert counts["resnet20"] == 269_722
    assert counts["resnet56"] > counts["resnet44"] > counts["resnet32"] > counts["resnet20"]


def test_pretrained_path_may_be_file_or_directory():
    d = _weights_dir()
    _, from_dir = pretrained.load("resnet20", path=d)
    _, from_file = pretrained.load("resnet20", path=d / "resnet20.safetensors")
    a = from_dir["params"]["linear"]["kernel"]
    b = from_file["params"]["linear"]["kernel"]
    np.testing.assert_array_equal(a, b)


def test_frozen_bn_is_deterministic_and_not_mutated(resnet20_pretrained):
    model, variables = resnet20_pretrained
    before = jax.tree_util.tree_map(np.array, variables["batch_stats"])
    x = jax.random.normal(KEY, (4, 32, 32, 3)) * 3.0 + 1.0  # far from the running statistics
    first = model.apply(variables, x)
    second = model.apply(variables, x)
    np.testing.assert_array_equal(first, second)
    # Per-example outputs do not depend on the rest of the batch.
    np.testing.assert_allclose(model.apply(variables, x[:1]), first[:1], atol=1e-5)
    after = jax.tree_util.tree_map(np.array, variables["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_per_example_gradients(resnet20_pretrained):
    model, variables = resnet20_pretrained
    params, rest = variables["params"], {"batch_stats": variables["batch_stats"]}
    x = jax.random.normal(KEY, (2, 32, 32, 3))
    y = jnp.array([3, 7])

    def loss(p, xi, yi):
        logits = model.apply({"params": p, **rest}, xi[None])[0]
        return -jax.nn.log_softmax(logits)[yi]

    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x, y)
    expected = jax.tree_util.tree_map(lambda p: (2, *p.shape), params)
    assert _shapes(grads) == expected
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    single = jax.grad(loss)(params, x[1], y[1])
    np.testing.assert_allclose(grads["linear"]["kernel"][1], single["linear"]["kernel"], atol=1e-5)


def test_head_reinit():
    _weights_dir()
    model, variables = pretrained.load_head_reinit("resnet20", 7, head_init="zero")
    assert model.num_classes == 7
    head = variables["params"]["linear"]
    assert _shapes(head) == {"kernel": (64, 7), "bias": (7,)}
    assert not np.any(np.asarray(head["kernel"])) and not np.any(np.asarray(head["bias"]))
    logits = model.apply(variables, jnp.ones((2, 32, 32, 3)))
    np.testing.assert_array_equal(logits, np.zeros((2, 7), np.float32))
    _, rand = pretrained.load_head_reinit("resnet20", 7, head_init="random", seed=1)
    assert float(jnp.std(rand["params"]["linear"]["kernel"])) > 0
    with pytest.raises(ValueError, match="keep"):
        pretrained.replace_head(variables, 3, head_init="keep")


def _assert_one_line_data_error(excinfo, file: pathlib.Path) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message
    assert file.name in message


def test_corrupt_safetensors_raises_one_line_data_error(tmp_path):
    bad = tmp_path / "resnet20.safetensors"
    bad.write_bytes(b"this is not a safetensors file \x00\x01\x02" * 7)
    with pytest.raises(DataError) as excinfo:
        pretrained.load("resnet20", path=bad)
    _assert_one_line_data_error(excinfo, bad)
    empty = tmp_path / "resnet32.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        pretrained.load("resnet32", path=tmp_path)  # a directory: finds resnet32.safetensors
    _assert_one_line_data_error(excinfo, empty)


def test_missing_tensor_raises_one_line_data_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(_weights_dir() / "resnet20.safetensors"))
    del tensors["layer2.1.bn2.running_var"]
    file = tmp_path / "resnet20_missing.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(DataError, match="layer2.1.bn2.running_var") as excinfo:
        pretrained.load("resnet20", path=file)
    _assert_one_line_data_error(excinfo, file)


def test_wrong_shape_and_wrong_file_raise_data_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _weights_dir()
    tensors = load_file(str(d / "resnet20.safetensors"))
    tensors["linear.weight"] = np.zeros((100, 64), np.float32)
    file = tmp_path / "resnet20_shape.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(DataError, match="expected") as excinfo:
        pretrained.load("resnet20", path=file)
    _assert_one_line_data_error(excinfo, file)
    # resnet32 weights where resnet20 is expected: extra tensors.
    with pytest.raises(DataError, match="unexpected") as excinfo:
        pretrained.load("resnet20", path=d / "resnet32.safetensors")
    _assert_one_line_data_error(excinfo, d / "resnet32.safetensors")
    missing = tmp_path / "nothing_here.safetensors"
    with pytest.raises(DataError) as excinfo:
        pretrained.load("resnet20", path=missing)
    _assert_one_line_data_error(excinfo, missing)
    with pytest.raises(ValueError, match="resnet20.*resnet18"):  # lists the valid names
        pretrained.load("resnet19")
