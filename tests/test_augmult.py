"""Augmentation multiplicity: K views per example, averaged inside the example's clipping unit."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import have_data, needs_data
from test_ghost import compare
from test_train import final_arrays, tiny_config

from dpft import optim
from dpft.__main__ import train_and_evaluate
from dpft.config import base_config
from dpft.data import augment as A
from dpft.federated import driver, partition, server
from dpft.models import get_model
from dpft.privacy import clipping as C
from dpft.privacy import keys
from dpft.privacy.ghost import GhostNorms
from dpft.train import build
from dpft.train.step import TrainState, cross_entropy_loss, make_train_step, unflatten
from dpft.train.step import partition as split_params


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
        return nn.Dense(3)(nn.LayerNorm()(x.reshape(x.shape[0], -1)))


def today_loss(apply_fn):
    """The per-example loss as it was before augmentation multiplicity (reference)."""

    def loss(params, frozen, example, rng):
        variables = unflatten({**frozen, **params})
        logits = apply_fn(variables, example["image"][None])[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -logp[example["label"]], {"correct": jnp.argmax(logits) == example["label"]}

    return loss


def small(b=6, shape=(6, 6, 2), seed=0, model=None):
    rng = np.random.default_rng(seed)
    model = model or SmallCNN()
    batch = {
        "image": jnp.asarray(rng.normal(size=(b, *shape)), jnp.float32),
        "label": jnp.asarray(np.arange(b) % 3, jnp.int32),
    }
    variables = model.init(jax.random.PRNGKey(seed), batch["image"][:1])
    params, frozen = split_params(variables, (".*",))
    return model, params, frozen, batch


def per_example(loss, frozen):
    return lambda p, e, k: loss(p, frozen, e, k)


SPEC = A.AugmentSpec(4, "crop_flip", 2, "reflect")


# ----------------------------------------------------------------------- views


def test_views_distinct_deterministic_and_crops_of_the_padded_image():
    image = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5, 2)), jnp.float32)
    rng = keys.derive(jax.random.PRNGKey(1), "example", 3)
    v = np.asarray(A.views(image, rng, SPEC))
    assert v.shape == (4, 6, 5, 2)
    np.testing.assert_array_equal(v, np.asarray(A.views(image, rng, SPEC)))  # deterministic
    flat = v.reshape(4, -1)
    assert all(not np.array_equal(flat[i], flat[j]) for i in range(4) for j in range(i))
    # view k does not depend on K: a pure function of (example key, k)
    two = np.asarray(A.views(image, rng, A.AugmentSpec(2, "crop_flip", 2, "reflect")))
    np.testing.assert_array_equal(v[:2], two)
    other = np.asarray(A.views(image, keys.derive(jax.random.PRNGKey(1), "example", 4), SPEC))
    assert not np.array_equal(other, v)  # another example position, other views
    # every view is an H x W window of the reflect-padded image, possibly mirrored
    padded = np.pad(np.asarray(image), ((2, 2), (2, 2), (0, 0)), mode="reflect")
    windows = [padded[y : y + 6, x : x + 5] for y in range(5) for x in range(5)]
    windows += [w[:, ::-1] for w in windows]
    for view in v:
        assert any(np.array_equal(view, w) for w in windows)
    zero = A.views(image, rng, A.AugmentSpec(8, "crop", 2, "zero"))
    assert float(jnp.min(jnp.sum(jnp.abs(zero), axis=(1, 2, 3)))) > 0
    flips = np.asarray(A.views(image, rng, A.AugmentSpec(8, "flip")))
    assert all(np.array_equal(f, image) or np.array_equal(f, image[:, ::-1]) for f in flips)


# ------------------------------------------------------------ identity, averaging, keys


def test_one_view_without_augmentation_is_todays_step_exactly():
    model, params, frozen, batch = small()
    spec = build.build_augment(base_config())  # the defaults: K = 1, no augmentation
    assert spec.identity and spec.augmult == 1 and spec.augment == "none"
    tx = C.FlatClip(0.3)
    opt = optim.dp_optimizer(
        "sgd",
        0.5,
        noise_multiplier=1.0,
        l2_sensitivity=0.3,
        expected_batch_size=6.0,
        key=jax.random.PRNGKey(9),
    )
    batch = {**batch, "mask": jnp.ones(6)}
    out = []
    for loss in (today_loss(model.apply), cross_entropy_loss(model.apply, spec)):
        state = TrainState(jnp.zeros([], jnp.int32), params, opt.init(params), frozen)
        step = jax.jit(make_train_step(loss, tx, opt, norm_strategy=GhostNorms()))
        out.append(step(state, batch, jax.random.PRNGKey(4)))
    for k in params:
        np.testing.assert_array_equal(np.asarray(out[0][0].params[k]), out[1][0].params[k])
    for k, v in out[0][1].items():
        assert float(v) == float(out[1][1][k]), k


def test_mean_over_views_is_the_gradient_of_the_mean_loss_one_unit_per_example():
    """The clipped unit is the example: B norms for B examples, the unclipped sum is the sum
    of the examples' mean-over-views gradients, each computed here with K separate calls."""
    model, params, frozen, batch = small()
    loss = cross_entropy_loss(model.apply, SPEC)
    rng = jax.random.PRNGKey(7)
    fn = C.clipped_grad(per_example(loss, frozen), C.FlatClip(float("inf")))
    out = jax.jit(fn)(params, batch, jnp.ones(6), rng)
    assert out.norms.shape == (6,)
    single = today_loss(model.apply)

    def mean_loss(p, i):
        v = A.views(batch["image"][i], keys.derive(rng, "example", i), SPEC)
        ls = [
            single(p, frozen, {"image": v[k], "label": batch["label"][i]}, None)[0]
            for k in range(4)
        ]
        return sum(ls) / 4

    want = jax.tree_util.tree_map(jnp.zeros_like, params)
    for i in range(6):
        np.testing.assert_allclose(float(out.loss[i]), float(mean_loss(params, i)), rtol=1e-5)
        g = jax.grad(mean_loss)(params, i)
        want = jax.tree_util.tree_map(jnp.add, want, g)
    for k in params:
        np.testing.assert_allclose(out.grad_sum[k], want[k], rtol=1e-4, atol=1e-6)
    correct = np.asarray(out.aux["correct"])
    assert np.all((correct * 4) == np.round(correct * 4))  # a fraction of the 4 views


