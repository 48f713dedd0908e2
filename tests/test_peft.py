"""Parameter-efficient DP fine-tuning: LoRA adapters (dpft.models.lora) and BiTFiT."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft import optim, paths
from dpft.config import base_config
from dpft.models import get_model, lora
from dpft.privacy import clipping as C
from dpft.privacy.ghost import GhostNorms
from dpft.train import train_and_evaluate
from dpft.train.checkpoint import Checkpointer
from dpft.train.phases import plan_phases
from dpft.train.step import (
    TrainState,
    cross_entropy_loss,
    flatten,
    make_train_step,
    partition,
    unflatten,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0}
SHAPE = (6, 6, 3)


class Mlp(nn.Module):
    @nn.compact  # an inline (compact) layer: path mlp/Dense_0
    def __call__(self, x):
        return nn.tanh(nn.Dense(6)(x))


class Tiny(nn.Module):
    """Every kind of layer LoRA meets: k x k and strided 1x1 convs, a norm, a compact child,
    a Dense called twice (one set of adapters for both calls) and the head ``linear``."""

    def setup(self):
        self.conv3 = nn.Conv(4, (3, 3))
        self.proj = nn.Conv(5, (1, 1), strides=(2, 2))
        self.norm = nn.GroupNorm(num_groups=1)
        self.mlp = Mlp()
        self.shared = nn.Dense(6, use_bias=False)
        self.linear = nn.Dense(3)

    def features(self, x):
        x = self.norm(self.proj(nn.relu(self.conv3(x))))
        x = self.mlp(x.reshape(x.shape[0], -1))
        return self.shared(nn.tanh(self.shared(x)))

    def __call__(self, x):
        return self.linear(self.features(x))


def run(fn, *args):
    """``fn(*args)`` compiled (quickly): op-by-op dispatch is slower for these small models."""
    return np.asarray(jax.jit(fn, compiler_options=FAST_COMPILE)(*args))


def images(n, seed=0, shape=SHAPE):
    x = np.random.default_rng(seed).normal(size=(n, *shape))
    return jnp.asarray(x, jnp.float32)


@functools.cache  # one init per spec for the whole file
def tiny(spec, seed=0):
    model = Tiny()
    x = images(1, seed)
    base = jax.jit(model.init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(seed), x)
    wrapped, variables = lora.attach(model, base, spec, x, jax.random.PRNGKey(seed + 1))
    return model, base, wrapped, variables


def adapter_layers(variables):
    return {k.split("/lora_a/")[0][len("params/") :] for k in flatten(variables) if "/lora_a/" in k}


def randomize_b(variables, seed=5, scale=0.3):
    """The adapters as after some training: B != 0 (B is zero-initialised)."""
    rng = np.random.default_rng(seed)
    flat = {
        k: jnp.asarray(scale * rng.normal(size=v.shape), v.dtype) if "/lora_b/" in k else v
        for k, v in flatten(variables).items()
    }
    return unflatten(flat)


def test_zero_init_adapters_compute_the_base_model_exactly():
    model, base, wrapped, variables = tiny(lora.LoRASpec(2))
    # default targets: every Dense and 1x1 conv except the head (not the 3x3 conv, not the norm)
    assert adapter_layers(variables) == {"proj", "mlp/Dense_0", "shared"}
    flat, base_flat = flatten(variables), flatten(base)
    assert flat["params/proj/lora_a/kernel"].shape == (1, 1, 4, 2)
    assert flat["params/proj/lora_b/kernel"].shape == (1, 1, 2, 5)
    assert flat["params/mlp/Dense_0/lora_a/kernel"].shape == (45, 2)
    assert flat["params/shared/lora_b/kernel"].shape == (2, 6)
    for k, v in base_flat.items():  # the base variables are kept bitwise
        np.testing.assert_array_equal(flat[k], v, err_msg=k)
    for k, v in flat.items():
        if "/lora_b/" in k:
            assert not np.any(np.asarray(v)), k
        elif "/lora_a/" in k:
            assert np.std(np.asarray(v)) > 0, k
    x = images(4, seed=1)
    np.testing.assert_array_equal(run(wrapped.apply, variables, x), run(model.apply, base, x))
    np.testing.assert_array_equal(
        run(functools.partial(wrapped.apply, method=wrapped.features), variables, x),
        run(functools.partial(model.apply, method=model.features), base, x),
    )
    # explicit patterns may name k x k convs and the head
    _, _, _, every = tiny(lora.LoRASpec(2, targets=(".*",)))
    assert adapter_layers(every) == {"conv3", "proj", "mlp/Dense_0", "shared", "linear"}
    assert flatten(every)["params/conv3/lora_a/kernel"].shape == (3, 3, 3, 2)


def test_merge_equals_the_adapted_model():
    spec = lora.LoRASpec(2, alpha=3.0, targets=(".*",))
    model, _, wrapped, variables = tiny(spec)
    variables = randomize_b(variables)
    merged = lora.merge(variables, spec)
    assert set(flatten(merged)) == {k for k in flatten(variables) if "/lora_" not in k}
    x = images(5, seed=2)
    adapted = run(wrapped.apply, variables, x)
    base = run(model.apply, lora.merge(randomize_b(variables, scale=0.0), spec), x)
    assert np.max(np.abs(adapted - base)) > 1e-2  # the adapters change the function
    np.testing.assert_allclose(run(model.apply, merged, x), adapted, rtol=1e-5, atol=1e-6)


class FullRank(nn.Module):
    """With rank 4: ``pw`` has A square (d_in = 4), ``fc`` has B square (d_out = 4)."""

    @nn.compact
    def __call__(self, x):  # [N, 2, 2, 4]
        x = nn.tanh(nn.Conv(6, (1, 1), name="pw")(x))
        return nn.Dense(4, name="fc")(x.reshape(x.shape[0], -1))


def full_rank_setup(seed=0):
    spec = lora.LoRASpec(4, alpha=6.0, targets=("pw", "fc"))  # scale 1.5
    model = FullRank()
    x = images(3, seed, (2, 2, 4))
    labels = jnp.asarray([0, 3, 1])
    base = model.init(jax.random.PRNGKey(seed), x[:1])
    wrapped, variables = lora.attach(model, base, spec, x[:1], jax.random.PRNGKey(9))

    def loss(apply, v):
        logp = jax.nn.log_softmax(apply(v, x))
        return -jnp.mean(logp[jnp.arange(3), labels])

    def base_grad(v):  # the dense gradient w.r.t. every kernel of the base model
        return flatten(
            {"params": jax.jit(jax.grad(lambda p: loss(model.apply, {"params": p})))(v["params"])}
        )

    def adapter_grad(v):
        return flatten(
            {"params": jax.jit(jax.grad(lambda p: loss(wrapped.apply, {"params": p})))(v["params"])}
        )

    return spec, variables, base_grad, adapter_grad


def test_full_rank_lora_gradients_map_onto_the_dense_gradient():
    """At any adapter values, with ``W' = W + s A B`` the merged kernel and ``G = dL/dW'`` the
    dense kernel gradient of the base model at the merged weights: ``dL/dB = s A^T G`` and
    ``dL/dA = s G B^T``. At full rank the square factor is invertible, so the dense gradient is
    recovered from the adapter gradient: ``G = A^-T dL/dB / s`` (``pw``, A square) and
    ``G = dL/dA B^-T / s`` (``fc``, B square)."""
    spec, variables, base_grad, adapter_grad = full_rank_setup()
    variables = randomize_b(variables)
    s = spec.scale
    g_dense = base_grad(lora.merge(variables, spec))
    g = adapter_grad(variables)
    flat = flatten(variables)
    for layer in ("pw", "fc"):
        a = np.asarray(flat[f"params/{layer}/lora_a/kernel"], np.float64)
        b = np.asarray(flat[f"params/{layer}/lora_b/kernel"], np.float64)
        a, b = a.reshape(-1, 4), b.reshape(4, -1)  # [d_in, r], [r, d_out]
        dense = np.asarray(g_dense[f"params/{layer}/kernel"], np.float64).reshape(a.shape[0], -1)
        ga = np.asarray(g[f"params/{layer}/lora_a/kernel"]).reshape(a.shape)
        gb = np.asarray(g[f"params/{layer}/lora_b/kernel"]).reshape(b.shape)
        np.testing.assert_allclose(gb, s * a.T @ dense, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ga, s * dense @ b.T, rtol=1e-4, atol=1e-6)
        if layer == "pw":
            recovered = np.linalg.solve(a.T, gb) / s
        else:
            recovered = np.linalg.solve(b, ga.T).T / s
        np.testing.assert_allclose(recovered, dense, rtol=1e-3, atol=1e-6)


def test_sgd_step_on_full_rank_adapters_is_the_dense_step():
    """With A orthogonal and B = 0 (the initialisation), one SGD step of rate lr on B moves
    the merged kernel by ``s A dB = -lr s^2 A A^T G = -lr s^2 G``: the dense update direction."""
    spec, variables, base_grad, adapter_grad = full_rank_setup(seed=1)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(4, 4)))
    flat = dict(flatten(variables))
    flat["params/pw/lora_a/kernel"] = jnp.asarray(q.reshape(1, 1, 4, 4), jnp.float32)
    variables = unflatten(flat)
    lr, s = 0.1, spec.scale
    dense = base_grad(lora.merge(variables, spec))["params/pw/kernel"]  # B = 0: base weights
    gb = adapter_grad(variables)["params/pw/lora_b/kernel"]
    flat["params/pw/lora_b/kernel"] = -lr * gb
    moved = lora.merge(unflatten(flat), spec)["params"]["pw"]["kernel"] - flat["params/pw/kernel"]
    np.testing.assert_allclose(moved, -lr * s**2 * dense, rtol=1e-4, atol=1e-7)


def ghost_vs_vmap_fn(wrapped, frozen, clippers):
    loss = cross_entropy_loss(wrapped.apply)

    def per_example(p, example, key):
        return loss(p, frozen, example, key)

    fns = [
        C.clipped_grad(per_example, c, microbatch_size=4, norm_strategy=s)
        for c in clippers
        # no fallback: raises if any trainable leaf (an adapter) is not ghost-handled
        for s in (GhostNorms(allow_fallback=False), C.VmapNorms())
    ]
    return jax.jit(lambda *a: [f(*a) for f in fns], compiler_options=FAST_COMPILE)


def test_ghost_norms_handle_the_adapters_and_equal_vmap():
    _, _, wrapped, variables = tiny(lora.LoRASpec(2, targets=(".*",)))
    variables = randomize_b(variables)  # nonzero gradients for A as well
    trainable = lora.ADAPTERS + (r"(conv3|proj|mlp/Dense_0|linear)/bias",)
    params, frozen = partition(variables, trainable)
    n = 8
    x = images(n, seed=4) * jnp.logspace(-1.5, 1.0, n)[:, None, None, None]
    batch = {"image": x, "label": jnp.arange(n) % 3}
    mask = jnp.ones(n).at[-1].set(0.0)
    clippers = [C.FlatClip(3.0), C.PerLayerClip(3.0)]
    outs = ghost_vs_vmap_fn(wrapped, frozen, clippers)(params, batch, mask, jax.random.PRNGKey(0))
    for ghost, vmap in zip(outs[::2], outs[1::2], strict=True):
        np.testing.assert_allclose(ghost.norms, vmap.norms, rtol=1e-4)
        assert 0 < int(ghost.num_clipped) == int(vmap.num_clipped)
        assert set(ghost.grad_sum) == set(params)
        for k in params:
            x, y = np.asarray(ghost.grad_sum[k]), np.asarray(vmap.grad_sum[k])
            assert np.max(np.abs(y)) > 0, k
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * np.max(np.abs(y)), err_msg=k)
    assert int(outs[0].num_clipped) < n - 1  # the flat bound clips some examples, not all


def phase_spec(mode="", pretrained="", **finetune):
    c = base_config()
    c.model.pretrained = pretrained
    c.finetune.mode = mode
    for k, v in finetune.items():
        setattr(c.finetune, k, v)
    (phase,) = plan_phases(c, 10)
    return phase.trainable


def test_dp_steps_change_only_adapters_and_biases():
    spec = lora.LoRASpec(2)
    _, _, wrapped, variables = tiny(spec)
    trainable = phase_spec("bitfit", lora_rank=2, train_head=False)
    params, frozen = partition(variables, trainable)
    expected = {k for k in flatten(variables) if "/lora_" in k or k.endswith("/bias")}
    assert set(params) == expected
    clipper = C.FlatClip(1.0)
    tx = optim.dp_optimizer(
        "sgd", 0.5, noise_multiplier=1.0, l2_sensitivity=1.0, expected_batch_size=8.0, key=7
    )
    step = make_train_step(
        cross_entropy_loss(wrapped.apply),
        clipper,
        tx,
        microbatch_size=8,
        norm_strategy=GhostNorms(),
    )
    step = jax.jit(step, compiler_options=FAST_COMPILE)
    state = TrainState(jnp.asarray(0, jnp.int32), params, tx.init(params), frozen)
    batch = {"image": images(8, seed=6), "label": jnp.arange(8) % 3, "mask": jnp.ones(8)}
    for i in range(2):
        state, _ = step(state, batch, jax.random.PRNGKey(i))
    assert set(state.frozen) == set(frozen)
    for k, v in frozen.items():  # every base kernel, the norm scale: bitwise untouched
        np.testing.assert_array_equal(state.frozen[k], v, err_msg=k)
    for k, v in params.items():  # every adapter and bias moved
        assert not np.array_equal(state.params[k], v), k


def test_bitfit_trains_exactly_the_biases_and_the_head():
    model = get_model("resnet20", 10, norm="frozen_bn")
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    flat = flatten(variables)
    biases = {k for k in flat if k.startswith("params/") and k.rsplit("/", 1)[1] == "bias"}
    head = {k for k in flat if k.startswith("params/linear/")}
    assert len(biases) > 10 and head == {"params/linear/kernel", "params/linear/bias"}
    for train_head, expected in ((True, biases | head), (False, biases)):
        params, frozen = partition(variables, phase_spec("bitfit", train_head=train_head))
        assert set(params) == expected
        assert set(frozen) == set(flat) - expected
    # LoRA (default mode): the adapters and the head; in partial mode plus finetune.trainable
    assert phase_spec(lora_rank=4) == lora.ADAPTERS + (r"linear/.*",)
    assert phase_spec(lora_rank=4, train_head=False) == lora.ADAPTERS
    got = phase_spec(
        "partial", "resnet20", lora_rank=4, trainable=("layer3_2/.*",), train_head=False
    )
    assert set(got) == {*lora.ADAPTERS, "layer3_2/.*"}


@pytest.mark.parametrize(
    "finetune, match",
    [
        ({"lora_rank": -1}, "finetune.lora_rank must be an integer >= 0"),
        ({"lora_rank": 2, "lora_alpha": -1.0}, "finetune.lora_alpha must be a number >= 0"),
        ({"lora_rank": 2, "lora_targets": ("conv[",)}, "finetune.lora_targets: 'conv\\['"),
        ({"lora_rank": 2, "mode": "head"}, "lora_rank=2 adds adapters that mode 'head'"),
        ({"lora_rank": 2, "mode": "full"}, "lora_rank=2 adds adapters that mode 'full'"),
    ],
)
def test_bad_lora_settings_give_one_line(finetune, match):
    c = base_config()
    c.model.pretrained = "resnet20"
    for k, v in finetune.items():
        setattr(c.finetune, k, v)
    with pytest.raises(ValueError, match=match) as e:
        plan_phases(c, 10)
    assert "\n" not in str(e.value)


class ConvNet(nn.Module):
    """k x k convolutions and the head only, as in the option-A CIFAR ResNets."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(x))
        return nn.Dense(3, name="linear")(jnp.mean(x, axis=(1, 2)))


