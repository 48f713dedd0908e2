"""ScatterNetLinear: its features are kymatio's scattering (GroupNorm'd), its head gets ghost
norms equal to vmap norms, and configs/fmnist_best.py:smoke trains it end to end (head mode on
cached features); ScatterNetMobileNet: its features are those beside the ImageNet MobileNetV2's
pooled features of the resized images, normalised per example."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft.models import get_model
from dpft.models.scatternet import ScatterNetLinear, num_coefficients
from dpft.privacy import clipping as C
from dpft.privacy.ghost import GhostNorms
from dpft.train.step import cross_entropy_loss, partition

ROOT = pathlib.Path(__file__).resolve().parents[1]


def kymatio_scattering(images: np.ndarray) -> np.ndarray:
    """kymatio's own JAX scattering (J=2, L=8) of [N, H, W] images -> [N, 81, H/4, W/4]."""
    from kymatio.scattering2d.frontend.jax_frontend import ScatteringJax2D

    h, w = images.shape[1:]
    return np.asarray(ScatteringJax2D(J=2, shape=(h, w), L=8).scattering(jnp.asarray(images)))


def reference_group_norm(s: np.ndarray, groups: int) -> np.ndarray:
    """torch.nn.GroupNorm(groups, channels, affine=False) of [N, channels, h, w], in float64."""
    g = s.astype(np.float64).reshape(s.shape[0], groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    return g.reshape(s.shape)


def test_features_are_kymatio_scattering_with_group_norm():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 28, 28, 1)).astype(np.float32)
    ref = kymatio_scattering(x[..., 0])  # [3, 81, 7, 7]
    assert ref.shape == (3, num_coefficients(2, 8), 7, 7)
    raw = get_model("scatternet", 10, norm="none")
    variables = raw.init(jax.random.PRNGKey(0), x)
    assert set(variables["params"]) == {"linear"}
    assert variables["params"]["linear"]["kernel"].shape == (3969, 10)
    feats = np.asarray(raw.apply(variables, x, method=raw.features))
    np.testing.assert_allclose(feats, ref.reshape(3, -1), rtol=1e-6, atol=1e-7)
    normed = get_model("scatternet", 10)  # group_norm, 27 groups of 3 channels
    got = np.asarray(normed.apply(variables, x, method=normed.features))
    np.testing.assert_allclose(got, reference_group_norm(ref, 27).reshape(3, -1), atol=2e-4)
    logits = normed.apply(variables, x)
    kernel = variables["params"]["linear"]["kernel"]
    np.testing.assert_allclose(logits, got @ kernel + variables["params"]["linear"]["bias"])


def test_rgb_is_scattered_per_channel_and_normalised_per_channel_group():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    ref = np.concatenate([kymatio_scattering(x[..., c]) for c in range(3)], axis=1)
    model = ScatterNetLinear(groups=9)
    variables = model.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(model.apply(variables, x, method=model.scatter), ref, atol=1e-6)
    got = model.apply(variables, x, method=model.features)
    np.testing.assert_allclose(got, reference_group_norm(ref, 27).reshape(2, -1), atol=2e-4)


def test_bad_arguments_and_shapes():
    with pytest.raises(ValueError, match="norm"):
        ScatterNetLinear(norm="batch_norm")
    with pytest.raises(ValueError, match="groups=10 must divide the 81"):
        ScatterNetLinear(groups=10)
    model = ScatterNetLinear()
    with pytest.raises(ValueError, match="divisible by 4, got 30x28"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 28, 1)))
    with pytest.raises(ValueError, match="NHWC"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28)))


def test_head_ghost_norms_equal_vmap_norms():
    model = get_model("scatternet", 10)
    rng = np.random.default_rng(2)
    b = 6
    images = rng.uniform(size=(b, 28, 28, 1)).astype(np.float32)
    images *= np.logspace(-1, 1, b).reshape(b, 1, 1, 1)  # GroupNorm: norms barely depend on it
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:1]))
    variables = jax.tree_util.tree_map(
        lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.05, jnp.float32), variables
    )
    params, frozen = partition(variables, (r"linear/.*",))
    loss = cross_entropy_loss(model.apply)

    def per_example(p, example, key):
        return loss(p, frozen, example, key)

    batch = {
        "image": jnp.asarray(images),
        "label": jnp.asarray(rng.integers(0, 10, size=b), jnp.int32),
    }
    mask = jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32)

    def run(strategy, clip):
        fn = C.clipped_grad(per_example, C.FlatClip(clip), norm_strategy=strategy)
        return jax.jit(fn)(params, batch, mask, jax.random.PRNGKey(3))

    vmap = run(C.VmapNorms(), 1.0)
    clip = float(np.median(np.asarray(vmap.norms)[:5]))  # clips some examples, not all
    vmap = run(C.VmapNorms(), clip)
    ghost = run(GhostNorms(allow_fallback=False), clip)  # the head's Dense is intercepted
    np.testing.assert_allclose(ghost.norms, vmap.norms, rtol=1e-4)
    assert 0 < int(vmap.num_clipped) <= 5  # a real check of clipping, not all-or-nothing
    for k in vmap.grad_sum:
        scale = float(np.max(np.abs(vmap.grad_sum[k])))
        np.testing.assert_allclose(ghost.grad_sum[k], vmap.grad_sum[k], atol=1e-4 * scale)


