"""Feature-based DP methods vs DP-SGD linear probing on frozen ResNet-20 features (issue 6 (a)).

PLACEHOLDER: filled in below.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from experiments.feature_methods_report import DELTA, VAL_SEEDS, plot, write_md

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = pathlib.Path(__file__).parent / "results"
CACHE = ROOT / "runs" / "feature_cache"
SPLIT_SEED = 0
VAL_FRACTION = 0.1


def load_features(dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train','val','test'}: (features [N, 64] f32, labels [N] i32), cached in runs/."""
    import jax

    from dpft.config import base_config
    from dpft.models import pretrained
    from dpft.train.build import load_data
    from dpft.train.features import cached_features, file_identity

    model, variables = pretrained.load("resnet20")

    def feature_fn(x):
        return model.apply(variables, x, method=model.features)

    def config(val_fraction):
        c = base_config()
        c.seed = SPLIT_SEED
        c.data.name = dataset
        c.model.name = "resnet20"
        c.data.validation_fraction = val_fraction
        return c

    train, val, _ = load_data(config(VAL_FRACTION))
    _, test, _ = load_data(config(0.0))
    desc = {
        "backbone": "resnet20",
        "weights": file_identity(pretrained.weights_path("resnet20", None)),
        "dataset": dataset,
        "preprocessing": "cifar_pretrained",
        "validation_fraction": VAL_FRACTION,
        "split_seed": SPLIT_SEED,
        "jax": jax.__version__,
    }
    images = {"train": train["image"], "val": val["image"], "test": test["image"]}
    feats = cached_features(CACHE, desc, feature_fn, images, batch_size=500)
    labels = {"train": train["label"], "val": val["label"], "test": test["label"]}
    return {k: (feats[k], labels[k].astype(np.int32)) for k in images}


# ----------------------------------------------------------------------------------------------
# Methods. Each takes (X, y, K, epsilon, key, **hp) and returns (LinearParams, spent epsilon).


def _key(seed: int):
    import jax

    return jax.random.PRNGKey(seed)


def run_gd(X, y, k, eps, seed, **hp):
    from dpft import linear

    params, info = linear.dp_gd(X, y, k, epsilon=eps, delta=DELTA, key=_key(seed), **hp)
    return params, info["epsilon"]


def run_ls(X, y, k, eps, seed, **hp):
    from dpft import linear

    params, info = linear.dp_least_squares(X, y, k, epsilon=eps, delta=DELTA, key=_key(seed), **hp)
    return params, info["epsilon"]


def run_newton(X, y, k, eps, seed, **hp):
    from dpft import linear

    params, info = linear.dp_newton(X, y, k, epsilon=eps, delta=DELTA, key=_key(seed), **hp)
    return params, info["epsilon"]


def run_fc(X, y, k, eps, seed, **hp):
    from dpft import linear

    params, info = linear.dp_fc(X, y, k, epsilon=eps, delta=DELTA, key=_key(seed), **hp)
    return params, info["epsilon"]


_SIGMA_CACHE: dict = {}


def dpsgd_sigma(eps: float, q: float, steps: int, n: int, cap: int) -> float:
    """Noise multiplier of `steps` Poisson-sampled Gaussian steps (PLD, batch cap accounted)."""
    import json

    from dpft.privacy.accounting import calibrate_noise_multiplier

    path = CACHE / "dpsgd_sigma.json"
    if not _SIGMA_CACHE and path.exists():
        _SIGMA_CACHE.update(json.loads(path.read_text()))
    key = repr((eps, q, steps, n, cap, DELTA))
    if key not in _SIGMA_CACHE:
        _SIGMA_CACHE[key] = calibrate_noise_multiplier(
            eps, DELTA, q, steps, "pld", 1e-2, dataset_size=n, max_batch_size=cap
        )
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_SIGMA_CACHE, indent=1))
    return _SIGMA_CACHE[key]


