"""Adaptive quantile clipping: the update, the count noise, the multiplier split, the wiring."""

import importlib.util
import inspect
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import needs_data

from dpft import optim
from dpft.config import base_config
from dpft.privacy import accounting, adaptive, clipping, keys, ledger, noise
from dpft.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _hyper(**kw):
    d = dict(target_quantile=0.5, learning_rate=0.2, count_noise=0.0, expected_count=100.0)
    d.update(kw)
    return d


def _adaptive_sgd(learning_rate=1.0, **kw):
    """`optim.dp_adaptive_optimizer` of SGD (learning rate 1 unless given) with the clip norm
    starting at 1, key 0, target quantile 0.5 and clip learning rate 0.2; ``kw`` sets the rest
    (noise_multiplier, expected_batch_size, count_noise) or overrides those."""
    d = dict(initial_clip_norm=1.0, key=0, target_quantile=0.5, clip_learning_rate=0.2)
    d.update(kw)
    return optim.dp_adaptive_optimizer("sgd", learning_rate, **d)


# ------------------------------------------------------------------------------------------
# The pure pieces
# ------------------------------------------------------------------------------------------


def test_public_functions_have_privacy_sections():
    for name in adaptive.__all__:
        obj = getattr(adaptive, name)
        if inspect.isfunction(obj) and name not in ("init_state", "find_state"):
            assert "Privacy:" in (obj.__doc__ or ""), name
    assert "Privacy:" in adaptive.FlatClipAt.__doc__
    assert "Privacy:" in optim.dp_adaptive_optimizer.__doc__


def test_update_matches_the_closed_form_on_a_fixed_stream_of_norms():
    rng = np.random.default_rng(0)
    stream = [rng.lognormal(0.0, 1.0, size=50) for _ in range(30)]  # one batch of norms a step
    gamma, eta, b = 0.3, 0.2, 64.0  # expected batch 64, realised 50: b uses the public 64
    state = adaptive.init_state(2.0)
    c = 2.0
    for norms in stream:
        centred = adaptive.centred_unclipped_count(
            jnp.asarray(norms, jnp.float32), jnp.ones(50), state.clip_norm
        )
        state = adaptive.update_state(
            state,
            keys.root_key(1),
            centred,
            **_hyper(target_quantile=gamma, learning_rate=eta, expected_count=b),
        )
        frac = 0.5 + (np.sum(norms <= c) - 0.5 * len(norms)) / b
        c = c * math.exp(-eta * (frac - gamma))
        np.testing.assert_allclose(float(state.fraction), frac, rtol=1e-6)
        np.testing.assert_allclose(float(state.clip_norm), c, rtol=1e-5)
    assert int(state.step) == len(stream)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
def test_noiseless_clip_norm_converges_to_the_target_quantile(gamma):
    norms = jnp.asarray(np.random.default_rng(1).lognormal(0.0, 1.0, size=2000), jnp.float32)
    mask = jnp.ones(norms.shape)
    hyper = _hyper(target_quantile=gamma, learning_rate=0.05, expected_count=2000.0)

    @jax.jit
    def run(state):
        def body(s, _):
            centred = adaptive.centred_unclipped_count(norms, mask, s.clip_norm)
            return adaptive.update_state(s, keys.root_key(0), centred, **hyper), s.clip_norm

        return jax.lax.scan(body, state, None, length=800)

    final, trace = run(adaptive.init_state(50.0))  # far above every quantile at the start
    c = float(final.clip_norm)
    assert abs(float(jnp.mean(norms <= c)) - gamma) < 0.02
    np.testing.assert_allclose(c, np.quantile(np.asarray(norms), gamma), rtol=0.1)
    assert float(trace[0]) == 50.0 and float(trace[-1]) < 50.0


def test_centred_count_ignores_padding_and_counts_nonfinite_as_clipped():
    norms = jnp.asarray([0.5, 2.0, jnp.inf, jnp.nan, 0.1, 0.1])
    mask = jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    # real rows: 0.5 unclipped (+1/2), 2.0 clipped, inf and nan clipped (-1/2 each)
    assert float(adaptive.centred_unclipped_count(norms, mask, 1.0)) == -1.0


