"""Federated DP: partitions, FedSGD == centralized SGD, client-level sensitivity and accounting,
vmap over clients == a loop, padded client slots, resume == uninterrupted, head tuning."""

import dataclasses

import dp_accounting as dpa
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fed_config
from dp_accounting import pld

from dpft import optim
from dpft.federated import driver, partition, server
from dpft.federated import run as fed_run
from dpft.privacy import clients as dp_clients
from dpft.privacy import clipping
from dpft.train.step import TrainState, cross_entropy_loss, flatten, make_train_step
from dpft.train.step import partition as split_params

# the CLI smoke test's resumed runs load the programs of its uninterrupted run (conftest)
pytestmark = pytest.mark.usefixtures("compilation_cache")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(6)(x)))


def setup(n=48, seed=0, trainable=(".*",)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(4, 3)), axis=1).astype(np.int32)
    model = MLP()
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4)))
    params, frozen = split_params(variables, trainable)
    return model, params, frozen, {"image": x, "label": y}


def close(a, b, atol=1e-6):
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------ partitions


def test_partitions_cover_disjoint_and_dirichlet_skew():
    labels = np.random.default_rng(0).integers(0, 10, size=2000)
    splits = {
        "iid": partition.iid(labels, 20, seed=1),
        "dir": partition.dirichlet(labels, 20, alpha=0.5, seed=1),
        "shards": partition.shards(labels, 20, shards_per_client=2, seed=1),
    }
    for parts in splits.values():
        assert len(parts) == 20
        assert sum(len(p) for p in parts) == len(labels)
        allidx = np.concatenate(parts)
        assert len(np.unique(allidx)) == len(labels)  # disjoint and covering
        assert min(len(p) for p in parts) >= 1
    # Every client non-empty even with many clients and tiny alpha.
    tiny = partition.dirichlet(labels[:100], 60, alpha=0.01, seed=3)
    assert min(len(p) for p in tiny) >= 1 and sum(map(len, tiny)) == 100
    # Deterministic given the seed.
    again = partition.dirichlet(labels, 20, alpha=0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, splits["dir"], strict=True))
    skews = [
        partition.label_skew(labels, partition.dirichlet(labels, 20, a, seed=2))
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2]
    assert partition.label_skew(labels, splits["iid"]) < skews[1]
    assert partition.label_skew(labels, splits["shards"]) > skews[0]


# ------------------------------------------------------------------ FedSGD == centralized


def test_fedsgd_equals_centralized_sgd():
    model, params, frozen, data = setup(n=30)
    clients = [np.arange(0, 5), np.arange(5, 16), np.arange(16, 30)]  # unequal sizes
    lr, rounds = 0.5, 2
    config = driver.FedConfig(
        rounds=rounds,
        algorithm="fedsgd",
        client_rate=1.0,
        local_rate=1.0,
        server_optimizer="sgd",
        server_lr=lr,
        weighting="examples",
        dp="example",
        noise_multiplier=0.0,
        example_clip=float("inf"),
    )
    loss = cross_entropy_loss(model.apply)
    fed = fed_run(config, loss, params, frozen, data, clients)

    tx = optim.dp_sgd(lr, noise_multiplier=0.0, l2_sensitivity=1.0, expected_batch_size=30.0, key=0)
    step = jax.jit(make_train_step(loss, clipping.FlatClip(float("inf")), tx))
    state = TrainState(jnp.zeros([], jnp.int32), params, tx.init(params), frozen)
    batch = {**data, "mask": np.ones(30, np.float32)}
    for t in range(rounds):
        state, _ = step(state, batch, jax.random.PRNGKey(t))
    close(fed.params, state.params)
    assert not np.allclose(
        np.asarray(fed.params["params/Dense_0/kernel"]), params["params/Dense_0/kernel"]
    )
    assert fed.history[-1]["debug/clients"] == 3


# ------------------------------------------------------------ client-level sensitivity