def test_targets_matching_no_layer_name_the_layers():
    model = ConvNet()
    x = images(1)
    v = jax.jit(model.init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"matches no .*conv1, conv2, linear.*lora_targets=") as e:
        lora.attach(model, v, lora.LoRASpec(2), x, jax.random.PRNGKey(1))
    assert "\n" not in str(e.value)
    spec = lora.LoRASpec(2, targets=(r"conv\d",))
    _, adapted = lora.attach(model, v, spec, x, jax.random.PRNGKey(1))
    assert adapter_layers(adapted) == {"conv1", "conv2"}


try:
    paths.data_file("fashion-mnist/train-images-idx3-ubyte.gz")
    HAVE_DATA = True
except paths.DataError:
    HAVE_DATA = False


@pytest.mark.skipif(not HAVE_DATA, reason="no data dir (set DPFT_DATA_DIR)")
def test_trainer_with_lora_trains_only_the_adapters(tmp_path):
    c = base_config()
    c.name = "lora"
    c.tensorboard = False
    c.model.name = "sample_convnet"
    c.data.train_subset = 64
    c.data.eval_subset = 32
    c.finetune.lora_rank = 2
    c.dp.noise_multiplier = 1.0
    c.dp.delta = 1e-3
    c.train.batch_size = 8
    c.train.max_batch_size = 16
    c.train.steps = 2
    c.train.learning_rate = 0.5
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval_batch_size = 32
    summary = train_and_evaluate(c, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert summary["phases"] == {"train": 2} and np.isfinite(summary["epsilon"])
    # the checkpointed state: (step, trainable params, optimizer state, frozen), leaf by leaf
    from dpft.train import build

    _, variables = build.build_model(c, 10, np.zeros((28, 28, 1), np.float32))
    params, frozen = partition(variables, plan_phases(c, 2)[0].trainable)
    assert set(params) == {k for k in flatten(variables) if "/lora_" in k or "/linear/" in k}
    ck = Checkpointer(tmp_path)
    arrays, meta = ck.load_arrays(ck.latest_step())
    ck.close()
    assert meta["step"] == 2
    for got, k in zip(arrays[-len(frozen) :], sorted(frozen), strict=True):
        np.testing.assert_array_equal(got, frozen[k], err_msg=k)  # the base: untouched
    moved = arrays[1 : 1 + len(params)]
    for got, k in zip(moved, sorted(params), strict=True):
        assert not np.array_equal(got, params[k]), k
