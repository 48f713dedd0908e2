"""Adaptive clipping of client updates through the federated runner and the CLI path: the clip
norm sequence against the closed form, the accounting, the checkpointed clip state, refusals."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import crash_at_metrics, fed_config, latest_checkpoint, needs_data

from dpft.federated import driver, experiment
from dpft.federated import run as fed_run
from dpft.privacy import adaptive
from dpft.privacy.accounting import PrivacyLedger

GAMMA, ETA = 0.4, 0.3


def _linear_loss(params, frozen, example, rng):
    """A loss linear in the parameters: every client's update is a fixed vector (its local
    lr times its mean image times the local steps), whatever the global parameters are."""
    del frozen, rng
    return -jnp.sum(params["w"] * example["image"]), {"correct": jnp.float32(0.0)}


def _clients_with_known_norms(num_clients=8, dim=3, seed=0):
    """(dataset, clients, norm of each client's update under `_config`): client c holds 3
    copies of one vector, so its update is local_steps * local_lr * that vector."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(num_clients, dim)) * rng.lognormal(0, 0.7, size=(num_clients, 1))
    images = np.repeat(vectors, 3, axis=0).astype(np.float32)
    data = {"image": images, "label": np.zeros(len(images), np.int32)}
    clients = [np.arange(3 * c, 3 * c + 3) for c in range(num_clients)]
    return data, clients, 2 * 0.5 * np.linalg.norm(vectors.astype(np.float32), axis=1)


def _config(**kw):
    """conftest's `fed_config` (client level, 2 local steps, RDP) over 6 rounds of 60% of the
    clients at local lr 0.5 and client clip 1, the clip tracking quantile GAMMA at step ETA."""
    base = dict(
        rounds=6, client_rate=0.6, local_lr=0.5, seed=3, adaptive_quantile=GAMMA, adaptive_lr=ETA
    )
    return fed_config(**{**base, **kw})


@pytest.mark.parametrize("z, sigma_b", [(0.0, 0.0), (0.8, 1.5)])
def test_clip_norms_of_the_runner_follow_the_closed_form(z, sigma_b):
    data, clients, norms = _clients_with_known_norms()
    config = _config(noise_multiplier=z, adaptive_count_noise=sigma_b)
    params = {"w": jnp.zeros(3, jnp.float32)}
    result = fed_run(config, _linear_loss, params, {}, data, clients, eval_every=100)
    plan = result.plan
    expected = config.client_rate * plan.num_clients  # the PUBLIC expected number of clients
    c, seen = config.client_clip, []
    for r in range(config.rounds):
        inputs = driver.round_inputs(config, plan, data, clients, r)
        sampled = inputs.client_ids[inputs.client_mask > 0]
        centred = np.sum(np.where(norms[sampled] <= c, 0.5, -0.5))
        key = adaptive.count_key(driver.server_noise_key(config.seed, r), r)
        noise = sigma_b * float(jax.random.normal(key, (), jnp.float32))
        b = 0.5 + (centred + noise) / expected
        rec = result.history[r]
        np.testing.assert_allclose(rec["clip_norm"], c, rtol=1e-5)
        np.testing.assert_allclose(rec["unclipped_fraction"], b, rtol=1e-5, atol=1e-6)
        seen.append(c)
        c = c * math.exp(-ETA * (b - GAMMA))
    np.testing.assert_allclose(float(result.state.clip.clip_norm), c, rtol=1e-5)
    assert int(result.state.clip.step) == config.rounds and len(set(seen)) == config.rounds
    assert min(seen) < np.median(norms) < max(seen) or seen[-1] < seen[0]  # it moved
    # the same ledger as the run with a fixed clip: one client-level entry of z per round
    fixed = PrivacyLedger()
    fixed.record(driver.round_entry(dataclasses.replace(config, adaptive_quantile=0.0), plan), 6)
    assert result.ledger == fixed


def test_runner_resume_restores_the_clip_state(tmp_path):
    data, clients, _ = _clients_with_known_norms()
    config = _config(noise_multiplier=0.8, adaptive_count_noise=1.5)
    params = {"w": jnp.zeros(3, jnp.float32)}

    def go(cfg, workdir):
        return fed_run(cfg, _linear_loss, params, {}, data, clients, workdir=workdir)

    full = go(config, tmp_path / "a")
    go(dataclasses.replace(config, rounds=3), tmp_path / "b")
    resumed = go(config, tmp_path / "b")
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(full.state), leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["clip_norm"] for h in resumed.history] == [h["clip_norm"] for h in full.history]
    assert resumed.ledger == full.ledger
    with pytest.raises(ValueError, match="another federated config"):  # the identity holds it
        go(dataclasses.replace(config, adaptive_lr=0.1), tmp_path / "b")


def test_runner_refuses_adaptive_clipping_off_client_level():
    data, clients, _ = _clients_with_known_norms()
    params = {"w": jnp.zeros(3, jnp.float32)}
    for level in ("example", "none"):
        with pytest.raises(ValueError, match="client-level DP"):
            config = _config(dp=level, noise_multiplier=0.5)
            fed_run(config, _linear_loss, params, {}, data, clients)
    with pytest.raises(ValueError, match="adaptive_count_noise=0.3 .* noise_multiplier/2"):
        fed_run(
            _config(noise_multiplier=1.0, adaptive_count_noise=0.3),
            _linear_loss,
            params,
            {},
            data,
            clients,
        )