def run_dpsgd(X, y, k, eps, seed, *, batch, epochs, learning_rate, clip_norm, momentum=0.0):
    """DP-SGD linear probe: Poisson batches (expected size `batch`, static cap), per-example
    clipping (`clipped_grad` + `FlatClip`), `dp_sgd` (noise on the sum, divide by the expected
    batch size), from a zero head; the whole run is one jitted `lax.scan`."""
    import jax
    import jax.numpy as jnp

    from dpft import optim
    from dpft.linear import LinearParams
    from dpft.privacy import clipping

    n, d = X.shape
    q = batch / n
    steps = int(round(epochs / q))
    cap = int(batch + 8 * np.sqrt(batch) + 16)
    sigma = dpsgd_sigma(eps, q, steps, n, cap)  # PLD epsilon <= eps by construction
    # Poisson sampling on the host (numpy, seeded by the run's seed); truncation at `cap`.
    rng = np.random.default_rng([seed, 0x5D65])
    idx = np.zeros((steps, cap), np.int32)
    mask = np.zeros((steps, cap), np.float32)
    for t in range(steps):
        sel = np.flatnonzero(rng.random(n) < q)[:cap]
        idx[t, : len(sel)] = sel
        mask[t, : len(sel)] = 1.0

    def loss_fn(p, ex, rng_):
        del rng_
        z = ex["x"] @ p["w"] + p["b"]
        return -jax.nn.log_softmax(z)[ex["y"]], ()

    grad_fn = clipping.clipped_grad(loss_fn, clipping.FlatClip(clip_norm))
    tx = optim.dp_sgd(
        learning_rate,
        noise_multiplier=sigma,
        l2_sensitivity=clip_norm,
        expected_batch_size=float(batch),
        key=jax.random.PRNGKey(seed),
        momentum=momentum or None,
    )
    params = {"w": jnp.zeros((d, k), jnp.float32), "b": jnp.zeros((k,), jnp.float32)}
    Xj, yj = jnp.asarray(X), jnp.asarray(y)

    @jax.jit
    def train(params, idx, mask):
        def body(carry, xs):
            p, s = carry
            i, m = xs
            g = grad_fn(p, {"x": Xj[i], "y": yj[i]}, m, jax.random.PRNGKey(0)).grad_sum
            upd, s = tx.update(g, s, p)
            return (jax.tree_util.tree_map(jnp.add, p, upd), s), None

        (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), (idx, mask))
        return p

    p = train(params, jnp.asarray(idx), jnp.asarray(mask))
    return LinearParams(p["w"], p["b"]), eps


# ----------------------------------------------------------------------------------------------
# Grids (tuned on the validation split, per epsilon). Feature norms of these ResNet-20 features
# are ~1-3 (see the md); grids are in absolute units.

# DELTA (and VAL_SEEDS) live in experiments.feature_methods_report, which quotes them.
EPSILONS = (0.01, 0.05, 0.1, 0.5, 1.0, 3.0, 8.0)


def grids(quick: bool) -> dict[str, tuple]:
    """method -> (label, runner, list of hyperparameter dicts)."""
    g = {
        "dp_gd_1step_sgd": (
            "DP-GD, 1 step, SGD",
            run_gd,
            [dict(steps=1, update="sgd", learning_rate=1.0, clip_norm=c) for c in CLIPS_GD1],
        ),
        "dp_gd_1step_adam": (
            "DP-GD, 1 step, Adam",
            run_gd,
            [dict(steps=1, update="adam", learning_rate=1.0, clip_norm=c) for c in CLIPS_GD1],
        ),
        "dp_gd_multi": (
            "DP-GD, multi-step",
            run_gd,
            [dict(steps=s, update=u, learning_rate=lr, clip_norm=c) for (s, u, lr, c) in GD_MULTI],
        ),
        "dp_least_squares": (
            "DP least squares",
            run_ls,
            [dict(feature_clip=f, reg=r) for f in LS_FEATURE_CLIPS for r in LS_REGS],
        ),
        "dp_newton": (
            "DP-Newton",
            run_newton,
            [dict(feature_clip=f, steps=s, reg=r, hessian=h) for (f, s, r, h) in NEWTON],
        ),
        "dp_fc": (
            "DP-FC",
            run_fc,
            [
                dict(feature_clip=f, clip_norm=c, steps=s, learning_rate=lr, cov_fraction=cf, reg=r)
                for (f, c, s, lr, cf, r) in FC
            ],
        ),
        "dp_sgd": (
            "DP-SGD (Poisson, linear probe)",
            run_dpsgd,
            [
                dict(batch=b, epochs=e, learning_rate=lr, clip_norm=c, momentum=0.9)
                for (b, e, lr, c) in DPSGD
            ],
        ),
    }
    if quick:
        g = {m: (lab, fn, cfgs[:2]) for m, (lab, fn, cfgs) in g.items()}
    return g


def evaluate(runner, data, split, k, eps, seed, hp) -> tuple[float, float]:
    from dpft import linear

    X, y = data["train"]
    params, spent = runner(X, y, k, eps, seed, **hp)
    acc = float(linear.accuracy(params, *data[split]))
    if not np.isfinite(acc):
        acc = 0.0
    return acc, float(spent)