def test_client_level_sensitivity_adversarial_updates():
    rng = np.random.default_rng(0)
    s_clip = 1.0
    updates = {
        "a": jnp.asarray(rng.normal(size=(6, 3, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
    }
    updates["a"] = updates["a"].at[0].multiply(1e30).at[1].multiply(1e-3)
    updates["b"] = updates["b"].at[0].set(3e38).at[1].multiply(1e-3).at[2].multiply(1e20)
    mask = jnp.ones(6)

    def flat(t):
        return np.concatenate([np.asarray(t[k], np.float64).ravel() for k in sorted(t)])

    full = flat(dp_clients.client_level_sum(updates, mask, s_clip))
    assert np.all(np.isfinite(full))
    for i in range(6):
        without = flat(dp_clients.client_level_sum(updates, mask.at[i].set(0.0), s_clip))
        assert np.linalg.norm(full - without) <= s_clip * (1 + 1e-5)
    # The small client is not clipped: it contributes itself.
    only1 = flat(dp_clients.client_level_sum(updates, jnp.zeros(6).at[1].set(1.0), s_clip))
    np.testing.assert_allclose(only1, flat({k: v[1] for k, v in updates.items()}), rtol=1e-6)
    # A client with a non-finite update contributes exactly zero.
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        poisoned = {**updates, "b": updates["b"].at[3, 2].set(bad)}
        with_bad = flat(dp_clients.client_level_sum(poisoned, mask, s_clip))
        np.testing.assert_array_equal(
            with_bad, flat(dp_clients.client_level_sum(updates, mask.at[3].set(0.0), s_clip))
        )
    # Private mean: padded slots ignored, noise scaled, divided by the expected count.
    mean, _, ok = dp_clients.private_mean(
        updates,
        mask.at[5].set(0.0),
        clip_norm=s_clip,
        noise_std=0.0,
        noise_key=jax.random.PRNGKey(0),
        expected_clients=2.5,
    )
    ref = flat(dp_clients.client_level_sum(updates, mask.at[5].set(0.0), s_clip)) / 2.5
    np.testing.assert_allclose(flat(mean), ref, rtol=1e-6)
    assert np.asarray(ok).tolist() == [1, 1, 1, 1, 1, 0]


# --------------------------------------------------------------------------- accounting


def test_client_level_accountant_matches_dp_accounting():
    z, q, rounds, delta = 1.1, 0.05, 40, 1e-5
    acc = pld.PLDAccountant()
    acc.compose(
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    )
    direct = acc.get_epsilon(delta)
    assert abs(dp_clients.client_level_epsilon(z, q, rounds, delta) - direct) < 1e-6
    # Example level = rounds * K steps at the local rate (no client-sampling amplification).
    acc = pld.PLDAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), 40))
    assert abs(dp_clients.example_level_epsilon(z, q, 10, 4, delta) - acc.get_epsilon(delta)) < 1e-6
    # Calibration through the plan (z < 0).
    config = fed_config(
        rounds=rounds, client_rate=0.25, local_steps=1, noise_multiplier=-1.0, target_epsilon=2.0
    )
    plan = driver.make_plan(config, [3] * 20)
    eps = dp_clients.client_level_epsilon(
        plan.noise_multiplier, 0.25, rounds, 1e-5, "rdp", num_clients=20, max_clients=plan.slots
    )
    assert eps <= 2.0 and eps > 1.9


# ------------------------------------------------------------- vmap == loop, padded slots