@pytest.mark.parametrize("strategy", ["vmap", "ghost"])
def test_one_example_contributes_at_most_c_with_adversarial_views(strategy):
    """Sensitivity: a batch where one example is real (huge inputs, so its views' gradients
    are large) has a clipped sum of norm <= C; removing one example from a batch moves the
    sum by <= C."""
    model, params, frozen, batch = small(b=4)
    loss = per_example(cross_entropy_loss(model.apply, SPEC), frozen)
    norms = GhostNorms() if strategy == "ghost" else None
    c = 0.5
    fn = jax.jit(C.clipped_grad(loss, C.FlatClip(c), norm_strategy=norms))
    image = batch["image"] * jnp.asarray([1e3, 1.0, 30.0, 1.0]).reshape(4, 1, 1, 1)
    batch = {**batch, "image": image}

    def norm(tree):
        return float(jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in tree.values())))

    rng = jax.random.PRNGKey(2)
    one = fn(params, batch, jnp.asarray([1.0, 0, 0, 0]), rng)
    assert int(one.num_clipped) == 1 and norm(one.grad_sum) <= c * (1 + 1e-5)
    assert norm(one.grad_sum) >= 0.99 * c  # clipped to C, not shrunk by 1/K
    full = fn(params, batch, jnp.ones(4), rng)
    for drop in range(4):
        mask = jnp.ones(4).at[drop].set(0.0)
        less = fn(params, batch, mask, rng)  # the others keep their positions and keys
        diff = jax.tree_util.tree_map(jnp.subtract, full.grad_sum, less.grad_sum)
        assert norm(diff) <= c * (1 + 1e-5)