def test_count_noise_has_std_sigma_b_and_its_own_keys():
    sigma_b, b, centred = 3.2, 64.0, 7.0
    key = keys.root_key(3)
    fracs = jax.vmap(
        lambda t: adaptive.noisy_unclipped_fraction(adaptive.count_key(key, t), centred, sigma_b, b)
    )(jnp.arange(20000))
    noise_draws = np.asarray((fracs - 0.5) * b - centred, np.float64)
    # N(0, sigma_b^2): a KS test at level 1e-3, and the std within 3% (its sd is ~0.5%)
    assert scipy.stats.kstest(noise_draws / sigma_b, "norm").pvalue > 1e-3
    assert abs(noise_draws.std() / sigma_b - 1) < 0.03
    # the noise-free estimate is the centred count over the PUBLIC expected count
    zero = adaptive.noisy_unclipped_fraction(adaptive.count_key(key, 0), centred, 0.0, b)
    assert float(zero) == pytest.approx(0.5 + centred / b)
    # disjoint from the gradient noise's keys of the same privatizer key and step
    for t in range(4):
        ck = tuple(np.asarray(adaptive.count_key(key, t)))
        sk = noise.step_key(key, t)
        others = [sk] + [keys.derive(sk, "leaf", j) for j in range(8)]
        assert all(ck != tuple(np.asarray(o)) for o in others)


def test_multiplier_split_composes_to_the_reported_epsilon():
    q, steps, delta = 0.05, 200, 1e-5
    for z, sigma_b in [(0.8, 3.2), (1.1, 12.8), (2.0, 1.5), (0.5, 0.3)]:
        zd = adaptive.split_noise_multiplier(z, sigma_b)
        assert zd > z  # the gradient gets less noise than the total: the count takes a share
        assert adaptive.joint_noise_multiplier(zd, sigma_b) == pytest.approx(z, rel=1e-12)
        # The joint release, stated from scratch: gradient sum (sensitivity C, std zd C) and
        # centred count (sensitivity 1/2, std sigma_b). Rescale the count to std zd C; the
        # vector's L2 sensitivity is then sqrt(C^2 + (zd C / sigma_b / 2)^2).
        c = 0.37
        s = zd * c
        joint = math.sqrt(c**2 + (s / sigma_b * 0.5) ** 2)
        eps_joint = accounting.compute_epsilon(accounting.GaussianSteps(s / joint, q, steps), delta)
        eps_reported = accounting.compute_epsilon(accounting.GaussianSteps(z, q, steps), delta)
        assert eps_joint == pytest.approx(eps_reported, rel=1e-6)
    assert adaptive.split_noise_multiplier(0.0, 1.0) == 0.0


def test_joint_sensitivity_is_attained_by_adversarial_neighbours():
    # D vs D + one example: the (sum, count) difference, count rescaled as in the split.
    c, zd, sigma_b = 0.5, 1.3, 2.0
    fn = clipping.clipped_grad(lambda p, x, k: (jnp.dot(p, x), ()), adaptive.FlatClipAt(c))
    base = jnp.asarray(np.random.default_rng(2).normal(size=(8, 5)), jnp.float32)
    worst = 0.0
    for extra in (jnp.full(5, 1e6), jnp.full(5, 1e-3), jnp.zeros(5), -jnp.full(5, 1e3)):
        d1 = jnp.concatenate([base, extra[None]])
        m0 = jnp.concatenate([jnp.ones(8), jnp.zeros(1)])
        m1 = jnp.ones(9)
        p = jnp.zeros(5)
        o0, o1 = fn(p, d1, m0, keys.root_key(0)), fn(p, d1, m1, keys.root_key(0))
        dsum = float(jnp.linalg.norm(o1.grad_sum - o0.grad_sum))
        dcount = float(
            adaptive.centred_unclipped_count(o1.norms, m1, c)
            - adaptive.centred_unclipped_count(o0.norms, m0, c)
        )
        assert dsum <= c * (1 + 1e-6) and abs(dcount) == 0.5
        worst = max(worst, math.hypot(dsum, dcount * zd * c / sigma_b))
    bound = c * math.sqrt(1 + (zd / (2 * sigma_b)) ** 2)
    assert worst <= bound * (1 + 1e-6) and worst >= bound * (1 - 1e-4)  # the 1e6 example


def test_refuses_count_noise_too_small_for_the_total():
    with pytest.raises(ValueError, match="z_delta is undefined"):
        adaptive.split_noise_multiplier(1.0, 0.5)  # 2 sigma_b == z
    with pytest.raises(ValueError, match="z_delta is undefined"):
        adaptive.split_noise_multiplier(1.0, 0.0)
    with pytest.raises(ValueError, match="z_delta is undefined"):
        # the default sigma_b = expected batch / 20 = 1 <= 2
        _adaptive_sgd(noise_multiplier=4.0, expected_batch_size=20.0, learning_rate=0.1)


# ------------------------------------------------------------------------------------------
# The privatizer and the train step
# ------------------------------------------------------------------------------------------


def _privatizer(z=1.0, c0=1.0, sigma_b=5.0, b=10.0):
    return adaptive.adaptive_privatizer(z, c0, 0, **_hyper(count_noise=sigma_b, expected_count=b))


