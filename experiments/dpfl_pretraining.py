"""Pre-training vs training from scratch in DP federated learning (after Jin et al. 2024).

    nice -n 5 .venv/bin/python -m experiments.dpfl_pretraining   # -> results/dpfl_pretraining.*

Fashion-MNIST: one fixed random subset of ``N_TRAIN`` training images, the same for every arm,
IID over 100 clients; FedAvg, every client every round, ONE full-batch local step per round (so
every arm takes the same steps on the same examples); server SGD, momentum 0.9, lr 1. Arms
(``ARMS``): linear heads on the frozen CIFAR-10 ResNet-20 / ImageNet MobileNetV2 features
(HT-R20, HT-MNV2); fine-tuning MobileNetV2's last blocks + head (`experiments.lp_ft.Suffix`) or
ResNet-20's last block + head on the frozen prefixes' cached activations (FT-MNV2, FT-R20);
from scratch, the small CNN and ResNet-20 with GroupNorm (ST-CNN, ST-R20). Settings: example-
and client-level DP at each of ``EPSILONS`` (delta 1e-5, noise calibrated with PLD for the
planned rounds) and a non-private control; ``ROUNDS``. The local learning rate is tuned per
cell (arm, level, epsilon, rounds) on ``N_VAL`` held-out training images (seed 0; outside
epsilon), then the ``TEST_SEEDS`` run on the test set. Every run is a JSON row (tuning rows:
``split='val'``); rows already there are skipped. Report: `experiments.dpfl_pretraining_report`;
protocol and scale: ``experiments/results/dpfl_pretraining.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import fmnist_fed
from dpft.federated import driver, experiment
from dpft.federated import server as srv
from dpft.privacy.accounting import PrivacyLedger
from dpft.train import trainer as central
from dpft.train.step import cross_entropy_loss, make_eval_step
from experiments import dpfl_data

OUT = pathlib.Path(__file__).parent / "results"
N_TRAIN, N_VAL = dpfl_data.N_TRAIN, dpfl_data.N_VAL  # examples: training subset, validation
CLIENTS = 100
DELTA = 1e-5
EPSILONS = (1.0, 8.0)
ROUNDS = (3, 10, 30)
TEST_SEEDS = (1, 2, 3)
TUNE_SEED = 0

# kind; lr: the tuning grid's centre at DP / non-private; levels; rounds run here (the scaled
# plan: see the results file); widen: max grid widenings; group: clients per vmap group;
# ghost: ghost-norm clipping (the same clipped sums without [B, P] per-example gradients).
BOTH, EX = ("example", "client"), ("example",)
ARMS = {
    "HT-R20": dict(kind="head_r20", lr=(16.0, 4.0), levels=BOTH, rounds=ROUNDS, widen=2),
    "HT-MNV2": dict(kind="head_mnv2", lr=(16.0, 1.0), levels=BOTH, rounds=ROUNDS, widen=2),
    "FT-MNV2": dict(kind="ft_mnv2", lr=(1.0, 0.25), levels=BOTH, rounds=(3, 10), widen=2, ghost=1),
    "ST-CNN": dict(
        kind="st_cnn",
        lr=(1.0, 0.25),
        levels=BOTH,
        rounds=ROUNDS,
        widen=1,
        skip=[["client", e, 30] for e in EPSILONS],
    ),
    # cut for compute (see the results file): FT-R20 not run (enable with --rounds FT-R20=3),
    # ST-R20 at 3 rounds only, ST-CNN not at client level with 30 rounds
    "FT-R20": dict(kind="ft_r20", lr=(1.0, 0.25), levels=EX, rounds=(), widen=1),
    "ST-R20": dict(kind="st_r20", lr=(0.5, 0.25), levels=EX, rounds=(3,), widen=1, group=1),
}
for _a in ("FT-MNV2", "ST-CNN", "FT-R20"):
    ARMS[_a]["group"] = 10


# ------------------------------------------------------------------------------------------
# One run.

_SIGMA: dict = {}
_FNS: dict = {}
_EPS_MEMO: dict = {}  # PLD epsilon per ledger content (same noise and rounds: same epsilon)


def _base_fc() -> driver.FedConfig:
    c = fmnist_fed.get_config("head")
    c.unlock()
    c.dp.epsilon, c.dp.delta = 8.0, DELTA
    f = c.federated
    f.num_clients, f.rounds, f.local_steps, f.local_rate = CLIENTS, 3, 1, 1.0
    f.server_optimizer, f.server_lr, f.server_momentum, f.client_clip = "momentum", 1.0, 0.9, 1.0
    return experiment.fed_config(c)


_FC = _base_fc()


def clients_of(labels: np.ndarray) -> list[np.ndarray]:
    """The IID split of the subset (seed 0): the same clients for every arm and seed."""
    from dpft.federated import partition

    return partition.iid(labels, CLIENTS, seed=0)


def fed_config(arm, level, eps, rounds, seed, lr, sizes) -> driver.FedConfig:
    a = ARMS[arm]
    fc = dataclasses.replace(
        _FC,
        dp=level,
        rounds=rounds,
        local_lr=lr,
        seed=seed,
        target_epsilon=eps if level != "none" else None,
        noise_multiplier=-1.0 if level != "none" else 0.0,
        microbatch_size=a.get("mb") or None,
        client_group=a.get("group") or None,
    )
    if level == "none":
        return fc
    skey = (level, eps, rounds, max(sizes))
    if skey not in _SIGMA:  # q = 1 everywhere: the calibration depends on nothing else
        _SIGMA[skey] = driver.make_plan(fc, sizes).noise_multiplier
    return dataclasses.replace(fc, noise_multiplier=_SIGMA[skey])


_ROUNDS: dict = {}


@dataclasses.dataclass
class _Result:
    params: dict
    plan: driver.FedPlan
    epsilon: float
    train_loss: float
    compiled: bool


def _federated(arm, fc, loss, params, frozen, train, clients) -> _Result:
    """``fc.rounds`` rounds of `dpft.federated.driver.make_round` (the runner's loop, without
    checkpoints), with the local learning rate a traced argument: one compilation per (arm,
    plan), so the lr grid and the seeds reuse it. Each round is recorded in the privacy ledger
    before it runs, as in `dpft.federated.runner`; epsilon is the ledger's PLD epsilon."""
    plan = driver.make_plan(fc, [len(c) for c in clients])
    key = (arm, dataclasses.replace(fc, local_lr=1.0, seed=0, rounds=0), plan)
    compiled = key in _ROUNDS
    if not compiled:
        tx = srv.make_server_optimizer(fc.server_optimizer, fc.server_lr, fc.server_momentum)
        norms = None
        if ARMS[arm].get("ghost"):  # ghost norms: the same clipped sums, no [B, P] gradients
            from dpft.privacy.ghost import GhostNorms

            norms = GhostNorms()

        def step(lr, state, fr, inputs):
            cfg = dataclasses.replace(fc, local_lr=lr)
            return driver.make_round(loss, cfg, plan, tx, jit=False, norm_strategy=norms)(
                state, fr, inputs
            )

        _ROUNDS[key] = (tx, jax.jit(step))
    tx, step = _ROUNDS[key]
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = srv.ServerState(jnp.asarray(0, jnp.int32), p, tx.init(p))
    ledger, entry = PrivacyLedger(), driver.round_entry(fc, plan)
    lr = jnp.asarray(fc.local_lr, jnp.float32)
    metrics = {}
    for r in range(fc.rounds):
        inputs = driver.round_inputs(fc, plan, train, clients, r, fc.seed)
        if entry is not None:
            ledger.record(entry)  # spent before the round's release
        state, metrics = step(lr, state, frozen, inputs)
    eps = math.inf
    if fc.dp != "none":
        k = repr(ledger.to_dict())
        if k not in _EPS_MEMO:
            _EPS_MEMO[k] = ledger.epsilon(fc.delta, fc.accountant)
        eps = _EPS_MEMO[k]
    loss_ = float(metrics.get("debug/train_loss", math.nan))
    return _Result(state.params, plan, eps, loss_, compiled)