def test_vmap_over_clients_equals_loop_and_padding_contributes_nothing():
    model, params, frozen, data = setup(n=40)
    clients = partition.dirichlet(data["label"], 6, alpha=1.0, seed=0)
    config = driver.FedConfig(
        rounds=1,
        client_rate=0.5,
        max_clients=5,
        local_steps=2,
        local_rate=0.5,
        local_batch=8,
        local_lr=0.3,
        dp="example",
        noise_multiplier=0.8,
        example_clip=0.5,
        seed=3,
    )
    loss = cross_entropy_loss(model.apply)
    plan = driver.make_plan(config, [len(c) for c in clients])
    inputs = driver.round_inputs(config, plan, data, clients, 0)
    assert inputs.client_mask.sum() >= 1 and inputs.client_mask.sum() < plan.slots
    local = driver.make_local_update(loss, config, plan)
    keys = jax.vmap(lambda c: driver.client_key(config.seed, 0, c))(inputs.client_ids)
    vm = jax.jit(jax.vmap(local, in_axes=(None, None, 0, 0, 0, 0)))
    upd_v, _ = vm(params, frozen, inputs.batch, inputs.mask, inputs.inv_expected, keys)
    one = jax.jit(local)
    for s in range(plan.slots):
        sl = jax.tree_util.tree_map(lambda a, s=s: a[s], inputs._replace(seed=None))
        key = driver.client_key(config.seed, 0, int(inputs.client_ids[s]))
        upd_s, _ = one(params, frozen, sl.batch, sl.mask, sl.inv_expected, key)
        close(upd_s, {k: v[s] for k, v in upd_v.items()}, atol=1e-6)

    # Padded slots holding garbage (even unmasked examples, huge weights) change nothing.
    tx = server.make_server_optimizer("momentum", 1.0)
    st = server.ServerState(jnp.zeros([], jnp.int32), params, tx.init(params))
    round_fn = driver.make_round(loss, config, plan, tx)
    ref, _ = round_fn(st, frozen, inputs)
    # Clients in groups of 2 (5 slots: two groups and a remainder of one) run in sequence.
    grouped = driver.make_round(loss, dataclasses.replace(config, client_group=2), plan, tx)
    close(grouped(st, frozen, inputs)[0].params, ref.params, atol=1e-6)
    pad = inputs.client_mask == 0
    garbage = driver.RoundInputs(
        {
            "image": np.where(pad[:, None, None, None], 1e3, inputs.batch["image"]),
            "label": np.where(pad[:, None, None], 2, inputs.batch["label"]),
        },
        np.where(pad[:, None, None], 1.0, inputs.mask).astype(np.float32),
        inputs.client_mask,
        np.where(pad, 1, inputs.client_ids).astype(np.int32),
        np.where(pad, 100.0, inputs.weights).astype(np.float32),
        inputs.inv_expected,
    )
    out, metrics = round_fn(st, frozen, garbage)
    close(out.params, ref.params, atol=1e-6)
    assert float(metrics["debug/clients"]) == inputs.client_mask.sum()


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
        return nn.Dense(3)(nn.LayerNorm()(x.reshape(x.shape[0], -1)))


def test_ghost_norms_in_clients_equal_vmap_norms(ghost_traces):
    """``norm_strategy=GhostNorms()`` reaches every client's local DP-SGD steps (vmapped over
    client slots) and gives the round of per-example-gradient norms, up to float rounding."""
    from dpft.privacy.ghost import GhostNorms

    traced = ghost_traces
    rng = np.random.default_rng(0)
    data = {
        "image": rng.normal(size=(40, 6, 6, 2)).astype(np.float32),
        "label": (np.arange(40) % 3).astype(np.int32),
    }
    model = SmallCNN()  # Conv + Dense (ghost norms) and LayerNorm (per-example gradients)
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
        example_clip=0.05,  # small: most examples are clipped, so the norms matter
        seed=1,
    )
    loss = cross_entropy_loss(model.apply)
    plan = driver.make_plan(config, [len(c) for c in clients])
    inputs = driver.round_inputs(config, plan, data, clients, 0)
    tx = server.make_server_optimizer("sgd", 1.0)
    st = server.ServerState(jnp.zeros([], jnp.int32), params, tx.init(params))
    out = {}
    for name, strategy in (("vmap", None), ("ghost", GhostNorms())):
        before = len(traced)
        round_fn = driver.make_round(loss, config, plan, tx, norm_strategy=strategy)
        out[name] = round_fn(st, frozen, inputs)[0].params
        assert (len(traced) > before) == (name == "ghost")
    assert max(float(jnp.max(jnp.abs(out["vmap"][k] - params[k]))) for k in params) > 1e-3
    close(out["ghost"], out["vmap"], atol=1e-5)


# ------------------------------------------------------------------ resume, head tuning


