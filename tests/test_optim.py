"""DP optimizers: no clipping + no noise equals plain optax on the batch mean."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpft import optim
from dpft.privacy import clipping as C


def loss(params, example, rng):
    del rng
    pred = example["x"] @ params["w"] + params["b"]
    return 0.5 * jnp.sum((pred - example["y"]) ** 2), ()


def setup(b=16):
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(k[0], (4, 2)), "b": jnp.zeros(2)}
    batch = {"x": jax.random.normal(k[1], (b, 4)), "y": jax.random.normal(k[2], (b, 2))}
    return params, batch


@pytest.mark.parametrize(
    "name, base",
    [
        ("sgd", lambda: optax.sgd(0.1, momentum=0.9, nesterov=True)),
        ("adam", lambda: optax.adam(0.01)),
        ("lamb", lambda: optax.lamb(0.01)),
    ],
)
def test_no_clip_no_noise_equals_plain_optimizer(name, base):
    params, batch = setup()
    b = batch["x"].shape[0]
    kwargs = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    lr = 0.1 if name == "sgd" else 0.01
    dp_tx = optim.dp_optimizer(
        name,
        lr,
        noise_multiplier=0.0,
        l2_sensitivity=float("inf"),
        expected_batch_size=b,
        key=0,
        **kwargs,
    )
    tx = base()
    grad_sum_fn = jax.jit(C.clipped_grad(loss, C.FlatClip(float("inf")), microbatch_size=5))

    def mean_loss(p):
        return jnp.mean(jax.vmap(lambda e: loss(p, e, None)[0])(batch))

    p_dp, s_dp = params, dp_tx.init(params)
    p_ref, s_ref = params, tx.init(params)
    for _ in range(4):
        g = grad_sum_fn(p_dp, batch, jnp.ones(b), jax.random.PRNGKey(0)).grad_sum
        u, s_dp = dp_tx.update(g, s_dp, p_dp)
        p_dp = optax.apply_updates(p_dp, u)
        u, s_ref = tx.update(jax.grad(mean_loss)(p_ref), s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    for k in params:
        np.testing.assert_allclose(p_dp[k], p_ref[k], rtol=2e-5, atol=1e-6)
        assert not np.allclose(p_dp[k], params[k])


def test_normalizes_by_expected_not_realized_batch():
    tx = optim.dp_sgd(1.0, noise_multiplier=0.0, l2_sensitivity=1.0, expected_batch_size=8, key=0)
    g = {"w": jnp.full(3, 4.0)}  # a sum over however many examples were realised
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["w"], -0.5)


def test_noise_reaches_the_update_with_std_over_expected_batch():
    tx = optim.dp_sgd(1.0, noise_multiplier=2.0, l2_sensitivity=1.5, expected_batch_size=10, key=1)
    g = {"w": jnp.zeros(20000)}
    u, _ = tx.update(g, tx.init(g))
    assert np.std(np.asarray(u["w"])) == pytest.approx(2.0 * 1.5 / 10, rel=0.03)


def test_schedules_and_bad_names():
    sched = optim.make_schedule(1.0, total_steps=100, kind="cosine", warmup_steps=10)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        optim.dp_optimizer(
            "rmsprop", 0.1, noise_multiplier=1.0, l2_sensitivity=1.0, expected_batch_size=1, key=0
        )
    with pytest.raises(ValueError, match="expected_batch_size"):
        optim.normalize_by_expected_batch(0)


@pytest.mark.parametrize(
    "clipper",
    [C.FlatClip(0.7), C.PerLayerClip(0.5), C.AutoClip(scale=2.0), C.GlobalClip(1.5, threshold=3.0)],
    ids=lambda c: type(c).__name__,
)
def test_clipped_grad_carries_the_sensitivity_the_optimizers_take(clipper):
    """One adversarial example moves the clipped sum by at most ``grad_fn.l2_sensitivity``,
    and for flat and per-layer clipping by exactly that much: the bound is the right one."""
    params, batch = setup(8)
    grad_fn = C.clipped_grad(loss, clipper)
    bound = grad_fn.l2_sensitivity(params)
    assert grad_fn.clipper is clipper and bound == clipper.sensitivity(params)
    mask = jnp.ones(8).at[-1].set(0.0)
    far = {"x": batch["x"].at[-1].set(50.0), "y": batch["y"].at[-1].set(-1e3)}
    without = grad_fn(params, far, mask, jax.random.PRNGKey(0)).grad_sum
    with_it = grad_fn(params, far, jnp.ones(8), jax.random.PRNGKey(0)).grad_sum
    diff = jnp.sqrt(
        sum(
            jnp.sum((a - b) ** 2)
            for a, b in zip(
                jax.tree_util.tree_leaves(with_it), jax.tree_util.tree_leaves(without), strict=True
            )
        )
    )
    assert float(diff) <= bound * (1 + 1e-5)
    if isinstance(clipper, C.FlatClip | C.PerLayerClip):
        np.testing.assert_allclose(float(diff), bound, rtol=1e-4)
