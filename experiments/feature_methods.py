"""Feature-based DP methods vs the DP-SGD linear probe on Fashion-MNIST features (eps 1 and 3).

    python -m experiments.feature_methods          # every run (stored runs reused), the report
    python -m experiments.feature_methods --quick  # only the report, from the stored runs

Features (fixed public functions of each image, so they cost no privacy; computed once by
`experiments.fmnist_best` into ``runs/feature_cache``):

* ``mobilenet``: the 1280 pooled features of the ImageNet MobileNetV2 at 64 px (grey to RGB,
  ImageNet mean/std), LayerNorm per example;
* ``scatter``: the 3969 ScatterNet coefficients (kymatio J=2, L=8) with per-example GroupNorm
  in 27 groups (Tramer & Boneh 2021): the ScatterNet block of configs/fmnist_best.py.

Both blocks are normalised per example, so every row has L2 norm at most sqrt(d); the feature
methods see ``X / sqrt(d)`` (norm <= 1, so ``feature_clip = 1`` clips nothing), the DP-SGD
probe sees ``X`` as configs/fmnist_best.py trains it. Methods (all from zero, all calibrated to
(epsilon, 1e-5) under add/remove-one with PLD):

* ``one_step``: one full-batch DP gradient step (`dpft.linear.dp_gd`, ``steps=1``) on features
  centred by a PUBLIC mean: the mean of the same extractor's features of the MNIST training
  images (a public data set disjoint from the private one), after Mehta et al. 2022;
* ``dp_ls``: DP least squares (`dpft.linear.dp_sufficient_stats`, then the PSD projection and
  ridge solve of `dpft.linear.dp_least_squares`); the candidates differ only in ``reg``, so one
  release serves all of them (post-processing);
* ``dp_newton``: `dpft.linear.dp_newton` with Boehning's curvature bound;
* ``dp_fc``: `dpft.linear.dp_fc` (Mehta et al. 2023);
* ``dp_sgd``: the DP-SGD linear probe `experiments.fmnist_best.train_head` (the trainer's
  Poisson sampler, clipper, accountant and step; expected batch 8192, clip 0.1, momentum 0.9).

Tuning: every method gets the same number of candidates (`GRIDS`; DP-SGD's differ per feature
set), each trained once (noise seed `VAL_SEED`) on 90% of the training split and scored on the
other 10% (split seed 0, `experiments.fmnist_best.validation_split`); the best candidate per
(features, epsilon, method) is then trained on the whole training split with seeds `SEEDS` and
scored on the test split.
The tuning reads private validation data and is not counted in epsilon.

Every finished run is stored in ``runs/feature_methods/store-<features>.json`` under a tag
naming its settings; a rerun reuses it, so it only redraws
experiments/results/feature_methods.{md,json,png}. The ScatterNet DP-SGD runs that
experiments/results/fmnist_best.json already holds (same runner, features, split and recipe)
are imported instead of trained again (`import_fmnist_best`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from experiments.feature_methods_report import (
    DELTA,
    EPSILONS,
    FEATURES,
    GRIDS,
    METHODS_RUN,
    SEEDS,
    VAL_SEED,
    write_all,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "feature_methods"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Features


def unit(X: np.ndarray) -> np.ndarray:
    """``X / sqrt(d)``: rows normalised per example have norm <= 1 (a public constant)."""
    return np.asarray(X, np.float32) / np.float32(np.sqrt(X.shape[1]))


def mobilenet_cached(dataset: str, check: int = 32) -> dict:
    """`experiments.fmnist_best.mobilenet_features` at 64 px, reusing a cache keyed by an older
    mtime of the same weights file.

    The cache key holds the weights file's path, size and mtime; a file whose mtime changed
    (touched or copied again) misses the cache although its content may be the same. A cached
    file that differs from today's key only in that mtime (same path and size) is used if its
    first ``check`` training rows equal (to 1e-3 relative) the features recomputed now from
    the current weights; otherwise the features are recomputed and cached.
    """
    import jax
    import jax.numpy as jnp

    from dpft.models import pretrained
    from dpft.train.build import load_data
    from dpft.train.features import file_identity
    from experiments import fmnist_best as fb

    weights = file_identity(pretrained.weights_path("mobilenet_v2"))
    for desc_file in sorted(fb.CACHE.glob("features-*.json")):
        desc = json.loads(desc_file.read_text())
        old = desc.get("weights", {})
        if (desc.get("backbone"), desc.get("size"), desc.get("dataset")) != (
            "mobilenet_v2",
            64,
            dataset,
        ) or (old.get("path"), old.get("size")) != (weights["path"], weights["size"]):
            continue
        if old.get("mtime_ns") == weights.get("mtime_ns"):
            break  # today's key: fmnist_best's own cache hit
        c = fb.recipe("mnist" if dataset == "mnist" else "3")
        train, test, _ = load_data(c)
        model, variables = pretrained.load("mobilenet_v2")
        mean, std = jnp.asarray(pretrained.MEAN), jnp.asarray(pretrained.STD)
        x = jnp.asarray(train["image"][:check])
        x = jax.image.resize(x, (x.shape[0], 64, 64, x.shape[-1]), "bilinear")
        x = (jnp.broadcast_to(x, (*x.shape[:3], 3)) - mean) / std
        now = np.asarray(model.apply(variables, x, method=model.features))
        with np.load(desc_file.with_suffix(".npz")) as f:
            got = {"train": f["train"], "test": f["test"]}
        err = np.abs(got["train"][:check] - now).max() / (np.abs(now).max() + 1e-12)
        log(f"{desc_file.name}: cached vs recomputed MobileNetV2 features, max rel diff {err:.1e}")
        if err < 1e-3 and len(got["train"]) == len(train["label"]):
            return {"train": (got["train"], train["label"]), "test": (got["test"], test["label"])}
    return fb.mobilenet_features(dataset, 64)


def load(features: str, raw: bool = True) -> dict:
    """{'raw', 'unit', 'public_mean'}: the features as DP-SGD and the feature methods see them.

    ``raw``/``unit`` hold {'train' (all 60k), 'fit' (90%), 'val' (10%), 'test'}: (X, y);
    ``public_mean`` is the mean of the unit features of the MNIST training images. With
    ``raw=False`` only the unit features are kept (the 3969-d block: memory).
    """
    from experiments import fmnist_best as fb

    if features == "mobilenet":

        def get(ds):
            f = mobilenet_cached(ds)
            return {s: (fb.layer_norm(x), y) for s, (x, y) in f.items()}

    else:

        def get(ds):
            return fb.scatter_features(ds)

    feats = get("fashion_mnist")
    if not raw:
        feats = {s: (unit(x), y) for s, (x, y) in feats.items()}
    split = fb.validation_split(feats)
    views = {"train": feats["train"], "fit": split["train"], "val": split["val"]}
    views["test"] = feats["test"]
    del feats, split
    cache = RUNS / f"public_mean_{features}.npy"
    if cache.exists():
        mean = np.load(cache)
    else:
        mean = unit(get("mnist")["train"][0]).mean(0)
        RUNS.mkdir(parents=True, exist_ok=True)
        np.save(cache, mean)
    if raw:
        out = {"raw": views, "unit": {s: (unit(x), y) for s, (x, y) in views.items()}}
    else:
        out = {"unit": views}
    out["public_mean"] = mean.astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------
# Methods: each ``fn(data, eps, seed, fit, evals, hps) -> [result per hp]`` trains on
# ``data[view][fit]`` and reports the accuracy on each split of ``evals``.


def _key(seed: int):
    from dpft.privacy import keys

    return keys.derive(keys.root_key(seed), "noise")


def _scores(params, data: dict, evals) -> dict:
    import jax.numpy as jnp

    from dpft import linear

    return {s: float(linear.accuracy(params, jnp.asarray(data[s][0]), data[s][1])) for s in evals}


def run_one_step(d, eps, seed, fit, evals, hps):
    from dpft import linear

    mu = d["public_mean"]
    centred = {s: (x - mu, y) for s, (x, y) in d["unit"].items()}
    out = []
    for hp in hps:
        X, y = centred[fit]
        params, info = linear.dp_gd(
            X, y, 10, epsilon=eps, delta=DELTA, key=_key(seed), steps=1, learning_rate=1.0, **hp
        )
        out.append({**_scores(params, centred, evals), "epsilon": float(info["epsilon"])})
    return out


def run_dp_ls(d, eps, seed, fit, evals, hps):
    """One release of (X^T X, X^T Y) per (eps, seed); each ``reg`` is a ridge solve of it."""
    from dpft import linear
    from dpft.linear.common import eig_solve, psd_eig

    X, y = d["unit"][fit]
    clips = {hp["feature_clip"] for hp in hps}
    out = [None] * len(hps)
    for clip in sorted(clips):
        G, B, info = linear.dp_sufficient_stats(
            X, y, 10, epsilon=eps, delta=DELTA, feature_clip=clip, key=_key(seed)
        )
        lam, V = psd_eig(G)
        for i, hp in enumerate(hps):
            if hp["feature_clip"] == clip:
                W = eig_solve(lam, V, float(hp["reg"]), B)
                params = linear.LinearParams(W, np.zeros(10, np.float32))
                out[i] = {**_scores(params, d["unit"], evals), "epsilon": float(info["epsilon"])}
    return out


def _full_batch(method: str):
    def run(d, eps, seed, fit, evals, hps):
        from dpft import linear

        fn = getattr(linear, method)
        X, y = d["unit"][fit]
        out = []
        for hp in hps:
            params, info = fn(X, y, 10, epsilon=eps, delta=DELTA, key=_key(seed), **hp)
            out.append({**_scores(params, d["unit"], evals), "epsilon": float(info["epsilon"])})
        return out

    return run


def run_dp_sgd(d, eps, seed, fit, evals, hps):
    from experiments import fmnist_best as fb

    out = []
    for hp in hps:
        over = {f"train.{k}": v for k, v in hp.items()}
        config = fb.recipe("3" if eps == 3.0 else "1", seed=seed, **over)
        config.dp.epsilon = float(eps)
        r = fb.train_head(config, d["raw"][fit], {s: d["raw"][s] for s in evals})
        out.append({**{s: r[s] for s in evals}, "epsilon": float(r["epsilon"])})
    return out


RUNNERS = {
    "one_step": run_one_step,
    "dp_ls": run_dp_ls,
    "dp_newton": _full_batch("dp_newton"),
    "dp_fc": _full_batch("dp_fc"),
    "dp_sgd": run_dp_sgd,
}


# ----------------------------------------------------------------------------------------------
# The store of finished runs


def tag(features, eps, method, phase, seed, hp) -> str:
    hps = " ".join(f"{k}={v}" for k, v in sorted(hp.items()))
    return f"{features} eps={eps:g} {method} {phase} seed={seed} {hps}"


def store_path(features: str) -> pathlib.Path:
    return RUNS / f"store-{features}.json"


def load_store() -> dict:
    """Every stored run (one file per feature set, so the two can run in parallel)."""
    store = {}
    for f in FEATURES:
        if store_path(f).exists():
            store.update(json.loads(store_path(f).read_text()))
    return store


def save_store(store: dict, features: str) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    path = store_path(features)
    mine = json.loads(path.read_text()) if path.exists() else {}  # another process's runs too
    mine.update({k: v for k, v in store.items() if k.startswith(f"{features} ")})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(mine, indent=1, sort_keys=True))
    tmp.replace(path)


# DP-SGD on the ScatterNet block: runs of `experiments.fmnist_best` (the same runner
# `train_head`, features, split and recipe) that match the DP-SGD candidates here; its tuning
# runs used noise seed 0 instead of VAL_SEED.
FMNIST_BEST = pathlib.Path(__file__).parent / "results" / "fmnist_best.json"


def _adopt(store, mine, theirs, src, split, note="") -> None:
    """``store[mine]`` = fmnist_best.json's run ``src`` (its ``split`` accuracy, epsilon and
    time, and where it came from), unless it is stored already or fmnist_best lacks it."""
    if src in theirs and mine not in store:
        r = theirs[src]
        store[mine] = {split: r[split], "epsilon": r["epsilon"], "seconds": r["seconds"]}
        store[mine]["source"] = f"fmnist_best.json: {src}{note}"


def import_fmnist_best(store: dict) -> None:
    """Stores the ScatterNet DP-SGD runs of experiments/results/fmnist_best.json under this
    study's tags (each with its source tag), so that they are not trained again."""
    if not FMNIST_BEST.exists():
        return
    theirs = json.loads(FMNIST_BEST.read_text())
    for eps in EPSILONS:
        for hp in GRIDS["scatter"]["dp_sgd"]:
            over = " ".join(
                f"train.{k}={v}" for k, v in sorted(hp.items(), key=lambda kv: f"train.{kv[0]}")
            )
            src = f"tune eps{eps:g} gn {over}"
            mine = tag("scatter", eps, "dp_sgd", "tune", VAL_SEED, hp)
            _adopt(store, mine, theirs, src, "val", " (noise seed 0)")
        arg = f"{eps:g},scatter"
        recipe_hp = {
            "batch_size": 8192,
            "epochs": 60.0,
            "learning_rate": 16.0 if eps == 3.0 else 8.0,
        }  # configs/fmnist_best.py's TUNED for the ScatterNet block
        for seed in SEEDS:
            src = f"final scatter {arg} seed={seed}"
            mine = tag("scatter", eps, "dp_sgd", "final", seed, recipe_hp)
            _adopt(store, mine, theirs, src, "test")
    save_store(store, "scatter")