@pytest.mark.parametrize("level", ["client", "example"])
def test_resume_equals_uninterrupted(tmp_path, level):
    model, params, frozen, data = setup(n=36)
    clients = partition.iid(data["label"], 6, seed=0)
    config = driver.FedConfig(
        rounds=4,
        client_rate=0.5,
        local_steps=2,
        local_rate=0.5,
        local_lr=0.2,
        server_optimizer="adam" if level == "client" else "momentum",
        server_lr=0.05,
        dp=level,
        noise_multiplier=0.7,
        example_clip=1.0,
        client_clip=0.5,
        seed=5,
        accountant="rdp",  # PLD is checked above; RDP keeps this test fast
    )
    loss = cross_entropy_loss(model.apply)
    evals = lambda p, f: {"param_sum": float(sum(jnp.sum(v) for v in p.values()))}

    def go(cfg, workdir):
        return fed_run(
            cfg, loss, params, frozen, data, clients, workdir=workdir, eval_fn=evals, eval_every=4
        )

    full = go(config, tmp_path / "a")
    go(driver.FedConfig(**{**config.__dict__, "rounds": 2}), tmp_path / "b")
    resumed = go(config, tmp_path / "b")
    close(resumed.params, full.params, atol=1e-6)
    assert resumed.ledger == full.ledger and resumed.epsilon == full.epsilon
    assert np.isfinite(full.epsilon) and full.ledger.steps == (4 if level == "client" else 8)
    assert [h["round"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(resumed.history[2:], full.history[2:], strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    assert resumed.history[-1]["param_sum"] == pytest.approx(full.history[-1]["param_sum"])


def test_head_tuning_same_path():
    model, params, frozen, data = setup(n=24, trainable=("Dense_1/.*",))
    assert set(params) == {"params/Dense_1/kernel", "params/Dense_1/bias"}
    clients = partition.shards(data["label"], 4, shards_per_client=1, seed=0)
    config = fed_config(rounds=2, noise_multiplier=0.5, accountant="pld")
    res = fed_run(config, cross_entropy_loss(model.apply), params, frozen, data, clients)
    assert set(res.params) == set(params)
    assert not np.allclose(res.params["params/Dense_1/kernel"], params["params/Dense_1/kernel"])
    body = flatten(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4))))
    np.testing.assert_array_equal(frozen["params/Dense_0/kernel"], body["params/Dense_0/kernel"])


# ------------------------------------------------------------------------- CLI / config

try:
    from dpft import paths

    paths.data_dir()
    HAVE_DATA = True
except Exception:  # noqa: BLE001 - any failure to find the data dir skips the data tests
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="no data dir (set DPFT_DATA_DIR)")


def fed_smoke(arg="scratch,smoke", **federated):
    from configs import fmnist_fed

    c = fmnist_fed.get_config(arg)
    c.tensorboard = False
    c.data.train_subset, c.data.eval_subset, c.eval_batch_size = 400, 100, 100
    c.model.name = "linear"  # a linear model on pixels compiles in a second (CI time)
    c.dp.accountant = "rdp"  # PLD calibration is tested above; RDP keeps this fast
    for k, v in federated.items():
        setattr(c.federated, k, v)
    return c


def checkpoint_arrays(workdir):
    from dpft.train.checkpoint import Checkpointer

    ck = Checkpointer(workdir)
    arrays, meta = ck.load_arrays(ck.latest_step())
    ck.close()
    return arrays, meta