def run_one(arm, split, level, eps, rounds, seed, lr) -> dict:
    """One federated run -> accuracy, NLL, ECE on ``split`` ('val' or 'test'), epsilon, time."""
    t0 = time.time()
    splits, model, params, frozen = dpfl_data.data_for(ARMS[arm]["kind"])
    if ARMS[arm]["kind"].startswith("st_"):  # from scratch: the initialisation follows the seed
        params, frozen = dpfl_data.scratch_init(ARMS[arm]["kind"], seed)
    train = splits["train"]
    clients = clients_of(train["label"])
    fc = fed_config(arm, level, eps, rounds, seed, lr, [len(c) for c in clients])
    if arm not in _FNS:  # one loss and eval function per arm: compiled rounds reused
        _FNS[arm] = (cross_entropy_loss(model.apply), jax.jit(make_eval_step(model.apply)))
    loss, eval_step = _FNS[arm]
    res = _federated(arm, fc, loss, params, frozen, train, clients)
    t_train = time.time() - t0
    m = central.evaluate(eval_step, res.params, frozen, splits[split], 500)
    nll = m["test_loss"]
    row = {
        "arm": arm,
        "split": split,
        "level": level,
        "epsilon_target": eps,
        "epsilon": res.epsilon if math.isfinite(res.epsilon) else None,
        "rounds": rounds,
        "seed": seed,
        "local_lr": lr,
        "noise_multiplier": res.plan.noise_multiplier,
        "compiled": res.compiled,
        "accuracy": m["test_accuracy"],
        "nll": nll if math.isfinite(nll) else None,
        "ece": m["test_ece"],
        "train_loss": res.train_loss,
        "diverged": (not math.isfinite(nll)) or nll > 5.0 or m["test_accuracy"] <= 0.105,
        "train_seconds": t_train,
        "seconds": time.time() - t0,
    }
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------------------
# Study: cells (arm, level, eps, rounds), tuning then test seeds; resumable JSON.