def ceilings(data, k) -> dict:
    """Non-private logistic regression and least squares (reg tuned on validation)."""
    from dpft import linear

    X, y = data["train"]
    out = {}
    for name, fit, regs in (
        ("logistic_regression", lambda r: linear.logistic_regression(X, y, k, reg=r), LR_REGS),
        ("least_squares", lambda r: linear.least_squares(X, y, k, reg=r), NP_LS_REGS),
    ):
        best = None
        for r in regs:
            p = fit(r)
            v = float(linear.accuracy(p, *data["val"]))
            if best is None or v > best[0]:
                best = (v, r, float(linear.accuracy(p, *data["test"])))
        out[name] = {"val": best[0], "reg": best[1], "test": best[2]}
        log(f"  ceiling {name}: reg={best[1]} val={best[0]:.4f} test={best[2]:.4f}")
    return out


def study(
    dataset: str,
    seeds: int,
    quick: bool,
    methods: list[str] | None,
    part: pathlib.Path,
    dpsgd_grid: int = 0,
    epsilons: tuple[float, ...] | None = None,
) -> dict:
    """Tunes each method on validation and tests it, per epsilon; `part` (a JSON file) holds the
    results so far: it is rewritten after every (method, epsilon) and, with `methods` given,
    merged into (so a study can be completed in several runs)."""
    import json

    data = load_features(dataset)
    k = int(max(data["train"][1].max(), data["test"][1].max()) + 1)
    norms = np.linalg.norm(data["train"][0], axis=1)
    log(
        f"{dataset}: sizes {[len(v[1]) for v in data.values()]}, feature norms "
        f"median {np.median(norms):.2f} p90 {np.quantile(norms, 0.9):.2f}"
    )
    res = json.loads(part.read_text()) if methods and part.exists() else {}
    res.setdefault("sizes", {s: len(v[1]) for s, v in data.items()})
    res.setdefault(
        "feature_norm_quantiles",
        {str(qq): float(np.quantile(norms, qq)) for qq in (0.1, 0.5, 0.9, 0.99)},
    )
    res.setdefault("methods", {})
    res.setdefault("wall_s", 0.0)
    t_start, wall0 = time.time(), res["wall_s"]

    def save():
        res["wall_s"] = wall0 + time.time() - t_start
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(json.dumps(res, indent=1, default=str))

    if "ceilings" not in res and not part.stem.endswith(PART_TAG_MARK):
        res["ceilings"] = ceilings(data, k)
        save()
    epsilons = epsilons or (QUICK_EPSILONS if quick else EPSILONS)
    for m, (label, runner, cfgs) in grids(quick).items():
        if methods and m not in methods:
            continue
        if m == "dp_sgd" and dpsgd_grid:
            cfgs = cfgs[:dpsgd_grid]
        t0 = time.time()
        rows = {}
        res["methods"][m] = {"label": label, "grid": cfgs, "rows": rows, "seconds": 0.0}
        for eps in epsilons:
            vals = []
            for hp in cfgs:
                v = np.mean(
                    [
                        evaluate(runner, data, "val", k, eps, VAL_SEED + s, hp)[0]
                        for s in range(VAL_SEEDS)
                    ]
                )
                vals.append(float(v))
            best = int(np.argmax(vals))
            hp = cfgs[best]
            tests = [evaluate(runner, data, "test", k, eps, s, hp) for s in range(seeds)]
            accs = [a for a, _ in tests]
            rows[str(eps)] = {
                "test": accs,
                "mean": float(np.mean(accs)),
                "std": float(np.std(accs)),
                "spent_epsilon": max(e for _, e in tests),
                "hp": hp,
                "val_best": vals[best],
                "val_all": vals,
            }
            res["methods"][m]["seconds"] = time.time() - t0
            save()
            log(
                f"  {m:18s} eps={eps:<5} val={vals[best]:.4f} test={np.mean(accs):.4f}"
                f"+-{np.std(accs):.4f} hp={hp}"
            )
    return res


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Grid values (absolute units; feature norms ~1.5-5.7, median ~3.9 on both datasets).

