"""GhostNorms gives the same per-example norms and clipped sums as VmapNorms."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpft.models import get_model
from dpft.privacy import clipping as C
from dpft.privacy.ghost import GhostNorms
from dpft.train.step import cross_entropy_loss, partition

RTOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0}


class Mixed(nn.Module):
    """Layers that exercise the unfolding, ghost/direct choice, sharing and fallback paths."""

    @nn.compact
    def __call__(self, x):  # x [N, 7, 7, 3]
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), padding="SAME")(x))  # 4x4, direct
        x = nn.Conv(8, (3, 3), kernel_dilation=(2, 2), padding="CIRCULAR", use_bias=False)(x)
        x = nn.GroupNorm(num_groups=4)(x)  # fallback: per-example scale/bias
        x = nn.Conv(16, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x)  # 2x2, ghost
        x = nn.Conv(16, (3, 3), padding="SAME", feature_group_count=2)(nn.relu(x))  # ghost
        x = nn.Conv(16, (1, 1), feature_group_count=4)(nn.relu(x))  # grouped, direct
        mask = jnp.tril(jnp.ones((1, 1, 16, 16)))
        x = nn.Conv(16, (1, 1), mask=mask)(x)  # masked kernel: not supported, fallback
        seq = x.reshape(x.shape[0], 4, 16)  # a 4-token sequence per image
        shared = nn.Dense(16, name="shared")
        seq = shared(nn.tanh(shared(seq)))  # one kernel, two calls, T = 4
        seq = nn.LayerNorm()(seq)
        x = nn.Conv(6, (3,), padding="CAUSAL")(seq)  # 1-d conv on the sequence
        return nn.Dense(5, name="linear")(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.tanh(nn.Dense(24)(x))
        x = nn.relu(nn.Dense(12, use_bias=False)(x))
        return nn.Dense(4, name="linear")(x)


def setup(model, shape, b, classes, seed=0, trainable=(".*",), spread=True, eager_init=False):
    """(per-example loss as the trainer builds it, trainable params, batch).

    The parameters come from one compiled ``model.init`` (LLVM optimisation off), not from an
    eager init that compiles each of its ops, unless ``eager_init`` (ops compiled already).
    """
    rng = np.random.default_rng(seed)
    init = model.init if eager_init else jax.jit(model.init, compiler_options=FAST_COMPILE)
    variables = init(jax.random.PRNGKey(seed), jnp.zeros((1, *shape)))
    params, frozen = partition(variables, trainable)
    # non-trivial frozen statistics (frozen_bn): x_hat != x
    frozen = {
        k: jnp.asarray(rng.uniform(0.5, 2.0, v.shape) if k.endswith("var") else 0.1 * v + 0.1)
        if k.startswith("batch_stats/")
        else v
        for k, v in frozen.items()
    }
    loss = cross_entropy_loss(model.apply)

    def per_example(p, example, key):
        return loss(p, frozen, example, key)

    x = rng.normal(size=(b, *shape))
    if spread:  # gradient norms over orders of magnitude: fixed thresholds clip some, not all
        x *= np.logspace(-1.5, 1.5, b).reshape((b,) + (1,) * len(shape))
    batch = {
        "image": jnp.asarray(x, jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, size=b), jnp.int32),
    }
    return per_example, params, batch


def compare(per_example, clippers, params, batch, mask, microbatch=None, ghost=None):
    """Runs GhostNorms and VmapNorms for every clipper in ONE jitted function (one compile)."""
    ghost = ghost or GhostNorms()
    fns = [
        C.clipped_grad(per_example, c, microbatch_size=microbatch, norm_strategy=s)
        for c in clippers
        for s in (ghost, C.VmapNorms())
    ]
    # LLVM optimisation off: compiling dominates these tests, running them takes milliseconds
    fn = jax.jit(lambda *a: [f(*a) for f in fns], compiler_options=FAST_COMPILE)
    outs = fn(params, batch, mask, jax.random.PRNGKey(3))
    for i in range(len(clippers)):
        assert_same(outs[2 * i], outs[2 * i + 1])
    return outs[::2]


def assert_same(a, b, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(a.norms), np.asarray(b.norms), rtol=rtol)
    np.testing.assert_allclose(np.asarray(a.loss), np.asarray(b.loss), rtol=rtol)
    assert int(a.num_nonfinite) == int(b.num_nonfinite)
    assert int(a.num_clipped) == int(b.num_clipped)
    assert jax.tree_util.tree_structure(a.grad_sum) == jax.tree_util.tree_structure(b.grad_sum)
    for k in a.grad_sum:
        x, y = np.asarray(a.grad_sum[k]), np.asarray(b.grad_sum[k])
        assert x.dtype == np.float32 and np.all(np.isfinite(x)), k
        # entries near zero: compare on the scale of the whole leaf
        atol = rtol * max(float(np.max(np.abs(y))), 1e-12)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=k)


def by_module(path):
    return path.rsplit("/", 1)[0]  # kernel and bias of a module form one group


@pytest.mark.parametrize("name", ["mlp", "mixed"])
def test_small_models_all_clippers_mask_and_nan(name):
    model, shape = (MLP(), (5, 3)) if name == "mlp" else (Mixed(), (7, 7, 3))
    per_example, params, batch = setup(model, shape, 8, 4)
    mask = jnp.asarray([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
    image = np.array(batch["image"])
    image[6] = 1e4  # garbage in a padding row: ignored
    image[1, 0] = np.nan  # a real example with a NaN input: dropped and counted, alone
    batch = {**batch, "image": jnp.asarray(image)}
    c = 2.0 if name == "mlp" else 20.0  # between the norms of this batch (1 to 30)
    clippers = [
        C.FlatClip(c),
        C.GlobalClip(clip_norm=1.5 * c),  # keeps norms <= 1.5 c as they are, drops others
        C.AutoClip(gamma=0.01),
        C.PerLayerClip(c / 2, group_fn=by_module),
    ]
    if name == "mixed":  # the clipping rules are model-independent: keep the compile small
        clippers = [clippers[0], clippers[3]]
    outs = compare(
        per_example, clippers, params, batch, mask, microbatch=3 if name == "mlp" else None
    )
    for i, out in enumerate(outs):
        assert int(out.num_nonfinite) == 1
        norms = np.asarray(out.norms)
        assert np.isinf(norms[1]) and np.all(np.isfinite(norms[[0, 2, 3, 4, 5]]))
        if isinstance(clippers[i], (C.FlatClip, C.GlobalClip)):  # some kept as they are
            assert 0 < int(out.num_clipped) < 5, clippers[i]


def test_sample_convnet_and_linear_head():
    per_example, params, batch = setup(get_model("sample_convnet", 10), (28, 28, 1), 4, 10)
    (out,) = compare(per_example, [C.FlatClip(10.0)], params, batch, jnp.ones(4))
    assert 0 < int(out.num_clipped) < 4

    # the linear head on 64-d features; every leaf is covered, so no fallback is needed
    per_example, params, batch = setup(get_model("linear", 10), (64,), 6, 10)
    mask = jnp.asarray([1, 1, 1, 1, 0, 1], jnp.float32)
    clipper = C.PerLayerClip({"params/linear/kernel": 1.0, "params/linear/bias": 0.2})
    compare(per_example, [clipper], params, batch, mask, 4, GhostNorms(allow_fallback=False))


@pytest.mark.parametrize("norm", ["group_norm", "frozen_bn"])
def test_resnet20(norm):
    model = get_model("resnet20", 10, norm=norm)
    per_example, params, batch = setup(model, (32, 32, 3), 2, 10, spread=False)
    clipper = C.AutoClip() if norm == "group_norm" else C.PerLayerClip(0.05, group_fn=by_module)
    (out,) = compare(per_example, [clipper], params, batch, jnp.ones(2))
    assert int(out.num_clipped) == 2


# Every model family of the registry, i.e. every model `python -m dpft` builds (its default
# `dp.norms` is 'ghost'), in the configurations not covered above: ghost norms must give the
# same norms and clipped sums as per-example gradients. Small inputs keep the compiles short.
@pytest.mark.parametrize(
    "name,shape,kwargs",
    [
        ("tramer_boneh_cnn", (28, 28, 1), {}),
        ("sample_convnet", (28, 28, 1), {"conv": "im2col"}),
        ("wrn16_4", (8, 8, 3), {"groups": 4}),
        ("resnet18", (32, 32, 3), {"norm": "frozen_bn"}),  # 7x7/2 stem, max-pool
        pytest.param(  # bottleneck blocks, GroupNorm; no config uses them (25 s of compile)
            "resnet50",
            (32, 32, 3),
            {"stem": "cifar", "groups": 8},
            marks=pytest.mark.skipif(
                not os.environ.get("DPFT_SLOW_TESTS"), reason="set DPFT_SLOW_TESTS=1"
            ),
        ),
    ],
)
def test_every_model_family(name, shape, kwargs):
    per_example, params, batch = setup(get_model(name, 5, **kwargs), shape, 2, 5, spread=False)
    compare(per_example, [C.FlatClip(1e-3)], params, batch, jnp.ones(2))


def test_bf16_activations():
    """With bfloat16 activations both strategies see the same rounded tensors; the norms and
    sums are accumulated in float32 by both, so they agree to bfloat16 precision."""
    model = get_model("sample_convnet", 10, dtype=jnp.bfloat16)
    per_example, params, batch = setup(model, (28, 28, 1), 4, 10)
    fns = [
        C.clipped_grad(per_example, C.FlatClip(10.0), norm_strategy=s)
        for s in (GhostNorms(), C.VmapNorms())
    ]
    fn = jax.jit(lambda *a: [f(*a) for f in fns], compiler_options=FAST_COMPILE)
    ghost, vmap = fn(params, batch, jnp.ones(4), jax.random.PRNGKey(3))
    assert_same(ghost, vmap, rtol=2e-2)


def test_frozen_layers_and_trainable_subset():
    # only the head and the bias of fc1 are trainable; conv kernels are closed over
    model = get_model("sample_convnet", 10)
    trainable = ("linear/.*", "fc1/bias")
    per_example, params, batch = setup(model, (28, 28, 1), 4, 10, trainable=trainable)
    assert sorted(params) == ["params/fc1/bias", "params/linear/bias", "params/linear/kernel"]
    compare(per_example, [C.FlatClip(0.3)], params, batch, jnp.ones(4), None, GhostNorms(False))


def test_uncovered_parameters_named_without_fallback():
    per_example, params, batch = setup(Mixed(), (7, 7, 3), 2, 4)
    fn = C.clipped_grad(per_example, C.FlatClip(1.0), norm_strategy=GhostNorms(False))
    with pytest.raises(ValueError) as err:
        fn(params, batch, jnp.ones(2), jax.random.PRNGKey(0))
    msg = str(err.value)
    for path in ("GroupNorm_0/scale", "LayerNorm_0/bias", "Conv_5/kernel", "Conv_5/bias"):
        assert path in msg
    assert "masked kernel" in msg
    for path in ("Conv_0/kernel", "Conv_3/kernel", "shared/kernel", "linear/bias"):
        assert path not in msg


def test_all_examples_dropped_gives_zero():
    per_example, params, batch = setup(MLP(), (5, 3), 3, 4)
    batch = {**batch, "image": batch["image"].at[0].set(jnp.inf)}
    fn = C.clipped_grad(per_example, C.FlatClip(1.0), norm_strategy=GhostNorms())
    fn = jax.jit(fn, compiler_options=FAST_COMPILE)
    out = fn(params, batch, jnp.asarray([1.0, 0, 0]), jax.random.PRNGKey(0))
    assert int(out.num_nonfinite) == 1
    for v in out.grad_sum.values():
        np.testing.assert_array_equal(np.asarray(v), 0.0)


def test_conv_kernel_grads_built_in_chunks(monkeypatch):
    """Per-example conv gradients built one example at a time (lax.map) equal VmapNorms'."""
    from dpft.privacy import unfold

    monkeypatch.setattr(unfold, "CHUNK_ABOVE_BYTES", 0)  # chunk every direct convolution
    per_example, params, batch = setup(Mixed(), (7, 7, 3), 5, 4)
    mask = jnp.asarray([1, 1, 1, 0, 1], jnp.float32)
    ghost = GhostNorms(conv_chunk_bytes=1)
    (out,) = compare(per_example, [C.FlatClip(20.0)], params, batch, mask, None, ghost)
    assert 0 < int(out.num_clipped) < 4