def cached(store, data, features, eps, method, phase, seed, hps) -> list[dict]:
    """The runs of ``hps`` (tune: fit->val; final: train->test), from the store or run now."""
    tags = [tag(features, eps, method, phase, seed, hp) for hp in hps]
    todo = [i for i, t in enumerate(tags) if t not in store]
    if todo:
        fit, evals = ("fit", ("val",)) if phase == "tune" else ("train", ("test",))
        t0 = time.time()
        got = RUNNERS[method](data(), eps, seed, fit, evals, [hps[i] for i in todo])
        seconds = (time.time() - t0) / len(todo)
        for i, r in zip(todo, got, strict=True):
            store[tags[i]] = {**r, "seconds": seconds}
            log(f"{tags[i]}: {json.dumps(store[tags[i]])}")
        save_store(store, features)
    return [store[t] for t in tags]


def _dp_sgd_stored(store: dict, features: str, epsilons, seeds) -> bool:
    """Whether every DP-SGD run of ``features`` is stored (so its features need not be kept)."""
    hps = GRIDS[features]["dp_sgd"]
    for eps in epsilons:
        tune = [store.get(tag(features, eps, "dp_sgd", "tune", VAL_SEED, hp)) for hp in hps]
        if any(t is None for t in tune):
            return False
        best = hps[int(np.argmax([t["val"] for t in tune]))]
        if any(tag(features, eps, "dp_sgd", "final", s, best) not in store for s in seeds):
            return False
    return True


