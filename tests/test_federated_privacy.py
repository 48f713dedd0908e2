"""Federated privacy plumbing: one DP core, purpose-separated keys, secure seeds (entropy and
exact resume), one delta check, and no private values outside ``debug/`` in the outputs."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dpft.federated import driver, partition, server
from dpft.federated import run as fed_run
from dpft.privacy import keys
from dpft.train.checkpoint import Checkpointer
from dpft.train.step import cross_entropy_loss
from tests.test_federated import fed_smoke, needs_data, setup

# ------------------------------------------------------------------------------ one DP core


def test_client_mechanisms_and_accounting_live_in_the_core(monkeypatch):
    from dpft.federated import accounting as fed_accounting
    from dpft.privacy import clients as dp_clients

    for name in ("clip_client_updates", "client_level_sum", "private_mean", "_flat_norm"):
        assert not hasattr(server, name), name  # no second implementation in the driver
    for name in fed_accounting.__all__:  # the federated names are the core's functions
        assert getattr(fed_accounting, name) is getattr(dp_clients, name)
    calls = []
    original = dp_clients.private_mean

    def spy(*args, **kwargs):
        calls.append(kwargs["noise_std"])
        return original(*args, **kwargs)

    monkeypatch.setattr(dp_clients, "private_mean", spy)
    model, params, frozen, data = setup(n=24)
    clients = partition.iid(data["label"], 4, seed=0)
    config = driver.FedConfig(rounds=1, dp="client", noise_multiplier=0.5, client_clip=0.3)
    plan = driver.make_plan(config, [len(c) for c in clients])
    tx = server.make_server_optimizer("sgd", 1.0)
    state = server.ServerState(jnp.zeros([], jnp.int32), params, tx.init(params))
    round_fn = driver.make_round(cross_entropy_loss(model.apply), config, plan, tx)
    round_fn(state, frozen, driver.round_inputs(config, plan, data, clients, 0))
    assert calls == [pytest.approx(0.5 * 0.3)]  # the round's aggregate is the core's


# ------------------------------------------------------------------------------ key hygiene


def _words(key) -> tuple[int, ...]:
    return tuple(int(w) for w in np.asarray(key).ravel())


def test_federated_keys_come_from_disjoint_purposes():
    seed = (7 << 32) | 3  # a 64-bit seed: both words of the root are used
    root = keys.root_key(seed)
    assert _words(driver.client_key(seed, 1, 2)) == _words(keys.derive(root, "client", 1, 2))
    assert _words(driver.client_key(root, 1, 2)) == _words(driver.client_key(seed, 1, 2))
    assert _words(driver.server_noise_key(seed, 1)) == _words(keys.derive(root, "server", 1))
    assert _words(driver.client_key(seed, 0, 0)) != _words(driver.client_key(3, 0, 0))
    grid = range(3)
    streams: dict[tuple, tuple] = {}
    for r in grid:
        streams[("server", r)] = _words(driver.server_noise_key(seed, r))
        for c in grid:
            ck = driver.client_key(seed, r, c)
            streams[("client", r, c)] = _words(ck)
            noise_key, step_keys = driver.local_keys(ck, len(grid))
            streams[("local_noise", r, c)] = _words(noise_key)
            for k in grid:
                streams[("local_examples", r, c, k)] = _words(step_keys[k])
                priv = keys.derive(noise_key, "step", k)  # the local privatizer's step key
                streams[("local_step", r, c, k)] = _words(priv)
                streams[("local_leaf", r, c, k)] = _words(keys.derive(priv, "leaf", 0))
    # the centralized trainer's streams under the same root
    for i in grid:
        streams[("noise", i)] = _words(keys.derive(root, "noise", i))
        streams[("examples", i)] = _words(keys.derive(root, "examples", i))
    by_key: dict[tuple, list] = {}
    for name, words in streams.items():
        by_key.setdefault(words, []).append(name)
    shared = [names for names in by_key.values() if len(names) > 1]
    assert shared == [] and len(by_key) == len(streams)


# ------------------------------------------------------------------------------ secure runs


def _secure_config(**kw):
    return driver.FedConfig(
        **{
            "rounds": 4,
            "client_rate": 0.5,
            "local_steps": 2,
            "local_rate": 0.5,
            "local_lr": 0.2,
            "server_optimizer": "momentum",
            "server_lr": 0.5,
            "dp": "client",
            "noise_multiplier": 0.7,
            "client_clip": 0.5,
            "seed": 5,
            "accountant": "rdp",
            "secure_noise": True,
            **kw,
        }
    )


def _secret(workdir) -> int:
    ck = Checkpointer(workdir)
    try:
        return int(ck.load_arrays(ck.latest_step())[1]["secure_seed"])
    finally:
        ck.close()


@pytest.fixture
def fed_problem():
    model, params, frozen, data = setup(n=36)
    clients = partition.iid(data["label"], 6, seed=0)
    loss = cross_entropy_loss(model.apply)

    def go(config, workdir, **kw):
        return fed_run(config, loss, params, frozen, data, clients, workdir=workdir, **kw)

    return go, params


def test_secure_runs_draw_fresh_64_bit_secrets(tmp_path, monkeypatch, fed_problem):
    go, params = fed_problem
    roots = []
    original = driver.round_inputs

    def spy(*args, **kwargs):
        inputs = original(*args, **kwargs)
        roots.append(tuple(int(w) for w in inputs.seed))
        return inputs

    monkeypatch.setattr(driver, "round_inputs", spy)
    seen = []

    def first_round_eval(p, f):  # before round 1's checkpoint: the round-0 one holds the secret
        seen.append(sorted(int(d.name) for d in (tmp_path / "a" / "checkpoints").iterdir()))
        return {}

    a = go(_secure_config(rounds=2), tmp_path / "a", eval_fn=first_round_eval)
    assert seen[0] == [0]
    n_a = len(roots)
    b = go(_secure_config(rounds=2), tmp_path / "b")
    sa, sb = _secret(tmp_path / "a"), _secret(tmp_path / "b")
    assert set(roots[:n_a]) == {tuple(int(w) for w in keys.root_key(sa))}
    assert set(roots[n_a:]) == {tuple(int(w) for w in keys.root_key(sb))}
    assert sa >> 32 != sb >> 32 and sa & 0xFFFFFFFF != sb & 0xFFFFFFFF  # both words vary
    assert 5 not in (sa, sb)  # not the config's seed
    differ = [not np.array_equal(a.params[k], b.params[k]) for k in params]
    assert all(differ)
    for rec in a.history:  # the secret is in no record
        assert sa not in rec.values() and str(sa) not in json.dumps(rec)


def test_secure_run_resumed_equals_uninterrupted_with_its_secret(
    tmp_path, monkeypatch, fed_problem
):
    go, _ = fed_problem
    draws = []
    original = keys.draw_secret

    def counting():
        draws.append(original())
        return draws[-1]

    monkeypatch.setattr(keys, "draw_secret", counting)
    go(_secure_config(rounds=2), tmp_path / "b")  # "interrupted" after 2 of 4 rounds
    assert len(draws) == 1
    secret = _secret(tmp_path / "b")
    assert secret == draws[0]
    resumed = go(_secure_config(), tmp_path / "b")
    assert len(draws) == 1  # resuming takes the saved secret, never a fresh one
    assert _secret(tmp_path / "b") == secret
    monkeypatch.setattr(keys, "draw_secret", lambda: secret)
    full = go(_secure_config(), tmp_path / "full")
    assert resumed.ledger == full.ledger and resumed.plan == full.plan
    for k in full.params:
        np.testing.assert_array_equal(np.asarray(resumed.params[k]), np.asarray(full.params[k]))
    # a workdir of a non-secure run is not resumed as a secure one
    go(_secure_config(rounds=1, secure_noise=False), tmp_path / "plain")
    with pytest.raises(ValueError, match="another federated config"):
        go(_secure_config(), tmp_path / "plain")


def test_runner_without_workdir_accepts_secure_mode(fed_problem):
    go, params = fed_problem
    a = go(_secure_config(rounds=1), None)
    b = go(_secure_config(rounds=1), None)
    assert not np.array_equal(a.params["params/Dense_0/kernel"], b.params["params/Dense_0/kernel"])


# ------------------------------------------------------------------------------ delta


@pytest.mark.parametrize(
    "level, sizes, delta", [("client", [5] * 10, 0.1), ("example", [5] * 10, 0.02)]
)
def test_plan_refuses_delta_of_one_over_n(level, sizes, delta):
    config = driver.FedConfig(dp=level, noise_multiplier=1.0, delta=delta)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1/N") as e:
        driver.make_plan(config, sizes)
    assert "\n" not in str(e.value)
    driver.make_plan(driver.FedConfig(dp=level, noise_multiplier=1.0, delta=delta / 2), sizes)
    driver.make_plan(driver.FedConfig(dp="none", delta=delta), sizes)  # no DP: no delta


@needs_data
@pytest.mark.parametrize("level, delta", [("client", 0.1), ("example", 1 / 400)])
def test_cli_refuses_delta_before_the_workdir(tmp_path, level, delta):
    from dpft.__main__ import train_and_evaluate

    c = fed_smoke(level=level)  # 400 examples over 10 clients
    c.dp.delta = delta
    with pytest.raises(ValueError, match=r"config\.dp\.delta must be in \(0, 1/N") as e:
        train_and_evaluate(c, tmp_path / "w")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------ CLI outputs


@needs_data
def test_cli_secure_run_keeps_the_secret_in_checkpoints_only(tmp_path):
    from dpft.__main__ import train_and_evaluate

    c = fed_smoke(rounds=2, log_every=1, eval_every=2, checkpoint_every=2)
    c.dp.secure_noise = True
    summary = train_and_evaluate(c, tmp_path / "w")
    steps = sorted(int(d.name) for d in (tmp_path / "w" / "checkpoints").iterdir())
    ck = Checkpointer(tmp_path / "w")
    secret = int(ck.load_arrays(ck.latest_step())[1]["secure_seed"])
    ck.close()
    assert steps == [0, 2] and secret != c.seed
    words = {str(secret), str(secret >> 32), str(secret & 0xFFFFFFFF)}
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        text = (tmp_path / "w" / name).read_text()
        assert not any(w in text for w in words), name
    assert json.loads((tmp_path / "w" / "config.json").read_text())["dp"]["secure_noise"]
    lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    public = {"step", "epsilon", "phase"}
    for rec in lines:  # train statistics of private batches only under debug/
        assert all(k in public or k.startswith(("debug/", "test_")) for k in rec), rec
    assert summary["rounds"] == 2 and np.isfinite(summary["epsilon"])
    # the summary: public eval metrics, the plan, the accounting and timings; nothing computed
    # from realised (private) batch sizes or client counts outside debug/
    public_summary = {
        "epsilon", "delta", "dp_level", "eval_data", "accountant", "target_epsilon",
        "noise_multiplier", "steps", "rounds", "ledger_steps", "finetune_mode", "lp_rounds",
        "num_clients", "client_slots", "local_batch", "local_steps", "partition",
        "num_train_examples", "wall_seconds", "train_seconds",
    }  # fmt: skip
    extra = {k for k in summary if not k.startswith(("test_", "debug/"))} - public_summary
    assert extra == set()