def test_default_count_noise_is_expected_clients_over_20():
    config = _config(client_rate=0.5, noise_multiplier=1.0)  # adaptive_count_noise -1
    plan = driver.make_plan(config, [3] * 40)
    hyper = driver.adaptive_clip(config, plan)
    assert hyper == {"target_quantile": GAMMA, "learning_rate": ETA, "count_noise": 1.0}
    assert driver.adaptive_clip(dataclasses.replace(config, adaptive_quantile=0.0), plan) is None


# ------------------------------------------------------------------------- CLI / config


def _fed_smoke(arg="scratch,smoke,client,adaptive"):
    from tests.test_federated import fed_smoke

    c = fed_smoke(arg, log_every=1, eval_every=2, checkpoint_every=2)
    c.plots = False
    return c


@needs_data
def test_cli_logs_the_clip_norm_accounts_z_and_resumes(tmp_path, compilation_cache):
    from dpft.__main__ import train_and_evaluate

    c = _fed_smoke()
    summary = train_and_evaluate(c, tmp_path / "full")
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").open()]
    clip = [r["clip_norm"] for r in lines]
    assert clip[0] == c.federated.client_clip and len(set(clip)) == len(clip) == 4
    assert all(math.isfinite(r["unclipped_fraction"]) for r in lines)
    assert summary["final_clip_norm"] != clip[-1] and summary["adaptive_count_noise"] == 2.5
    # epsilon: the ledger of 4 client-level rounds at the accounted z, as with a fixed clip
    fixed = _fed_smoke("scratch,smoke,client")
    fc = experiment.fed_config(fixed)
    sizes = [summary["num_train_examples"] // 10] * 10
    plan = driver.make_plan(fc, sizes)
    assert summary["noise_multiplier"] == plan.noise_multiplier > 0
    spent = PrivacyLedger()
    spent.record(driver.round_entry(fc, plan), 4)
    assert summary["epsilon"] == spent.epsilon(fc.delta, fc.accountant) <= c.dp.epsilon
    assert lines[-1]["epsilon"] == summary["epsilon"]
    # a crash after round 3 (checkpoint of round 2), then the resumed run equals the full one
    with crash_at_metrics(3):
        train_and_evaluate(_fed_smoke(), tmp_path / "resumed")
    assert latest_checkpoint(tmp_path / "resumed")[1]["round"] == 2
    again = train_and_evaluate(_fed_smoke(), tmp_path / "resumed")
    a, meta_a = latest_checkpoint(tmp_path / "full")
    b, meta_b = latest_checkpoint(tmp_path / "resumed")
    assert meta_a["ledger"] == meta_b["ledger"] and len(a) == len(b)
    for x, y in zip(a, b, strict=True):  # parameters, server optimizer and clip state
        np.testing.assert_array_equal(x, y)
    assert again["final_clip_norm"] == summary["final_clip_norm"]
    assert again["test_accuracy"] == summary["test_accuracy"]
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert [r["clip_norm"] for r in resumed] == clip


@needs_data
def test_cli_refusals_are_one_line_before_the_workdir(tmp_path):
    from dpft.__main__ import train_and_evaluate

    cases = []
    for level in ("example", "none"):
        c = _fed_smoke("scratch,smoke")
        c.federated.level = level
        c.dp.adaptive_quantile = 0.5
        cases.append((c, r"config.federated.level='client'"))
    c = _fed_smoke()
    c.dp.adaptive_count_noise = 0.5  # z ~ 3.5 here: sigma_b must exceed z/2
    cases.append((c, r"config\.dp\.adaptive_count_noise=0\.5 .* must exceed noise_multiplier/2"))
    c = _fed_smoke()
    c.dp.adaptive_quantile = 1.5
    cases.append((c, r"config\.dp\.adaptive_quantile must be in \(0, 1\]"))
    c = _fed_smoke()
    c.dp.adaptive_lr = -1.0
    cases.append((c, r"config\.dp\.adaptive_lr"))
    for i, (c, what) in enumerate(cases):
        with pytest.raises(ValueError, match=what) as e:
            train_and_evaluate(c, tmp_path / str(i))
        assert "\n" not in str(e.value)
        assert not (tmp_path / str(i)).exists()


def test_federated_check_adaptive_is_client_level_only():
    from configs import fmnist_fed

    assert not experiment.check_adaptive(fmnist_fed.get_config("client"))
    c = fmnist_fed.get_config("client,adaptive")
    assert c.dp.adaptive_quantile == 0.5 and experiment.check_adaptive(c)
    c.dp.clipping = "per_layer"  # the centralized refusals do not apply to client updates
    assert experiment.check_adaptive(c)
    c.federated.level = "example"
    with pytest.raises(ValueError, match="config.federated.level='client'"):
        experiment.check_adaptive(c)
    with pytest.raises(ValueError, match="'adaptive' needs 'client'"):
        fmnist_fed.get_config("smoke,adaptive")