def test_privatizer_noise_uses_the_current_clip_norm():
    z, sigma_b = 1.0, 5.0
    zd = adaptive.split_noise_multiplier(z, sigma_b)
    tx = _privatizer(z, 1.0, sigma_b)
    zeros = {"w": jnp.zeros(200_000)}
    state = tx.init(zeros)
    for c in (1.0, 0.05, 7.0):
        state = state._replace(clip=state.clip._replace(clip_norm=jnp.float32(c)))
        out, new = tx.update(zeros, state, centred_count=jnp.float32(0.0))
        assert float(jnp.std(out["w"])) == pytest.approx(zd * c, rel=0.01)
        assert int(new.count) == int(state.count) + 1
        state = new
    with pytest.raises(ValueError, match="centred_count"):
        tx.update(zeros, state)


def _linear_step(clip_norm_now, z=0.0):
    """A step whose per-example gradient is the example itself (loss <w, x>), SGD lr 1."""

    def loss_fn(params, frozen, example, rng):
        del frozen, rng
        return jnp.dot(params["w"], example["image"]), {"correct": jnp.float32(0)}

    b = 4.0
    tx = _adaptive_sgd(noise_multiplier=z, expected_batch_size=b, count_noise=1.0)
    params = {"w": jnp.zeros(6)}
    opt = tx.init(params)
    priv = opt[0]
    opt = (priv._replace(clip=priv.clip._replace(clip_norm=jnp.float32(clip_norm_now))),) + opt[1:]
    state = step_lib.TrainState(jnp.int32(0), params, opt, {})
    step = jax.jit(step_lib.make_train_step(loss_fn, clipping.FlatClip(1.0), tx))
    return step, state, b


def test_train_step_clips_at_the_current_clip_norm_under_adversarial_gradients():
    c_now = 0.25  # the static clipper says 1.0: the step must clip at the traced 0.25
    step, state, b = _linear_step(c_now)
    rows = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    evil = np.full((1, 6), 1e4, np.float32)
    mask0 = np.asarray([1, 1, 1, 0, 0], np.float32)  # D: 3 examples; D': the adversarial one
    mask1 = np.asarray([1, 1, 1, 0, 1], np.float32)
    image = np.concatenate([rows, evil])
    s0, m0 = step(
        state, {"image": image, "label": np.zeros(5, np.int32), "mask": mask0}, keys.root_key(0)
    )
    s1, m1 = step(
        state, {"image": image, "label": np.zeros(5, np.int32), "mask": mask1}, keys.root_key(0)
    )
    diff = float(jnp.linalg.norm(s1.params["w"] - s0.params["w"])) * b  # lr 1, sum / B
    assert diff == pytest.approx(c_now, rel=1e-4)
    assert float(m0["clip_norm"]) == pytest.approx(c_now)
    # the same count noise (same key); one clipped example more: the fraction drops by 1/(2B)
    frac0, frac1 = float(m0["unclipped_fraction"]), float(m1["unclipped_fraction"])
    assert frac0 - frac1 == pytest.approx(0.5 / b, abs=1e-6)
    c0 = float(adaptive.find_state(s0.opt_state).clip.clip_norm)
    assert c0 == pytest.approx(c_now * math.exp(-0.2 * (frac0 - 0.5)), rel=1e-5)


def test_a_step_that_does_not_pass_the_count_is_refused():
    _, state, _ = _linear_step(0.5)
    tx = _adaptive_sgd(noise_multiplier=0.0, expected_batch_size=4.0)
    sums = step_lib.BatchSums(*(jnp.float32(0),) * 5)
    with pytest.raises(ValueError, match="centred_count"):
        step_lib.apply_dp_update(tx, state, state.params, sums)  # e.g. host-chunked finish


def test_config_refusals():
    c = base_config()
    assert not optim.check_adaptive(c)
    c.dp.adaptive_quantile = 0.5
    assert optim.check_adaptive(c)
    for key, value, what in [
        ("dp.clipping", "per_layer", "clipping='flat'"),
        ("train.host_chunk_size", 32, "host_chunk_size"),
        ("dp.clip_norm", float("inf"), "infinite"),
        ("dp.adaptive_quantile", 1.5, r"\(0, 1\]"),
    ]:
        bad = base_config()
        bad.dp.adaptive_quantile = 0.5
        section, name = key.split(".")
        setattr(getattr(bad, section), name, value)
        with pytest.raises(ValueError, match=what):
            optim.check_adaptive(bad)


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------


