"""Pre-training vs training from scratch in DP federated learning (issue 7 §4; Jin et al. 2024).

Fashion-MNIST split over 100 clients (IID, and Dirichlet alpha = 0.5 label skew), FedAvg,
delta = 1e-5, example-level DP (each client runs DP-SGD/DP-GD on its own data) and client-level
DP (DP-FedAvg). Arms:

* HT: head tuning of the CIFAR-10-pretrained ResNet-20 on its cached 64-d features, on all
  60k training examples; HT-3k: the same on a fixed 3k subset (30 examples per client);
* FT-3k: fine-tuning the pretrained ResNet-20 scaled down to the last residual block + head, on
  the frozen prefix's cached activations (`experiments.common`), same 3k subset; FTfull-3k:
  every parameter of the pretrained ResNet-20 (frozen BatchNorm statistics) from the images;
* ST-3k: the small CNN (``sample_convnet``) trained from scratch, same 3k subset; STgn-3k:
  ResNet-20 with GroupNorm from scratch.

Configs come from ``configs/fmnist_fed.py``; data, fine-tuning mode, the feature cache, the
client split and the config mapping from `dpft.federated.experiment`; runs from
`dpft.federated.runner.run`. Compute is 2 shared CPU cores, so the study is scaled down (see
``SCALE``, also written into the JSON); the local learning rate is tuned per arm and level on a
validation split carved from the training data. The run is resumable (rows already in the JSON
are skipped).

    nice -n 5 python -m experiments.dpfl_pretraining --only HT-3k,ST-3k,FT-3k
    nice -n 5 python -m experiments.dpfl_pretraining --only FTfull-3k,STgn-3k --levels example
    nice -n 5 python -m experiments.dpfl_pretraining --only HT --partitions iid
    nice -n 5 python -m experiments.dpfl_pretraining --only HT --levels example

Writes experiments/results/dpfl_pretraining.{json,png,table.md}; the discussion is in
experiments/results/dpfl_pretraining.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from configs import fmnist_fed
from dpft import models
from dpft.federated import driver, experiment, runner
from dpft.federated import phases as fed_phases
from dpft.train import build
from dpft.train import trainer as central
from dpft.train.step import cross_entropy_loss, flatten, make_eval_step, unflatten
from dpft.train.step import partition as split_params

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = pathlib.Path(__file__).parent / "results"
CACHE = ROOT / "runs" / "dpfl" / "cache"
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
DELTA = 1e-5
SUBSET = 10_000  # prefix activations are cached for this fixed random subset (experiments.common)
SMALL = 3_000  # the small-scale comparison: a fixed random 3k of it, 30 examples per client
VAL_SEED = 0

# The whole-ResNet-20 arms (~5 min per run here). IID only: with K = 1 full-batch local step the
# example-level Dirichlet run equals the IID one exactly.
WHOLE_RESNET = dict(
    data="subset",
    rounds=3,
    local_steps=1,
    epsilons=EPSILONS,
    partitions=("iid",),
    levels=("example",),
    tune_eps=8.0,
    microbatch=0,
    client_group=1,  # clients in sequence: batched convs are slow on CPU
)

# Each arm: data setting, fine-tuning mode, local steps K, rounds, epsilons, partitions, levels,
# and the local learning-rate grid (tuned on the validation split at `tune_eps`, IID, seed 0,
# per DP level). Local batches are the client's whole dataset (local DP-GD, q_local = 1).
SCALE = {
    "HT": dict(
        data="full",
        rounds=10,
        local_steps=3,
        epsilons=EPSILONS,
        partitions=("iid", "dirichlet"),
        levels=("example", "client"),
        grid=(4.0, 16.0),
        tune_eps=2.0,
        microbatch=0,
    ),
    "HT-3k": dict(
        data="subset",
        rounds=10,
        local_steps=3,
        epsilons=EPSILONS,
        partitions=("iid", "dirichlet"),
        levels=("example", "client"),
        grid=(4.0, 16.0),
        tune_eps=8.0,
        microbatch=0,
    ),
    "ST-3k": dict(
        data="subset",
        rounds=6,
        local_steps=1,
        epsilons=EPSILONS,
        partitions=("iid", "dirichlet"),
        levels=("example", "client"),
        grid=(1.0, 4.0),
        tune_eps=8.0,
        microbatch=0,
    ),
    "FT-3k": dict(
        data="subset",
        rounds=3,
        local_steps=1,
        epsilons=EPSILONS,
        partitions=("iid", "dirichlet"),
        levels=("example", "client"),
        grid=(1.0, 4.0),
        tune_eps=8.0,
        microbatch=0,
    ),
    # every parameter of the pretrained ResNet-20 (frozen BN statistics), from its images
    "FTfull-3k": dict(WHOLE_RESNET, grid=(0.25, 1.0)),
    # ResNet-20 with GroupNorm from scratch
    "STgn-3k": dict(WHOLE_RESNET, grid=(0.5, 2.0)),
}
ARMS = {
    "HT": "head",
    "HT-3k": "head",
    "FT-3k": "ft_last_block",
    "ST-3k": "scratch",
    "FTfull-3k": "full",
    "STgn-3k": "scratch_gn",
}


def config_for(arm, eps, level, partition, lr):
    """The fmnist_fed config of one run (its data seed 0: the same clients for every seed)."""
    s = SCALE[arm]
    mode = ARMS[arm]
    c = fmnist_fed.get_config(
        {"scratch": "scratch", "scratch_gn": "scratch", "full": "full"}.get(mode, "head")
    )
    c.unlock()
    if mode == "scratch_gn":
        c.model.name, c.model.norm = "resnet20", "group_norm"
    c.tensorboard = False
    c.finetune.cache_dir = str(CACHE)
    c.dp.epsilon, c.dp.delta = eps, DELTA
    f = c.federated
    f.level, f.partition, f.alpha = level, partition, 0.5
    f.rounds, f.local_steps, f.local_rate = s["rounds"], s["local_steps"], 1.0
    f.local_lr, f.server_optimizer, f.server_lr, f.server_momentum = lr, "momentum", 1.0, 0.9
    f.client_clip = 1.0
    f.microbatch_size = s["microbatch"]
    f.client_group = s.get("client_group", 0)
    return c


# ------------------------------------------------------------------------------------------
# Data: {'val': (train, eval), 'test': (train, eval)} per arm, arrays {'image', 'label'}.

_DATA: dict = {}
_SIGMA: dict = {}
_FNS: dict = {}


def _val_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices of `dpft.data.split_validation` (fraction 0.1, seed 0)."""
    perm = np.random.default_rng([VAL_SEED, 0x5A11D]).permutation(n)
    n_val = int(round(0.1 * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def data_for(arm: str) -> dict:
    mode = ARMS[arm]
    key = (SCALE[arm]["data"], mode)
    if key in _DATA:
        return _DATA[key]
    if key == ("full", "head"):  # the CLI's head path: cached ResNet-20 features, all 60k
        c = config_for(arm, 1.0, "example", "iid", 1.0)
        train, test, ncls, model, variables, phase = experiment.prepare(c)
        train, test, model, params, frozen = fed_phases.apply_mode(
            c, CACHE, (train, test, ncls), model, variables, phase
        )
        tr, va = _val_split(len(train["label"]))
        pick = lambda d, i: {k: v[i] for k, v in d.items()}  # noqa: E731
        splits = {"val": (pick(train, tr), pick(train, va)), "test": (train, test)}
        out = (splits, model, params, frozen)
    elif mode in ("head", "ft_last_block"):  # cached prefix activations, 10k subset
        from experiments import common

        arrays, resnet, variables = common.resnet20_arrays(SUBSET)
        field = "feat" if mode == "head" else "act"
        d = {k: {"image": v[field], "label": v["y"]} for k, v in arrays.items()}
        d["train"] = _small(d["train"])
        splits = {"val": (d["train"], d["val"]), "test": (d["train"], d["test"])}
        if mode == "head":
            model = models.get_model("linear", 10)
            params = {
                "params/linear/kernel": np.zeros((64, 10), np.float32),
                "params/linear/bias": np.zeros(10, np.float32),
            }
            frozen = {}
        else:
            flat = flatten(variables)
            flat["params/linear/kernel"] = np.zeros((64, 10), np.float32)
            flat["params/linear/bias"] = np.zeros(10, np.float32)
            params, frozen = split_params(unflatten(flat), (r"layer3_2/.*", r"linear/.*"))
            model = _Suffix(resnet)
        out = (splits, model, params, frozen)
    elif mode in ("full", "scratch_gn"):  # ResNet-20 on the same 3k images, 32x32x3
        c = config_for(arm, 1.0, "example", "iid", 1.0)
        c.data.train_subset, c.data.validation_fraction = SUBSET, 0.1
        train, val, _, model, variables, phase = experiment.prepare(c)
        c.data.train_subset, c.data.validation_fraction = 0, 0.0
        _, test, _ = build.load_data(c)
        params, frozen = split_params(variables, phase.trainable)
        out = ({"val": (_small(train), val), "test": (_small(train), test)}, model, params, frozen)
    else:  # the small CNN from scratch, on the same 10k subset's images
        c = config_for(arm, 1.0, "example", "iid", 1.0)
        c.data.train_subset, c.data.validation_fraction = SUBSET, 0.1
        train, val, ncls = build.load_data(c)
        c.data.train_subset, c.data.validation_fraction = 0, 0.0
        _, test, _ = build.load_data(c)
        train = _small(train)  # the same 3k examples as the HT-3k / FT-3k arms
        model, variables = build.build_model(c, ncls, train["image"][0])
        params, frozen = split_params(variables, (".*",))
        out = ({"val": (train, val), "test": (train, test)}, model, params, frozen)
    _DATA[key] = out
    return out


def _small(arrays: dict) -> dict:
    """The fixed random SMALL examples of the SUBSET (same rows for every arm)."""
    idx = np.sort(np.random.default_rng([VAL_SEED, 3]).permutation(SUBSET)[:SMALL])
    return {k: v[idx] for k, v in arrays.items()}


class _Suffix:
    """The pretrained ResNet-20 from its frozen prefix's activations: the last block + head."""

    def __init__(self, resnet):
        from experiments import common

        self.apply = lambda v, a: resnet.apply(v, a, method=common.resnet20_logits_suffix)


def run_one(arm, split, eps, level, partition, seed, lr) -> dict:
    """One federated run -> accuracy, calibration and epsilon on the split's eval set."""
    t0 = time.time()
    c = config_for(arm, eps, level, partition, lr)
    splits, model, params, frozen = data_for(arm)
    train, evaluation = splits[split]
    clients = experiment.split_clients(c, train["label"])  # config seed 0: same clients every seed
    fc = dataclasses.replace(experiment.fed_config(c), noise_multiplier=-1.0)
    sizes = [len(p) for p in clients]
    skey = (level, eps, fc.rounds, fc.local_steps, max(sizes))
    if skey not in _SIGMA:  # q_local = 1: the calibration depends on nothing else
        _SIGMA[skey] = driver.make_plan(fc, sizes).noise_multiplier
    fc = dataclasses.replace(fc, noise_multiplier=_SIGMA[skey], seed=seed)
    if id(model) not in _FNS:  # one loss and eval function per model: compiled rounds reused
        _FNS[id(model)] = (cross_entropy_loss(model.apply), jax.jit(make_eval_step(model.apply)))
    loss, eval_step = _FNS[id(model)]
    res = runner.run(
        fc,
        loss,
        params,
        frozen,
        train,
        clients,
        clipper=fed_phases.make_clipper(c, fc, params),
        eval_every=fc.rounds,
    )
    metrics = central.evaluate(eval_step, res.params, frozen, evaluation, 500)
    out = {
        "arm": arm,
        "split": split,
        "epsilon_target": eps,
        "epsilon": res.epsilon,
        "level": level,
        "partition": partition,
        "seed": seed,
        "local_lr": lr,
        "noise_multiplier": res.plan.noise_multiplier,
        "accuracy": metrics["test_accuracy"],
        "ece": metrics["test_ece"],
        "nll": metrics["test_loss"],
        "seconds": time.time() - t0,
    }
    print(json.dumps(out), flush=True)
    return out


def tune(arm: str, level: str) -> tuple[float, list[dict]]:
    """The local learning rate with the best validation accuracy (IID, seed 0, tune_eps)."""
    s = SCALE[arm]
    rows = [run_one(arm, "val", s["tune_eps"], level, "iid", 0, lr) for lr in s["grid"]]
    return max(rows, key=lambda r: r["accuracy"])["local_lr"], rows


def summarize(rows: list[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        if r["split"] == "test":
            k = (r["arm"], r["level"], r["partition"], r["epsilon_target"])
            groups.setdefault(k, []).append(r["accuracy"])
    return {
        k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for k, v in groups.items()
    }


def write_report(state: dict, path_md: pathlib.Path) -> str:
    """Markdown table (mean +- std over seeds) and the accuracy-vs-epsilon plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(state["rows"])
    arms = [a for a in SCALE if any(k[0] == a for k in stats)]
    lines = []
    for level in ("example", "client"):
        for partition in ("iid", "dirichlet"):
            keys = [k for k in stats if k[1] == level and k[2] == partition]
            if not keys:
                continue
            eps_all = sorted({k[3] for k in keys})
            lines += [
                f"**{level}-level DP, {partition}** (test accuracy, mean +- std over seeds)",
                "",
                "| arm | " + " | ".join(f"eps={e:g}" for e in eps_all) + " |",
                "|---|" + "---:|" * len(eps_all),
            ]
            for arm in arms:
                cells = []
                for e in eps_all:
                    m = stats.get((arm, level, partition, e))
                    cells.append(f"{m[0]:.3f} +- {m[1]:.3f} (n={m[2]})" if m else "-")
                if any(c != "-" for c in cells):
                    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
            lines.append("")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    colors = {
        "HT": "tab:blue",
        "HT-3k": "tab:cyan",
        "FT-3k": "tab:orange",
        "ST-3k": "tab:green",
        "FTfull-3k": "tab:red",
        "STgn-3k": "tab:olive",
    }
    for ax, level in zip(axes, ("example", "client"), strict=True):
        for arm in arms:
            for partition, style in (("iid", "-o"), ("dirichlet", "--s")):
                pts = sorted(
                    (k[3], v[0], v[1])
                    for k, v in stats.items()
                    if k[0] == arm and k[1] == level and k[2] == partition
                )
                if pts:
                    x, y, e = zip(*pts, strict=True)
                    ax.errorbar(
                        x,
                        y,
                        yerr=e,
                        fmt=style,
                        color=colors[arm],
                        capsize=3,
                        label=f"{arm} {partition}",
                    )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epsilon (delta = 1e-5)")
        ax.set_title(f"{level}-level DP, 100 clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path_md.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", default=",".join(SCALE))
    p.add_argument("--levels", default="example,client")
    p.add_argument("--partitions", default="iid,dirichlet")
    p.add_argument("--epsilons", default="", help="run only these of each arm's epsilons")
    p.add_argument("--out", default=str(OUT / "dpfl_pretraining.json"))
    args = p.parse_args(argv)
    only_eps = {float(e) for e in args.epsilons.split(",") if e}
    t0 = time.time()
    out = pathlib.Path(args.out)
    state = json.loads(out.read_text()) if out.exists() else {"rows": [], "tuned": {}}
    done = {
        (r["arm"], r["split"], r["epsilon_target"], r["level"], r["partition"], r["seed"])
        for r in state["rows"]
    }

    t_last = [t0]

    def save():
        state["scale"] = SCALE
        now = time.time()
        state["wall_seconds"] = state.get("wall_seconds", 0.0) + now - t_last[0]
        t_last[0] = now
        out.write_text(json.dumps(state, indent=1, default=str))

    for arm in args.only.split(","):
        s = SCALE[arm]
        for level in args.levels.split(","):
            if level not in s["levels"]:
                continue
            tkey = f"{arm}/{level}"
            if tkey not in state["tuned"]:
                lr, grid = tune(arm, level)
                state["tuned"][tkey] = {"local_lr": lr, "grid": grid}
                save()
            lr = state["tuned"][tkey]["local_lr"]
            for partition in s["partitions"]:
                if partition not in args.partitions.split(","):
                    continue
                for eps in (e for e in s["epsilons"] if not only_eps or e in only_eps):
                    for seed in range(args.seeds):
                        if (arm, "test", eps, level, partition, seed) in done:
                            continue
                        state["rows"].append(run_one(arm, "test", eps, level, partition, seed, lr))
                        save()
    save()
    table = write_report(state, out.with_suffix(".md"))
    out.with_suffix(".table.md").write_text(table + "\n")
    print(table)
    print(f"study done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