def _config(arg):
    spec = importlib.util.spec_from_file_location("fmnist_best", ROOT / "configs/fmnist_best.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_config_arguments():
    c = _config("1,mnist")
    assert (c.data.name, c.dp.epsilon, c.model.name) == ("mnist", 1.0, "scatternet_mobilenet")
    assert (c.finetune.mode, c.dp.delta) == ("head", 1e-5)
    default = _config("")
    assert (default.dp.epsilon, default.data.name) == (3.0, "fashion_mnist")
    assert _config("run").model.name == _config("3,scatter").model.name == "scatternet"
    assert _config("smoke").model.name == "scatternet"
    assert _config("smoke,mobilenet").model.name == "scatternet_mobilenet"
    with pytest.raises(ValueError, match="unknown config argument 'cifar'"):
        _config("3,cifar")


def test_head_mode_needs_weights_unless_the_features_are_fixed():
    from dpft.train.phases import plan_phases

    c = _config("run")
    (phase,) = plan_phases(c, 10)
    assert phase.use_features and phase.trainable == (r"linear/.*",)
    c.model.name = "sample_convnet"  # a model with trainable features and no weights
    with pytest.raises(ValueError, match="set config.model.pretrained"):
        plan_phases(c, 10)


def test_mobilenet_block_is_normalised_pooled_features_of_the_resized_images():
    from dpft.models import pretrained
    from dpft.models.scatternet import ScatterNetMobileNet

    try:
        pretrained.weights_path("mobilenet_v2")
    except Exception as e:  # noqa: BLE001 - the data directory has no MobileNetV2 weights
        pytest.skip(f"no MobileNetV2 weights: {e}")
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(2, 28, 28, 1)).astype(np.float32)
    model = ScatterNetMobileNet(image_size=32, mobilenet_weight=0.5)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(np.shape, variables) == {
        "params": {"linear": {"bias": (10,), "kernel": (3969 + 1280, 10)}}
    }
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method=model.features))(variables, x))
    # reference: kymatio + GroupNorm, then torchvision-style preprocessing by hand
    scatter = reference_group_norm(kymatio_scattering(x[..., 0]), 27).reshape(2, -1)
    np.testing.assert_allclose(got[:, :3969], scatter, atol=2e-4)
    mob, mob_vars = pretrained.load("mobilenet_v2")
    rgb = np.repeat(np.asarray(jax.image.resize(x, (2, 32, 32, 1), "bilinear")), 3, axis=-1)
    rgb = (rgb - np.asarray(pretrained.MEAN)) / np.asarray(pretrained.STD)
    pool = jax.jit(lambda v, x: mob.apply(v, x, method=mob.features))
    pooled = np.asarray(pool(mob_vars, jnp.asarray(rgb, jnp.float32)))
    pooled = pooled.astype(np.float64)
    ref = (pooled - pooled.mean(1, keepdims=True)) / pooled.std(1, keepdims=True)
    # float32 convolutions compiled in two programs: ~1e-3 apart at most; a wrong resize,
    # channel order or normalisation is off by O(0.1)
    np.testing.assert_allclose(got[:, 3969:], 0.5 * ref, rtol=1e-3, atol=5e-3)
    with pytest.raises(ValueError, match="1 or 3"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 2)))


def test_smoke_config_trains_within_its_budget(tmp_path):
    from dpft.train import train_and_evaluate

    c = _config("smoke")
    c.tensorboard = False
    summary = train_and_evaluate(c, tmp_path / "work")
    assert summary["steps"] == c.train.steps
    assert 0 < summary["epsilon"] <= c.dp.epsilon
    assert summary["noise_multiplier"] > 0
    assert summary["test_accuracy"] > 0.3  # 10 classes: well above chance after 6 steps
    saved = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert saved["epsilon"] == summary["epsilon"]
    # the run says what it trained: only the head, 3969 scattering features x 10 classes + bias
    trained = saved["trained"]["head"]
    assert f"DP-trains {3969 * 10 + 10:,} parameters (linear) of scatternet" in trained
    assert "fixed public feature extractor" in trained