CLIPS_GD1 = (0.5, 1.0, 2.0, 4.0, 8.0)
GD_MULTI = (
    (20, "adam", 0.2, 1.0),
    (50, "adam", 0.1, 1.0),
    (100, "adam", 0.05, 1.0),
    (100, "sgd", 5.0, 1.0),
)
LS_FEATURE_CLIPS = (2.0, 4.0)
LS_REGS = (1.0, 10.0, 1e2, 1e3, 1e4)
NEWTON = (
    (3.0, 3, 1e-3, "bohning"),
    (3.0, 10, 1e-4, "bohning"),
    (5.0, 10, 1e-4, "bohning"),
    (5.0, 3, 1e-3, "bohning"),
    (2.0, 3, 1e-3, "bohning"),
    (3.0, 2, 1e-3, "adaptive"),
)
FC = (
    (3.0, 1.0, 10, 1.0, 0.3, 1e-2),
    (3.0, 1.0, 30, 1.0, 0.3, 1e-2),
    (3.0, 1.0, 30, 2.0, 0.3, 1e-2),
    (3.0, 2.0, 10, 0.5, 0.3, 1e-3),
    (5.0, 2.0, 10, 1.0, 0.5, 1e-2),
)
DPSGD = ((8192, 20, 2.0, 1.0), (8192, 20, 4.0, 1.0), (8192, 20, 8.0, 1.0))
LR_REGS = (1e-5, 1e-4, 1e-3)
NP_LS_REGS = (1e-2, 1.0, 1e2)
PART_TAG_MARK = "-part"
QUICK_EPSILONS = (0.1, 1.0, 8.0)
VAL_SEED = 1000


def main(argv=None) -> int:
    import argparse
    import json
    import platform
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="fashion_mnist,mnist")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 epsilons, 2 configs per method")
    ap.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--epsilons", default="", help="comma-separated subset of epsilons")
    ap.add_argument(
        "--part-tag",
        default="",
        help="save to a separate partial results file (no ceilings), merged by --reuse",
    )
    ap.add_argument(
        "--dpsgd-grid", type=int, default=0, help="use only the first N DP-SGD configs (0 = all)"
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse per-dataset results saved by an earlier run in runs/feature_cache/",
    )
    args = ap.parse_args(argv)
    t0 = time.time()
    epsilons = QUICK_EPSILONS if args.quick else EPSILONS
    methods = [m for m in args.methods.split(",") if m] or None
    results = {}
    for ds in args.datasets.split(","):
        stem = f"results-{ds}{'-quick' if args.quick else ''}-seeds{args.seeds}"
        if args.reuse and (CACHE / f"{stem}.json").exists():
            results[ds] = json.loads((CACHE / f"{stem}.json").read_text())
            log(f"{ds}: reusing {stem}.json")
            for extra in sorted(CACHE.glob(f"{stem}-*{PART_TAG_MARK}.json")):
                log(f"{ds}: merging {extra.name}")
                more = json.loads(extra.read_text())
                for m, r in more["methods"].items():
                    have = results[ds]["methods"].setdefault(m, r)
                    if have is not r:  # the same method run at other epsilons: merge the rows
                        have["rows"].update(r["rows"])
                        have["seconds"] += r["seconds"]
                results[ds]["wall_s"] += more.get("wall_s", 0.0)
            continue
        tag = f"-{args.part_tag}{PART_TAG_MARK}" if args.part_tag else ""
        part = CACHE / f"{stem}{tag}.json"
        eps = tuple(float(e) for e in args.epsilons.split(",")) if args.epsilons else None
        results[ds] = study(ds, args.seeds, args.quick, methods, part, args.dpsgd_grid, eps)
    if args.part_tag:  # a partial run: its results are merged later by --reuse
        log(f"partial results saved in {CACHE}")
        return 0
    order = list(grids(args.quick))
    for r in results.values():
        r["methods"] = {m: r["methods"][m] for m in order if m in r["methods"]}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python -m experiments.feature_methods "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), "
        f"{platform.python_version()}, jax {__import__('jax').__version__}",
        "wall_s": sum(r.get("wall_s", 0.0) for r in results.values()) or time.time() - t0,
        "wall_s_per_dataset": {ds: r.get("wall_s") for ds, r in results.items()},
        "seeds": args.seeds,
        "epsilons": list(epsilons),
        "delta": DELTA,
        "val_seeds": VAL_SEEDS,
        "scaled_down": SCALED_DOWN
        + (" --quick: 3 epsilons, 2 configs per method." if args.quick else ""),
    }
    (out / "feature_methods.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=str)
    )
    plot(results, epsilons, out / "feature_methods.png")
    write_md(results, meta, epsilons, out / "feature_methods.md", grids=grids)
    log(f"done in {meta['wall_s']:.0f}s -> {out}")
    return 0


SCALED_DOWN = (
    "hyperparameter grids are small (3-10 configs per method), tuned with 1 validation noise "
    "seed per epsilon; DP-SGD uses one schedule (expected batch 8192, 20 epochs, constant "
    "learning rate in {2, 4, 8}, momentum 0.9, clip 1; no longer runs, no augmentation); 3 test "
    "noise seeds (the split and the features are fixed). MNIST DP-SGD was run in 4 invocations "
    "over subsets of the epsilons (same code and grid), merged with --reuse."
)

if __name__ == "__main__":
    raise SystemExit(main())
