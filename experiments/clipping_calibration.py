"""Clipping mode x clipping norm x learning rate: accuracy and calibration under DP (eps 3).

A scaled-down CPU replication of Bu, Wang, Zha, Karypis, "On the convergence and calibration of
deep learning with differential privacy" (TMLR 2023): Fashion-MNIST at (epsilon 3, delta 1e-5),
flat (local), per-layer, automatic and global clipping, over R in {0.1, 1, 10, 100} crossed with
a learning-rate grid lr = c / R (for every mode the update of a fully clipped batch scales with
lr * R, so c walks along the eta * R diagonal of Bu et al.), in two settings:

* ``head``: the CIFAR-10-pretrained ResNet-20 with its backbone FROZEN (features cached once in
  ``runs/calib/cache``); only the linear head is trained (full fine-tuning is too slow here);
* ``cnn``: the tanh CNN of Tramer & Boneh from scratch, on a 5k-example training subset, 2
  epochs.

The grid (one seed per cell) is selected on a validation split carved from the training set
(``data.validation_fraction = 0.1``); the best cell of each mode (by validation accuracy) is
then re-run with 3 seeds on the full training set (or subset) and evaluated on the test split.
A third part runs full-batch DP-GD (sampling rate 1) with flat vs global clipping on a small
subset and plots the training loss per step.

    python -m experiments.clipping_calibration          # everything (~1 hour on 2 CPU cores)
    python -m experiments.clipping_calibration --quick  # a coarse, shorter version

Finished runs are cached in ``runs/calib/<setting>/<run>/cell.json``; re-running only redraws.
Writes ``experiments/results/clipping_calibration{.md,.json,_*.png}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import time

import numpy as np

from experiments.clipping_calibration_report import (
    C_GRID,
    MODES,
    OUT,
    R_GRID,
    ROOT,
    RUNS,
    heatmap,
    plot_loss_curves,
    write_report,
)

# The paths, MODES and the grids live in experiments.clipping_calibration_report (its report
# quotes them).
SEEDS = (0, 1, 2)

# --------------------------------------------------------------------------------------------
# One training run through the trainer
# --------------------------------------------------------------------------------------------


def _get_config(setting: str):
    name = "fmnist_resnet20.py" if setting == "head" else "fmnist_cnn.py"
    spec = importlib.util.spec_from_file_location(f"_calib_cfg_{setting}", ROOT / "configs" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def make_config(setting, mode, r, lr, seed, split, quick=False):
    c = _get_config(setting)
    c.seed = seed
    c.tensorboard = False
    c.dp.epsilon = 3.0
    c.dp.delta = 1e-5
    c.dp.clipping = mode
    c.dp.clip_norm = float(r)
    c.dp.global_threshold = 0.0  # Z = R (WLOG given the lr grid: see the report)
    c.train.learning_rate = float(lr)
    c.data.validation_fraction = 0.1 if split == "val" else 0.0
    c.train.eval_every = 10**9  # evaluate at the end only
    c.train.checkpoint_every = 10**9
    if setting == "head":  # fmnist_resnet20 defaults: batch 2048, 6 epochs, momentum, cosine
        c.finetune.cache_dir = str(RUNS / "cache")
        c.train.epochs = 3.0 if quick else 6.0
        c.train.log_every = 10
    else:  # fmnist_cnn scaled down: 5k examples, batch 250, 2 epochs, momentum 0.9
        c.data.train_subset = 5000
        c.data.eval_subset = 3000 if split == "val" else 0
        c.train.batch_size = 250
        c.train.epochs = 1.0 if quick else 2.0
        c.train.microbatch_size = 0
        c.train.log_every = 4
    return c


def _memoize(fn):
    memo: dict = {}

    def wrapped(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in memo:
            memo[key] = fn(*args, **kwargs)
        return memo[key]

    wrapped.__wrapped__ = fn
    return wrapped


def _patch_trainer(captured: dict) -> None:
    """Keeps the final CalibrationResult; skips the per-run PNGs; and, since every cell of a
    setting shares its data and privacy plan, memoizes data loading and the (pure) accounting
    searches across the runs of this process (time on 2 shared cores).
    """
    from dpft.privacy import accounting
    from dpft.train import build, report, trainer

    def capture(result, path, title=None):
        captured["calibration"] = result

    trainer.reliability_diagram = capture
    report.plot_curves = lambda *a, **k: None
    if not hasattr(build.load_data, "__wrapped__"):
        load = build.load_data
        memo: dict = {}

        def load_data(config):
            key = (json.dumps(config.data.to_dict(), sort_keys=True, default=str), config.seed)
            if key not in memo:
                memo[key] = load(config)
            return memo[key]

        load_data.__wrapped__ = load
        build.load_data = load_data
        for name in ("calibrate_noise_multiplier", "calibrate_steps", "compute_epsilon"):
            setattr(accounting, name, _memoize(getattr(accounting, name)))


def _result_to_dict(res) -> dict:
    return {
        "ece": res.ece,
        "mce": res.mce,
        "nll": res.nll,
        "accuracy": res.accuracy,
        "count": res.count,
        "bin_edges": res.bin_edges.tolist(),
        "bin_counts": res.bin_counts.tolist(),
        "bin_confidence": [None if math.isnan(x) else x for x in res.bin_confidence],
        "bin_accuracy": [None if math.isnan(x) else x for x in res.bin_accuracy],
    }


def _result_from_dict(d: dict):
    from dpft.metrics import CalibrationResult

    def arr(xs):
        return np.array([np.nan if x is None else x for x in xs], dtype=np.float64)

    return CalibrationResult(
        ece=d["ece"],
        mce=d["mce"],
        nll=d["nll"],
        accuracy=d["accuracy"],
        count=d["count"],
        bin_edges=np.asarray(d["bin_edges"]),
        bin_counts=np.asarray(d["bin_counts"], dtype=np.int64),
        bin_confidence=arr(d["bin_confidence"]),
        bin_accuracy=arr(d["bin_accuracy"]),
    )


def run_cell(setting, mode, r, c, seed, split, quick=False, cached_only=False) -> dict | None:
    lr = c / r
    name = f"{mode}_R{r:g}_c{c:g}_s{seed}_{split}" + ("_quick" if quick else "")
    workdir = RUNS / setting / name
    cell_file = workdir / "cell.json"
    if cell_file.exists():
        return json.loads(cell_file.read_text())
    if cached_only:
        return None
    from dpft.train import train_and_evaluate

    shutil.rmtree(workdir, ignore_errors=True)
    captured: dict = {}
    _patch_trainer(captured)
    t0 = time.time()
    summary = train_and_evaluate(make_config(setting, mode, r, lr, seed, split, quick), workdir)
    losses = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "debug/train_loss" in rec:
            losses.append([rec.get("step"), rec["debug/train_loss"]])
    cell = {
        "setting": setting,
        "mode": mode,
        "R": r,
        "c": c,
        "lr": lr,
        "seed": seed,
        "split": split,
        "accuracy": summary["test_accuracy"],
        "ece": summary["test_ece"],
        "mce": summary["test_mce"],
        "nll": summary["test_loss"],
        "epsilon": summary["epsilon"],
        "noise_multiplier": summary["noise_multiplier"],
        "steps": summary["steps"],
        "n_train": summary["num_train_examples"],
        "wall_seconds": time.time() - t0,
        "train_loss": losses,
        "calibration": _result_to_dict(captured["calibration"]),
    }
    cell_file.write_text(json.dumps(cell))
    print(
        f"[{setting}] {name}: acc {cell['accuracy']:.4f} ece {cell['ece']:.4f} "
        f"mce {cell['mce']:.4f} nll {cell['nll']:.4f} eps {cell['epsilon']:.3f} "
        f"({cell['wall_seconds']:.0f}s)",
        flush=True,
    )
    return cell


# --------------------------------------------------------------------------------------------
# Full-batch DP-GD: training loss per step, flat vs global clipping
# --------------------------------------------------------------------------------------------


def _train_features() -> tuple[np.ndarray, np.ndarray]:
    """Cached ResNet-20 training-set features (the grid's cache: 90% train split) and labels."""
    from dpft.train import build

    for desc_file in sorted((RUNS / "cache").glob("features-*.json")):
        desc = json.loads(desc_file.read_text())
        if not desc.get("train_subset"):
            with np.load(desc_file.with_suffix(".npz")) as f:
                feats = f["train"]
            cfg = _get_config("head")
            cfg.data.validation_fraction = desc.get("validation_fraction", 0.0)
            cfg.seed = desc.get("seed") or 0
            train, _, _ = build.load_data(cfg)
            assert len(train["label"]) == len(feats)
            return feats, train["label"]
    raise FileNotFoundError("no feature cache in runs/calib/cache yet: run the head grid first")


def loss_curves(n: int, steps: int, quick=False) -> dict:
    """Full-batch (q = 1) DP-GD of the linear head on ``n`` examples' frozen ResNet-20 features.

    Flat clipping at R and global clipping at the same R (same sensitivity, same noise) with a
    fixed threshold Z, plain gradient descent (no momentum) with the same learning rate; also
    noiseless (sigma 0) runs to isolate the clipping itself. Epsilon 3 over the ``steps`` steps.
    The loss is the mean per-example training loss at the parameters BEFORE each step (not
    private; a diagnostic).
    """
    cache = RUNS / f"loss_curves_n{n}_T{steps}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import jax
    import jax.numpy as jnp
    import optax

    from dpft import optim
    from dpft.privacy import accounting, clipping

    feats, labels = _train_features()
    idx = np.random.default_rng(0).permutation(len(labels))[:n]
    batch = {"x": jnp.asarray(feats[idx]), "y": jnp.asarray(labels[idx])}
    params0 = {"w": jnp.zeros((feats.shape[1], 10)), "b": jnp.zeros((10,))}

    def loss_fn(p, ex, key):
        logits = ex["x"] @ p["w"] + p["b"]
        return -jax.nn.log_softmax(logits)[ex["y"]], ()

    mask = jnp.ones((n,), jnp.float32)
    sigma = accounting.calibrate_noise_multiplier(3.0, 1e-5, 1.0, steps)
    r, z, lr = 0.1, 10.0, 20.0  # flat: lr * R = 2 (all clipped); global: lr * R / Z = 0.2
    out = {"n": n, "steps": steps, "sigma": sigma, "R": r, "Z": z, "lr": lr, "curves": {}}
    norms0 = clipping.clipped_grad(loss_fn, clipping.FlatClip(r))(
        params0, batch, mask, jax.random.PRNGKey(0)
    ).norms
    out["init_norm_quantiles"] = {
        str(q): float(np.quantile(np.asarray(norms0), q)) for q in (0.1, 0.5, 0.9, 0.99)
    }
    clippers = {"flat": clipping.FlatClip(r), "global": clipping.GlobalClip(r, threshold=z)}
    for noise in ("noiseless", "dp"):
        s = sigma if noise == "dp" else 0.0
        for name, clipper in clippers.items():
            grad_fn = clipping.clipped_grad(loss_fn, clipper)
            tx = optim.dp_sgd(
                lr, noise_multiplier=s, l2_sensitivity=r, expected_batch_size=float(n), key=1
            )

            @jax.jit
            def step(p, o, k, grad_fn=grad_fn, tx=tx):
                g = grad_fn(p, batch, mask, k)
                upd, o = tx.update(g.grad_sum, o, p)
                return optax.apply_updates(p, upd), o, jnp.mean(g.loss), g.num_clipped

            p, o = params0, tx.init(params0)
            losses, clipped = [], []
            for t in range(steps):
                p, o, loss, nc = step(p, o, jax.random.PRNGKey(100 + t))
                losses.append(float(loss))
                clipped.append(int(nc))
            key = f"{name}_{noise}"
            out["curves"][key] = {"loss": losses, "num_clipped_or_dropped": clipped}
            inc = int(np.sum(np.diff(losses) > 0))
            print(f"[loss curves] {key}: final {losses[-1]:.4f}, {inc} increases", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


# R visited first per mode, so that a partial grid holds the informative cells: flat/auto/
# per-layer at the small R where every example is clipped, global at an R (= Z) above most norms.
R_PRIORITY = {
    "flat": (0.1, 10.0, 1.0, 100.0),
    "global": (10.0, 1.0, 100.0, 0.1),
    "auto": (0.1, 1.0, 10.0, 100.0),
    "per_layer": (0.1, 1.0, 10.0, 100.0),
}


def cell_order(setting: str, r_grid) -> list[tuple[float, float, str]]:
    """(c, R, mode) in run order: the middle lr first, then round-robin over modes."""
    cs = C_GRID[setting]
    c_order = [cs[len(cs) // 2]] + [c for c in cs if c != cs[len(cs) // 2]]
    out = []
    for c in c_order:
        for k in range(len(R_GRID)):
            for mode in ("flat", "global", "auto", "per_layer"):
                r = R_PRIORITY[mode][k]
                if r in r_grid:
                    out.append((c, r, mode))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs, R in {0.1, 10} only")
    ap.add_argument("--settings", default="head,cnn")
    ap.add_argument("--no-seeds", action="store_true", help="skip the 3-seed best-cell runs")
    ap.add_argument("--no-loss-curves", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="use cached runs only")
    ap.add_argument("--loss-n", type=int, default=2000)
    ap.add_argument("--loss-steps", type=int, default=200)
    args = ap.parse_args(argv)
    started = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    settings = [s for s in args.settings.split(",") if s]
    r_grid = (0.1, 10.0) if args.quick else R_GRID
    results: dict = {}
    for setting in settings:
        grid, missing = [], 0
        for c, r, mode in cell_order(setting, r_grid):
            cell = run_cell(setting, mode, r, c, 0, "val", args.quick, cached_only=args.report_only)
            if cell is None:
                missing += 1
            else:
                grid.append(cell)
        best: dict = {}
        for mode in MODES:
            cells = [x for x in grid if x["mode"] == mode]
            if not cells:
                continue
            b = max(cells, key=lambda x: x["accuracy"])
            entry = {"R": b["R"], "c": b["c"], "lr": b["lr"], "val_accuracy": b["accuracy"]}
            runs = []
            if not args.no_seeds:
                for seed in SEEDS:
                    cell = run_cell(
                        setting,
                        mode,
                        b["R"],
                        b["c"],
                        seed,
                        "test",
                        args.quick,
                        cached_only=args.report_only,
                    )
                    if cell is not None:
                        runs.append(cell)
            entry["test_runs"] = runs
            entry["val_cell"] = b  # stands in (validation, 1 seed) where no test runs were made
            best[mode] = entry
        results[setting] = {"grid": grid, "best": best, "missing": missing}
        for mode in MODES:
            cells = [x for x in grid if x["mode"] == mode]
            if cells:
                heatmap(cells, setting, mode, C_GRID[setting])
        if best:
            from dpft.metrics import reliability_diagrams

            diagrams = {
                f"{setting} {mode}: R={b['R']:g}, lr={b['lr']:g}"
                + ("" if b["test_runs"] else " (val)"): _result_from_dict(
                    (b["test_runs"] or [b["val_cell"]])[0]["calibration"]
                )
                for mode, b in best.items()
            }
            reliability_diagrams(diagrams, OUT / f"clipping_calibration_reliability_{setting}.png")
    lc = None
    if not args.no_loss_curves:
        cache = RUNS / f"loss_curves_n{args.loss_n}_T{args.loss_steps}.json"
        if not args.report_only or cache.exists():
            lc = loss_curves(args.loss_n, args.loss_steps, args.quick)
            plot_loss_curves(lc)

    def strip(cell):
        return {k: v for k, v in cell.items() if k != "calibration"}

    dump = {
        s: {
            "grid": [strip(x) for x in res["grid"]],
            "best": {
                m: {
                    **b,
                    "test_runs": [strip(x) for x in b["test_runs"]],
                    "val_cell": strip(b["val_cell"]),
                }
                for m, b in res["best"].items()
            },
            "missing_cells": res["missing"],
        }
        for s, res in results.items()
    }
    if lc:
        dump["loss_curves"] = lc
    (OUT / "clipping_calibration.json").write_text(json.dumps(dump, indent=1))
    write_report(results, lc, args, started)
    print(f"wrote {OUT / 'clipping_calibration.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