def study(store: dict, features: str, epsilons, methods, seeds) -> None:
    """Tunes every method on validation and runs the chosen candidate with every test seed."""
    memo: dict = {}

    def data():
        if "d" not in memo:
            log(f"loading {features} features")
            memo["d"] = load(features, raw=not _dp_sgd_stored(store, features, epsilons, seeds))
        return memo["d"]

    for eps in epsilons:
        for method in methods:
            hps = GRIDS[features][method]
            vals = [
                r["val"] for r in cached(store, data, features, eps, method, "tune", VAL_SEED, hps)
            ]
            best = hps[int(np.argmax(vals))]
            for seed in seeds:
                cached(store, data, features, eps, method, "final", seed, [best])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the report, from stored runs")
    ap.add_argument("--features", default=",".join(FEATURES), help="comma-separated subset")
    ap.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
    ap.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args(argv)
    store = load_store()
    if not args.quick:
        from dpft.host import tune_host_allocator

        tune_host_allocator()
        import_fmnist_best(store)
        for features in [f for f in args.features.split(",") if f]:
            epsilons = [float(e) for e in args.epsilons.split(",") if e]
            methods = [m for m in args.methods.split(",") if m in METHODS_RUN[features]]
            study(store, features, epsilons, methods or METHODS_RUN[features], SEEDS)
    write_all(store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