@needs_data
def test_cli_smoke_writes_contract_and_resumes(tmp_path, monkeypatch):
    import json

    from dpft.__main__ import train_and_evaluate
    from dpft.train import report

    c = fed_smoke(log_every=1, eval_every=2, checkpoint_every=2)
    c.tensorboard = True
    summary = train_and_evaluate(c, tmp_path / "full")
    full = tmp_path / "full"
    for key in ("test_accuracy", "epsilon", "delta", "steps", "wall_seconds", "test_ece"):
        assert key in summary
    assert summary["steps"] == 4 and 0 < summary["epsilon"] <= c.dp.epsilon
    assert {"test_mce", "test_loss"} <= set(json.loads((full / "summary.json").read_text()))
    lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all("epsilon" in r and "debug/train_loss" in r for r in lines)
    assert "test_accuracy" in lines[1] and "test_accuracy" not in lines[0]
    assert lines[0]["epsilon"] < lines[-1]["epsilon"] == pytest.approx(summary["epsilon"])
    assert json.loads((full / "config.json").read_text())["federated"]["rounds"] == 4
    assert (full / "reliability.png").stat().st_size > 1000
    assert (full / "training_curves.png").exists() and list(full.glob("events.out.tfevents*"))

    original = report.MetricsWriter.write

    def crash_at_round_3(self, step, metrics):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step, metrics)

    c.tensorboard = False
    c2 = fed_smoke(log_every=1, eval_every=2, checkpoint_every=2)
    monkeypatch.setattr(report.MetricsWriter, "write", crash_at_round_3)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(c2, tmp_path / "resumed")
    monkeypatch.setattr(report.MetricsWriter, "write", original)
    assert checkpoint_arrays(tmp_path / "resumed")[1]["round"] == 2
    again = train_and_evaluate(c2, tmp_path / "resumed")
    a, meta_a = checkpoint_arrays(full)
    b, meta_b = checkpoint_arrays(tmp_path / "resumed")
    assert meta_a["ledger"] == meta_b["ledger"] and meta_b["round"] == 4
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert again["epsilon"] == summary["epsilon"]
    assert again["test_accuracy"] == summary["test_accuracy"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="different config"):  # another config is refused
        train_and_evaluate(fed_smoke(rounds=5), tmp_path / "resumed")


@needs_data
def test_bad_federated_key_is_one_line_error(tmp_path):
    import subprocess
    import sys

    from dpft.__main__ import train_and_evaluate

    out = subprocess.run(
        [sys.executable, "-m", "dpft", "--config", "configs/fmnist_fed.py:smoke"]
        + ["--workdir", str(tmp_path / "cli"), "--config.federated.roundz=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert out.returncode != 0 and len(err) == 1 and "roundz" in err[0], out.stderr[-800:]
    for key, value in (
        ("partition", "zipf"),
        ("level", "user"),
        ("rounds", 0),
        ("client_group", -1),
    ):
        c = fed_smoke(**{key: value})
        with pytest.raises(ValueError, match=f"config.federated.{key}") as e:
            train_and_evaluate(c, tmp_path / key)
        assert "\n" not in str(e.value)
        assert not (tmp_path / key).exists()  # validated before the workdir is touched
    c = fed_smoke()
    c.dp.norms = "fast"
    with pytest.raises(ValueError, match=r"config\.dp\.norms must be vmap\|ghost"):
        train_and_evaluate(c, tmp_path / "norms")
    assert not (tmp_path / "norms").exists()
    c = fed_smoke()
    c.unlock()
    c.federated.roundz = 3  # an unknown key in a config file (not only on the command line)
    with pytest.raises(ValueError, match="config.federated.roundz"):
        train_and_evaluate(c, tmp_path / "file")


# ------------------------------------------------------------- clients over a device mesh


@pytest.mark.parametrize("level", ["example", "client"])
def test_clients_sharded_over_eight_devices_equal_one(level):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest sets XLA_FLAGS=...device_count=8)")
    from dpft.train.build import make_mesh

    model, params, frozen, data = setup(n=60)
    clients = partition.dirichlet(data["label"], 12, alpha=1.0, seed=0)  # unequal sizes
    config = driver.FedConfig(
        rounds=2,
        client_rate=0.5,
        local_steps=2,  # 12 client slots on one device, 16 (two per device) on eight
        local_rate=0.5,
        dp=level,
        noise_multiplier=0.8,
        example_clip=0.5,
        client_clip=0.3,
        seed=1,
        accountant="rdp",
    )
    loss = cross_entropy_loss(model.apply)
    one = fed_run(config, loss, params, frozen, data, clients)
    eight = fed_run(config, loss, params, frozen, data, clients, mesh=make_mesh(8))
    assert eight.plan.slots == 16 and one.plan.slots == 12
    assert one.ledger == eight.ledger and one.history[-1]["debug/clients"] >= 1
    for a, b in zip(one.history, eight.history, strict=True):
        assert a["debug/clients"] == b["debug/clients"]
    close(eight.params, one.params, atol=1e-6)
    sharding = eight.params["params/Dense_0/kernel"].sharding
    assert len(sharding.device_set) == 8  # replicated over the mesh