def test_premade_views_are_averaged_not_augmented_again():
    model, params, frozen, batch = small(b=3)
    rng = jax.random.PRNGKey(5)
    made = cross_entropy_loss(model.apply, SPEC)
    for spec in (None, SPEC):  # given views: the spec does not augment them again
        given = cross_entropy_loss(model.apply, spec, input_ndim=3)
        for i in range(3):
            ex = {"image": batch["image"][i], "label": batch["label"][i]}
            key = keys.derive(rng, "example", i)
            views = A.views(ex["image"], key, SPEC)
            a = made(params, frozen, ex, key)
            b = given(params, frozen, {**ex, "image": views}, jax.random.PRNGKey(0))
            np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-6)
            assert float(a[1]["correct"]) == float(b[1]["correct"])
    with pytest.raises(ValueError, match="expected rank 3"):
        given(params, frozen, {"image": jnp.zeros((1, 2, 6, 6, 2)), "label": 0}, rng)


# ---------------------------------------------------------------- ghost == vmap


@pytest.mark.parametrize(  # K = 1 for resnet20 (no views) is tests/test_ghost.py's case
    "name,shape,kwargs,k",
    [
        ("sample_convnet", (28, 28, 1), {}, 1),
        ("sample_convnet", (28, 28, 1), {}, 4),
        ("resnet20", (16, 16, 3), {}, 4),
    ],
)
def test_ghost_equals_vmap_with_views(name, shape, kwargs, k):
    """The model sees a batch of K inside one example: ghost norms sum the kernel gradient over
    the K views' positions, so they are the norms of the mean gradient, as vmap's are."""
    model = get_model(name, 10, norm="frozen_bn") if name == "resnet20" else get_model(name, 10)
    _, params, frozen, batch = small(b=3, shape=shape, model=model)
    batch = {**batch, "label": jnp.asarray([1, 7, 3], jnp.int32)}
    spec = A.AugmentSpec(k, "crop_flip" if k > 1 else "crop", 3, "reflect")
    loss = per_example(cross_entropy_loss(model.apply, spec), frozen)
    (out,) = compare(loss, [C.FlatClip(1e-3)], params, batch, jnp.ones(3))
    assert int(out.num_clipped) == 3


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("augmult", 0, "config.data.augmult must be an int >= 1"),
        ("augment", "rotate", "config.data.augment must be crop_flip|crop|flip|none"),
        ("augment_pad", -1, "config.data.augment_pad must be an int >= 0"),
        ("augment_pad", 28, "config.data.augment_pad=28 must be < the image height and width"),
        ("augment_pad_mode", "edge", "config.data.augment_pad_mode must be reflect|zero"),
    ],
)
def test_bad_augment_keys_are_one_line_errors(key, value, needle, tmp_path):
    c = tiny_config()
    c.data.augmult = 2
    c.data[key] = value
    if key == "augment_pad" and value > 0 and not have_data():
        pytest.skip("checked against the images: needs the data dir")
    with pytest.raises(ValueError) as err:
        train_and_evaluate(c, tmp_path / "w")  # refused before the workdir is touched
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("value", [2.0, True, "2", None])
def test_augmult_must_be_an_int(value):
    with pytest.raises(ValueError, match="config.data.augmult must be an int >= 1"):
        A.from_config({"augmult": value})


def test_default_augment_per_dataset():
    c = base_config()
    c.data.augmult = 4
    for name, want in (("mnist", "crop"), ("fashion_mnist", "crop_flip"), ("cifar10", "crop_flip")):
        c.data.name = name
        assert A.from_config(c.data) == A.AugmentSpec(4, want, 4, "reflect")
    c.data.augment = "none"
    assert A.from_config(c.data).augment == "none"


# ------------------------------------------------------------- end to end