def cells(arms, rounds_for) -> list[tuple]:
    """(arm, level, eps, rounds) in run order, less each arm's ``skip`` cells (cut for time)."""
    out = []
    for arm in arms:
        for rounds in rounds_for(arm):
            out.append((arm, "none", None, rounds))
            for level in ARMS[arm]["levels"]:
                out += [(arm, level, eps, rounds) for eps in EPSILONS]
    return [c for c in out if list(c[1:]) not in ARMS[c[0]].get("skip", [])]


def _key(r) -> tuple:
    keys = ("arm", "split", "level", "epsilon_target", "rounds", "seed", "local_lr")
    return tuple(r[k] for k in keys)


def _rank(r) -> tuple:
    """Tuning order: a run that did not diverge, then validation accuracy, then the smaller lr."""
    return (not r["diverged"], r["accuracy"], -r["local_lr"])


def tune_and_test(state, cell, save, deadline) -> None:
    arm, level, eps, rounds = cell
    a = ARMS[arm]
    have = {_key(r): r for r in state["rows"]}

    def get(split, seed, lr):
        k = (arm, split, level, eps, rounds, seed, lr)
        if k not in have:
            if time.time() > deadline:
                raise TimeoutError
            have[k] = run_one(arm, split, level, eps, rounds, seed, lr)
            state["rows"].append(have[k])
            save()
        return have[k]

    c = a["lr"][0] if level != "none" else a["lr"][1]
    grid = [c / 4, c, c * 4]
    rows = [get("val", TUNE_SEED, lr) for lr in grid]
    for _ in range(a["widen"]):
        best = max(rows, key=_rank)
        down = best["diverged"] or best["local_lr"] == min(grid)  # every run diverged: go down
        if down and min(grid) / 4 >= 1e-3:
            grid.insert(0, min(grid) / 4)
            rows.append(get("val", TUNE_SEED, grid[0]))
        elif best["local_lr"] == max(grid) and not down:
            grid.append(best["local_lr"] * 4)
            rows.append(get("val", TUNE_SEED, grid[-1]))
        else:
            break
    best = max(rows, key=_rank)
    lr = best["local_lr"]
    state["tuned"][json.dumps([arm, level, eps, rounds])] = {
        "local_lr": lr,
        "grid": sorted(grid),
        "at_edge": lr in (min(grid), max(grid)),
        "val_accuracy": best["accuracy"],
    }
    save()
    for seed in TEST_SEEDS:
        get("test", seed, lr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(ARMS), help="arms, comma-separated")
    p.add_argument("--rounds", default="", help="ARM=R1/R2,... rounds per arm (default ROUNDS)")
    p.add_argument("--deadline", default="", help="UTC HH:MM: start no run after it")
    p.add_argument("--out", default=str(OUT / "dpfl_pretraining.json"))
    args = p.parse_args(argv)
    arms = args.only.split(",")
    per_arm = {}
    for item in filter(None, args.rounds.split(",")):
        arm, rs = item.split("=")
        per_arm[arm] = tuple(int(r) for r in rs.split("/"))
    deadline = math.inf
    if args.deadline:
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        hh, mm = (int(x) for x in args.deadline.split(":"))
        deadline = time.time() + (now.replace(hour=hh, minute=mm, second=0) - now).total_seconds()
    out = pathlib.Path(args.out)
    state = json.loads(out.read_text()) if out.exists() else {"rows": [], "tuned": {}}
    t_last = [time.time()]

    def save():
        now = time.time()
        state["wall_seconds"] = state.get("wall_seconds", 0.0) + now - t_last[0]
        t_last[0] = now
        names = ("N_TRAIN", "N_VAL", "CLIENTS", "DELTA", "EPSILONS", "ROUNDS", "TEST_SEEDS")
        state["protocol"] = {k.lower(): globals()[k] for k in (*names, "TUNE_SEED", "ARMS")}
        out.write_text(json.dumps(state, indent=1))

    try:
        for cell in cells(arms, lambda a: per_arm.get(a, ARMS[a]["rounds"])):
            tune_and_test(state, cell, save, deadline)
    except TimeoutError:
        print("deadline reached: stopping before the next run", flush=True)
    save()
    from experiments import dpfl_pretraining_report

    dpfl_pretraining_report.write(state, out)


if __name__ == "__main__":
    main()