def _smoke_config():
    spec = importlib.util.spec_from_file_location("fmnist_cnn", ROOT / "configs/fmnist_cnn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("smoke")
    c.tensorboard = False
    c.plots = False
    c.train.log_every = 1
    c.dp.adaptive_quantile = 0.5
    return c


@needs_data
def test_trainer_logs_a_changing_clip_norm_and_the_epsilon_of_the_same_z(tmp_path):
    from dpft.train import build, train_and_evaluate

    c = _smoke_config()
    summary = train_and_evaluate(c, tmp_path / "adaptive")
    records = [json.loads(x) for x in open(tmp_path / "adaptive" / "metrics.jsonl")]
    norms = [r["clip_norm"] for r in records if "clip_norm" in r]
    assert len(norms) == c.train.steps and norms[0] == pytest.approx(c.dp.clip_norm)
    assert len(set(norms)) == len(norms)  # moves every step
    assert all(math.isfinite(r["unclipped_fraction"]) for r in records)
    assert records[-1]["epsilon"] == summary["epsilon"]
    # the same z and the same accounting as the run without adaptive clipping
    fixed = _smoke_config()
    fixed.dp.adaptive_quantile = 0.0
    plan = build.plan_privacy(fixed, summary["num_train_examples"])
    assert summary["noise_multiplier"] == plan.noise_multiplier > 0
    spent = ledger.PrivacyLedger()
    spent.record(plan.entry(), c.train.steps)
    assert summary["epsilon"] == pytest.approx(spent.epsilon(plan.delta, plan.accountant), rel=1e-9)


# ------------------------------------------------------------------------------------------
# Federated (client level)
# ------------------------------------------------------------------------------------------


def test_adaptive_private_mean_clips_at_the_current_norm_and_counts_clients():
    from dpft.privacy import clients as dp_clients

    c_now, expected = 0.3, 4.0
    clip = adaptive.init_state(5.0)._replace(clip_norm=jnp.float32(c_now))
    ups = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32) * 0.01  # norms < C
    ups[3] = 1e30  # adversarial: huge
    ups[4, 0] = np.nan  # non-finite: contributes zero, counted as clipped
    hyper = dict(target_quantile=0.5, learning_rate=0.2, count_noise=0.0)

    def run(mask):
        return dp_clients.adaptive_private_mean(
            {"u": jnp.asarray(ups)},
            jnp.asarray(mask, jnp.float32),
            clip,
            noise_multiplier=0.0,
            noise_key=keys.root_key(0),
            expected_clients=expected,
            **hyper,
        )

    m0, n0, _, _ = run([1, 1, 1, 0, 1])
    m1, n1, _, _ = run([1, 1, 1, 1, 1])
    diff = float(jnp.linalg.norm(m1["u"] - m0["u"])) * expected
    assert diff == pytest.approx(c_now, rel=1e-5)
    # 3 small updates unclipped (+3/2), the NaN one clipped (-1/2): centred count 1
    assert float(n0.fraction) == pytest.approx(0.5 + 1.0 / expected)
    assert float(n1.fraction) == pytest.approx(0.5 + 0.5 / expected)
    assert float(n0.clip_norm) == pytest.approx(c_now * math.exp(-0.2 * (0.5 + 1 / expected - 0.5)))


def test_federated_round_tracks_the_client_clip_norm():
    from dpft.federated import driver, partition, server
    from tests.test_federated import setup

    model, params, frozen, data = setup(n=48)
    clients = partition.iid(data["label"], 6, seed=0)
    config = driver.FedConfig(rounds=3, dp="client", noise_multiplier=0.5, client_clip=5.0)
    plan = driver.make_plan(config, [len(c) for c in clients])
    tx = server.make_server_optimizer("sgd", 1.0)
    hyper = {"target_quantile": 0.5, "learning_rate": 0.5, "count_noise": 2.0}
    state = server.ServerState(
        jnp.zeros([], jnp.int32), params, tx.init(params), adaptive.init_state(5.0)
    )
    round_fn = driver.make_round(
        step_lib.cross_entropy_loss(model.apply), config, plan, tx, adaptive_clip=hyper
    )
    seen = []
    for r in range(3):
        state, metrics = round_fn(
            state, frozen, driver.round_inputs(config, plan, data, clients, r)
        )
        seen.append(float(metrics["clip_norm"]))
        assert math.isfinite(float(metrics["unclipped_fraction"]))
    assert seen[0] == 5.0 and len(set(seen)) == 3
    assert int(state.clip.step) == 3 and int(state.round) == 3
    with pytest.raises(ValueError, match="client-level DP"):
        example = driver.FedConfig(rounds=1, dp="example", noise_multiplier=0.5)
        driver.make_round(
            step_lib.cross_entropy_loss(model.apply), example, plan, tx, adaptive_clip=hyper
        )