@needs_data
def test_centralized_run_with_two_views_resumes_exactly(tmp_path, monkeypatch):
    """A run with augmult=2 makes its views inside the step (traced) and, its views being a
    function of (seed, step, example position), a crashed and resumed run equals the
    uninterrupted one bit for bit."""
    from dpft.train import report

    c = tiny_config()
    c.model.name = "linear"  # on the 28 x 28 x 1 views; compiles in a second
    c.data.augmult = 2
    c.dp.accountant = "rdp"  # fast epsilon at the log points
    made = []
    original_views = A.views
    monkeypatch.setattr(A, "views", lambda *a: made.append(1) or original_views(*a))
    summary = train_and_evaluate(c, tmp_path / "full")
    assert made and np.isfinite(summary["test_loss"]) and summary["steps"] == 6
    original = report.MetricsWriter.write

    def crash_at_step_4(self, step, metrics):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step, metrics)

    monkeypatch.setattr(report.MetricsWriter, "write", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(c, tmp_path / "resumed")
    monkeypatch.setattr(report.MetricsWriter, "write", original)
    resumed = train_and_evaluate(c, tmp_path / "resumed")
    full, meta = final_arrays(tmp_path / "full")
    again, again_meta = final_arrays(tmp_path / "resumed")
    assert meta["ledger"] == again_meta["ledger"] and again_meta["step"] == 6
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed["epsilon"] == summary["epsilon"]
    one = build.plan_privacy(tiny_config(), 600)  # the privacy of one view per example
    assert summary["noise_multiplier"] == one.noise_multiplier
    assert json.loads((tmp_path / "full" / "config.json").read_text())["data"]["augmult"] == 2


def test_federated_example_level_with_two_views():
    """Clients' local DP-SGD steps (make_train_step inside the vmapped driver) with K = 2 views:
    ghost == vmap, and the views change the update."""
    rng = np.random.default_rng(0)
    data = {
        "image": rng.normal(size=(40, 6, 6, 2)).astype(np.float32),
        "label": (np.arange(40) % 3).astype(np.int32),
    }
    model = SmallCNN()
    params, frozen = split_params(model.init(jax.random.PRNGKey(0), data["image"][:1]), (".*",))
    clients = partition.iid(data["label"], 5, seed=0)
    config = driver.FedConfig(
        rounds=1,
        client_rate=0.8,
        max_clients=5,
        local_steps=2,
        local_rate=0.6,
        local_batch=8,
        local_lr=0.5,
        dp="example",
        noise_multiplier=0.7,
        example_clip=0.05,
        seed=1,
    )
    plan = driver.make_plan(config, [len(c) for c in clients])
    inputs = driver.round_inputs(config, plan, data, clients, 0)
    tx = server.make_server_optimizer("sgd", 1.0)
    st = server.ServerState(jnp.zeros([], jnp.int32), params, tx.init(params))
    two = A.AugmentSpec(2, "crop_flip", 2, "reflect")
    out = {}
    for name, spec, norms in (
        ("plain", None, None),
        ("vmap", two, None),
        ("ghost", two, GhostNorms()),
    ):
        loss = cross_entropy_loss(model.apply, spec)
        round_fn = driver.make_round(loss, config, plan, tx, norm_strategy=norms)
        out[name] = round_fn(st, frozen, inputs)[0].params
    for k in params:
        np.testing.assert_allclose(out["ghost"][k], out["vmap"][k], atol=1e-5)
    assert max(float(jnp.max(jnp.abs(out["vmap"][k] - out["plain"][k]))) for k in params) > 1e-4


@needs_data
def test_federated_cli_trains_on_views(tmp_path):
    # example-level rounds whose local DP-SGD steps average 2 views per example before clipping
    from test_federated import fed_smoke

    # (that the views change the update, and ghost == vmap with them: the driver test above)
    c = fed_smoke()
    c.data.augmult = 2
    two = train_and_evaluate(c, tmp_path / "two")
    assert 0 < two["epsilon"] <= c.dp.epsilon  # the accounting of one view per example
    assert json.loads((tmp_path / "two" / "config.json").read_text())["data"]["augmult"] == 2
