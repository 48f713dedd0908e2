"""Flat vs automatic vs global clipping (Bu et al. 2023): accuracy and calibration under DP.

    python -m experiments.clipping_calibration          # every run (stored runs reused), report
    python -m experiments.clipping_calibration --quick  # only the report, from the stored runs

A scaled-down CPU test of Bu, Wang, Zha & Karypis, "On the convergence and calibration of deep
learning with differential privacy" (TMLR 2023): the tanh CNN of Tramer & Boneh (configs/
fmnist_cnn.py) trained from scratch with DP-SGD on all of Fashion-MNIST at (epsilon 3, delta
1e-5), through `dpft.train.train_and_evaluate`, with the clipping rules of
`dpft.privacy.clippers` at the same R (so the same noise on the update):

* ``flat``: ``g min(1, R / ||g||)``; ``auto``: AUTO-S, ``R g / (||g|| + 0.01)``;
* ``global_qXX`` (XX = 50, 90): ``g (R / Z) 1[||g|| <= Z]`` with the threshold Z at the XX%
  quantile of the per-example gradient norms at initialisation. Those norms are measured
  NON-PRIVATELY, once, on 2000 examples of the validation split at the seed-0 initialisation
  (`init_norms`); like the hyperparameter tuning, this choice is outside epsilon. (Z = R would
  drop every example: R is below every initial norm.)

Tuning: each mode tries the same learning rates (`LRS`), trained on 90% of the training split
and scored on the other 10% (``data.validation_fraction = 0.1``, seed 0); the best per mode is
rerun on the whole training split with seeds 0-2 and scored on the test split (outside epsilon,
as usual). Calibration: ECE (15 bins) and the signed gap mean confidence - accuracy (positive =
over-confident) on the test split.

A noiseless check (`convergence`): full-batch gradient descent (sigma 0) of a small tanh MLP on
1000 training examples with flat and global clipping (Z at the 10/50/90% quantiles) at the same
R and learning rate, and plain gradient descent, loss per step.

Finished runs are stored in ``runs/calib/<run>/cell.json`` (the loss curves in
``runs/calib/convergence.json``); a rerun only redraws experiments/results/clipping_calibration*.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import time

import numpy as np

from experiments.clipping_calibration_report import (
    EPOCHS,
    LRS,
    MODES,
    QUANTILES,
    RADIUS,
    ROOT,
    RUNS,
    SEEDS,
    write_all,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_config(seed: int, split: str):
    spec = importlib.util.spec_from_file_location("_calib_cnn", ROOT / "configs/fmnist_cnn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.seed = seed
    c.tensorboard = False
    c.data.validation_fraction = 0.1 if split == "val" else 0.0
    c.dp.epsilon = 3.0
    c.dp.delta = 1e-5
    c.dp.clip_norm = RADIUS
    c.train.epochs = EPOCHS
    c.train.eval_every = 10**9  # evaluate at the end only
    c.train.checkpoint_every = 10**9
    c.train.log_every = 10
    return c


def init_norms() -> dict:
    """Per-example gradient norms of the seed-0 initialisation on 2000 validation examples.

    Not private (a diagnostic that fixes the global threshold Z, outside epsilon); cached.
    """
    path = RUNS / "init_norms.json"
    if path.exists():
        return json.loads(path.read_text())
    import jax
    import jax.numpy as jnp

    from dpft.privacy import clipping
    from dpft.train import build
    from dpft.train.step import cross_entropy_loss, flatten, partition

    c = base_config(0, "val")
    _, val, k = build.load_data(c)
    model, variables = build.build_model(c, k, val["image"][0])
    trainable, frozen = partition(flatten(variables), tuple(c.finetune.trainable))
    loss = cross_entropy_loss(model.apply)
    fn = clipping.clipped_grad(
        lambda p, ex, rng: loss(p, frozen, ex, rng),
        clipping.FlatClip(math.inf),
        microbatch_size=250,
    )
    n = 2000
    batch = {"image": jnp.asarray(val["image"][:n]), "label": jnp.asarray(val["label"][:n])}
    norms = np.asarray(fn(trainable, batch, jnp.ones(n), jax.random.PRNGKey(0)).norms)
    out = {
        "n": n,
        "quantiles": {str(q): float(np.quantile(norms, q)) for q in (0.01, 0.1, 0.5, 0.9, 0.99)},
    }
    RUNS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def clipper_settings(mode: str, norms: dict) -> dict:
    """``config.dp`` settings of a mode (global: Z from the init-norm quantiles)."""
    if mode.startswith("global_q"):
        q = QUANTILES[mode]
        return {"clipping": "global", "global_threshold": norms["quantiles"][str(q)]}
    return {"clipping": mode}


def _calibration_dict(res: dict) -> dict:
    """The run's ``calibration.json`` (`dpft.train.report.write_calibration`) with the mean
    confidence and the signed gap mean confidence - accuracy (positive: over-confident)."""
    counts = np.asarray(res["bin_counts"], np.float64)
    conf = np.nan_to_num(np.asarray(res["bin_confidence"], np.float64))
    acc = np.nan_to_num(np.asarray(res["bin_accuracy"], np.float64))
    mean_conf = float((counts * conf).sum() / counts.sum())
    return {
        "ece": float(res["ece"]),
        "mce": float(res["mce"]),
        "nll": float(res["nll"]),
        "accuracy": float(res["accuracy"]),
        "mean_confidence": mean_conf,
        "gap": mean_conf - float(res["accuracy"]),
        "bin_edges": list(res["bin_edges"]),
        "bin_counts": counts.tolist(),
        "bin_confidence": conf.tolist(),
        "bin_accuracy": acc.tolist(),
    }


def run_cell(mode: str, lr: float, seed: int, split: str, norms: dict) -> dict:
    """One training run (or its stored result): ``runs/calib/<name>/cell.json``."""
    name = f"{mode}_lr{lr:g}_s{seed}_{split}"
    workdir = RUNS / name
    cell_file = workdir / "cell.json"
    if cell_file.exists():
        return json.loads(cell_file.read_text())
    c = base_config(seed, split)
    for k, v in clipper_settings(mode, norms).items():
        c.dp[k] = v
    c.train.learning_rate = float(lr)
    done = (workdir / "summary.json").exists() and (workdir / "calibration.json").exists()
    t0 = time.time()
    if not done:  # a finished run whose cell.json is missing is read back, not retrained
        from dpft.train import train_and_evaluate

        shutil.rmtree(workdir, ignore_errors=True)
        train_and_evaluate(c, workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    calibration = json.loads((workdir / "calibration.json").read_text())
    losses = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "debug/train_loss" in rec:
            losses.append([rec.get("step"), rec["debug/train_loss"]])
    cell = {
        "mode": mode,
        "lr": lr,
        "seed": seed,
        "split": split,
        "R": RADIUS,
        "Z": c.dp.global_threshold if c.dp.clipping == "global" else None,
        "epsilon": summary["epsilon"],
        "noise_multiplier": summary["noise_multiplier"],
        "steps": summary["steps"],
        "n_train": summary["num_train_examples"],
        "seconds": summary.get("wall_seconds", time.time() - t0),
        "train_loss": losses,
        **_calibration_dict(calibration),
    }
    cell_file.write_text(json.dumps(cell))
    log(
        f"{name}: acc {cell['accuracy']:.4f} ece {cell['ece']:.4f} gap {cell['gap']:+.4f} "
        f"eps {cell['epsilon']:.3f} ({cell['seconds']:.0f}s)"
    )
    return cell


# --------------------------------------------------------------------------------------------
# Noiseless convergence check


def convergence(n: int = 1000, steps: int = 200, hidden: int = 32) -> dict:
    """Full-batch GD (sigma 0) of a tanh MLP 784-hidden-10 on ``n`` training examples.

    Flat clipping at R and global clipping at the same R with Z at the 10/50/90% quantiles of
    the initial per-example norms, all at the same learning rate (so the same largest
    per-example step lr R), and unclipped gradient descent at lr R / Z_50 (the step of a kept
    example under global clipping at the median). The loss is the mean training loss before
    each step. Each finished run is stored at once in the study's JSON file.
    """
    path = RUNS / f"convergence_n{n}_T{steps}_h{hidden}.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    import jax
    import jax.numpy as jnp
    import optax

    from dpft import optim
    from dpft.data import load
    from dpft.privacy import clipping
    from experiments.clipping_calibration_report import CONV_LRS, CONV_R

    train = load("fashion_mnist", "train")
    idx = np.random.default_rng(0).permutation(len(train.labels))[:n]
    x = np.asarray(train.images[idx], np.float32).reshape(n, -1)
    x = x / 255.0 if x.max() > 1.5 else x
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(train.labels[idx], jnp.int32)}
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    d = x.shape[1]
    params0 = {
        "w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
        "b2": jnp.zeros(10),
    }

    def loss_fn(p, ex, key):
        h = jnp.tanh(ex["x"] @ p["w1"] + p["b1"])
        return -jax.nn.log_softmax(h @ p["w2"] + p["b2"])[ex["y"]], ()

    mask = jnp.ones((n,), jnp.float32)
    norms0 = np.asarray(
        clipping.clipped_grad(loss_fn, clipping.FlatClip(math.inf))(
            params0, batch, mask, jax.random.PRNGKey(0)
        ).norms
    )
    zq = {q: float(np.quantile(norms0, q)) for q in (0.1, 0.5, 0.9)}
    out.update({"n": n, "steps": steps, "hidden": hidden, "R": CONV_R, "Z": zq})
    out.setdefault("runs", {})
    out["init_norm_quantiles"] = {
        str(q): float(np.quantile(norms0, q)) for q in (0.1, 0.5, 0.9, 0.99)
    }
    for lr in CONV_LRS:
        rules = {"flat": clipping.FlatClip(CONV_R)}
        for q, z in zq.items():
            rules[f"global_q{int(q * 100)}"] = clipping.GlobalClip(CONV_R, threshold=z)
        rules["unclipped"] = clipping.FlatClip(math.inf)
        for name, rule in rules.items():
            if f"{name} lr={lr:g}" in out["runs"]:
                continue
            step_lr = lr * CONV_R / zq[0.5] if name == "unclipped" else lr
            grad_fn = clipping.clipped_grad(loss_fn, rule)
            tx = optim.dp_sgd(
                step_lr,
                noise_multiplier=0.0,
                l2_sensitivity=CONV_R,
                expected_batch_size=float(n),
                key=1,
            )

            @jax.jit
            def step(p, o, grad_fn=grad_fn, tx=tx):
                g = grad_fn(p, batch, mask, jax.random.PRNGKey(0))
                upd, o = tx.update(g.grad_sum, o, p)
                return optax.apply_updates(p, upd), o, jnp.mean(g.loss), g.num_clipped

            p, o = params0, tx.init(params0)
            losses, clipped = [], []
            for _ in range(steps):
                p, o, loss, nc = step(p, o)
                losses.append(float(loss))
                clipped.append(int(nc))
            out["runs"][f"{name} lr={lr:g}"] = {
                "rule": name,
                "lr": lr,
                "step_lr": step_lr,
                "loss": losses,
                "clipped_or_dropped": clipped,
            }
            RUNS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out))
            log(f"convergence {name} lr={lr:g}: final loss {losses[-1]:.4f}")
    return out


def chosen_lr(mode: str) -> float:
    """The learning rate of ``mode`` with the best validation accuracy (the only one if one)."""
    if len(LRS) == 1:
        return LRS[0]
    val = [json.loads((RUNS / f"{mode}_lr{lr:g}_s0_val" / "cell.json").read_text()) for lr in LRS]
    return max(val, key=lambda c: c["accuracy"])["lr"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the report, from stored runs")
    ap.add_argument("--skip-convergence", action="store_true", help="only the CNN runs")
    ap.add_argument("--only-convergence", action="store_true", help="only the noiseless check")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset to train")
    args = ap.parse_args(argv)
    if not args.quick:
        from dpft.host import tune_host_allocator

        tune_host_allocator()
        if not args.skip_convergence:
            convergence()
        if args.only_convergence:
            write_all()
            return
        norms = init_norms()
        log(f"init norm quantiles: {norms['quantiles']}")
        modes = [m for m in args.modes.split(",") if m]
        if len(LRS) > 1:  # one candidate: nothing to choose, no validation runs
            for lr in LRS:
                for mode in modes:
                    run_cell(mode, lr, 0, "val", norms)
        for seed in SEEDS:
            for mode in modes:
                run_cell(mode, chosen_lr(mode), seed, "test", norms)
    write_all()


if __name__ == "__main__":
    main()
