"""The study behind configs/fmnist_best.py: hyperparameters on a validation split, seeds on test.

    python -m experiments.fmnist_best            # every stage (stored runs reused), the report
    python -m experiments.fmnist_best --quick    # only the report, from the stored runs
    python -m experiments.fmnist_best --stage final   # one stage (tune|mobilenet|variants|
                                                      # concat_tune|final), then the report

Features (the scattering transform of `dpft.models.scatternet`, the ImageNet MobileNetV2's
pooled features at 64 px) are computed once into ``runs/feature_cache`` (a few minutes for the
scattering, 10-30 minutes for the MobileNetV2 on 2 cores); each DP-SGD run of the head then
takes 1-5 minutes (`train_head`: the trainer's plan, sampler, keys, clipper and step on the
cached features). Tuning runs train on 90% of the training split and are selected on the other
10% (``data.validation_fraction=0.1``, split seed 0); their test figures are recorded but not
used to choose. The final runs train on the whole training split, seeds 0-2, and report test.
Every run is stored in experiments/results/fmnist_best.json under a tag naming its settings;
the report experiments/results/fmnist_best.md is written from that store.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import time

import numpy as np

from experiments.fmnist_best_report import write_report

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = pathlib.Path(__file__).parent / "results"
CACHE = ROOT / "runs" / "feature_cache"
VAL_FRACTION = 0.1
SPLIT_SEED = 0


def recipe(arg: str, seed: int = 0, **overrides):
    """configs/fmnist_best.py's config for ``arg`` with ``train.``/``dp.``/... overrides."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fmnist_best", ROOT / "configs/fmnist_best.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.seed = seed
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        c[section][name] = value
    return c


def scatter_features(dataset: str, norm: str = "group_norm", groups: int = 27) -> dict:
    """{'train', 'test'}: (features [N, D] float32, labels [N]) of the whole splits, cached."""
    import jax

    from dpft import models
    from dpft.train.build import load_data
    from dpft.train.features import cached_features

    c = recipe("mnist" if dataset == "mnist" else "3", **{"model.norm": norm})
    train, test, k = load_data(c)
    model = models.get_model("scatternet", k, norm=norm, groups=groups)
    variables = model.init(jax.random.PRNGKey(0), train["image"][:1])

    def fn(x):
        return model.apply(variables, x, method=model.features)

    desc = {
        "backbone": "scatternet",
        "J": model.J,
        "L": model.L,
        "norm": norm,
        "groups": model.groups,
        "dataset": dataset,
        "preprocessing": c.data.preprocessing,
        "jax": jax.__version__,
    }
    images = {"train": train["image"], "test": test["image"]}
    feats = cached_features(CACHE, desc, fn, images, batch_size=500)
    return {s: (feats[s], (train if s == "train" else test)["label"]) for s in images}


def mobilenet_features(dataset: str, size: int = 64) -> dict:
    """{'train', 'test'}: ImageNet MobileNetV2 pooled features [N, 1280] of the images resized
    to ``size`` px (bilinear, inside the jitted feature function), grey replicated to RGB and
    ImageNet-normalised; cached like `scatter_features`."""
    import jax
    import jax.numpy as jnp

    from dpft.models import pretrained
    from dpft.train.build import load_data
    from dpft.train.features import cached_features
    from experiments import common

    c = recipe("mnist" if dataset == "mnist" else "3")  # images in [0, 1]
    train, test, _ = load_data(c)
    model, variables = pretrained.load("mobilenet_v2")
    mean, std = jnp.asarray(pretrained.MEAN), jnp.asarray(pretrained.STD)

    def fn(x):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
        x = (jnp.broadcast_to(x, (*x.shape[:3], 3)) - mean) / std
        return model.apply(variables, x, method=model.features)

    desc = common.mobilenet_description(size, dataset)
    images = {"train": train["image"], "test": test["image"]}
    feats = cached_features(CACHE, desc, fn, images, batch_size=250)
    return {s: (feats[s], (train if s == "train" else test)["label"]) for s in images}


def layer_norm(X: np.ndarray) -> np.ndarray:
    """Each row shifted and scaled to mean 0 and variance 1 (per example: data-independent)."""
    X = np.asarray(X, np.float32)
    mean = X.mean(1, keepdims=True)
    return (X - mean) / np.sqrt(np.square(X - mean).mean(1, keepdims=True) + 1e-5)


def concat(a: dict, b: dict, weight: float = 1.0) -> dict:
    """{'train', 'test'}: ``[a, weight * layer_norm(b)]`` row by row."""
    return {
        s: (np.concatenate([a[s][0], weight * layer_norm(b[s][0])], axis=1), a[s][1]) for s in a
    }


def validation_split(feats: dict) -> dict:
    """{'train', 'val'}: the split `dpft.train.build.load_data` makes (fraction 0.1, seed 0)."""
    from dpft.data.datasets import validation_indices

    X, y = feats["train"]
    tr, va = validation_indices(len(y), VAL_FRACTION, SPLIT_SEED)
    return {"train": (X[tr], y[tr]), "val": (X[va], y[va])}


def train_head(config, train: tuple, evals: dict, ema: float = 0.0) -> dict:
    """DP-SGD of the head ``linear`` on fixed features, as the trainer runs ``config``.

    The same plan (`plan_privacy`), Poisson sampler, keys (`keys.root_key(config.seed)`, the
    phase-0 noise key, the per-step example keys), clipper, norms, optimizer and train step as
    `dpft.train.train_and_evaluate` on the scatternet model; only the scattering is read from
    the feature cache instead of being recomputed each step, the sampled rows are gathered
    inside the jitted step and the whole padded batch is one microbatch (the clipped sum is the
    same up to float summation order). ``ema`` > 0 also evaluates an exponential moving average
    of the iterates with decay ``min(ema, (1 + t) / (10 + t))`` at step t (De et al. 2022;
    post-processing of the released iterates: no privacy cost).
    """
    import jax
    import jax.numpy as jnp

    from dpft import models
    from dpft.privacy import keys, ledger, sampling
    from dpft.train import build
    from dpft.train.runtime import noise_key
    from dpft.train.step import (
        TrainState,
        cross_entropy_loss,
        make_train_step,
        partition,
        unflatten,
    )
    from dpft.train.trainer import examples_key

    t0 = time.time()
    X, y = jnp.asarray(train[0]), jnp.asarray(train[1], jnp.int32)
    n = int(y.shape[0])
    k = int(max(int(y.max()), *(int(v[1].max()) for v in evals.values()))) + 1
    plan = build.plan_privacy(config, n)
    head = models.get_model("linear", k)
    variables = head.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, X.shape[1])))
    variables = jax.tree_util.tree_map(jnp.zeros_like, variables)  # the config's zero head
    trainable, frozen = partition(variables, (r"linear/.*",))
    clipper = build.build_clipper(config.dp)
    norms = build.build_norm_strategy(config.dp)
    root = keys.root_key(config.seed)
    tx = build.build_optimizer(config, plan, clipper.sensitivity(trainable), noise_key(root, 0))
    state = TrainState(jnp.asarray(0, jnp.int32), trainable, tx.init(trainable), frozen)
    step = make_train_step(cross_entropy_loss(head.apply), clipper, tx, norm_strategy=norms)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run(state, averaged, idx, mask, rng, t):
        batch = {"image": X[idx], "label": y[idx], "mask": mask}
        state, _ = step(state, batch, rng)
        decay = jnp.minimum(ema, (1.0 + t) / (10.0 + t))
        averaged = jax.tree_util.tree_map(
            lambda a, p: decay * a + (1.0 - decay) * p, averaged, state.params
        )
        return state, averaged

    sampler = sampling.PoissonSampler(n, plan.sampling_rate, config.seed, plan.max_batch_size)
    budget = ledger.PrivacyBudget(plan.target_epsilon, plan.delta, plan.accountant)
    entry = plan.entry()
    averaged = jax.tree_util.tree_map(jnp.copy, state.params)
    for s in range(plan.steps):
        budget.spend(entry)
        idx, mask = sampler.batch_at(s)
        state, averaged = run(
            state, averaged, idx, mask.astype(np.float32), examples_key(root, s), float(s)
        )

    logits_fn = jax.jit(lambda params, x: head.apply(unflatten({**frozen, **params}), x))

    def accuracy(params, data):
        pred = np.argmax(np.asarray(logits_fn(params, jnp.asarray(data[0]))), -1)
        return float(np.mean(pred == np.asarray(data[1])))

    out = {
        "epsilon": budget.epsilon(),
        "steps": budget.ledger.steps,
        "noise_multiplier": plan.noise_multiplier,
        "expected_batch_size": plan.expected_batch_size,
    }
    for name, data in evals.items():
        out[name] = accuracy(state.params, data)
        if ema:
            out[f"{name}_ema"] = accuracy(averaged, data)
    out["seconds"] = time.time() - t0
    out["params"] = {k: np.asarray(v) for k, v in state.params.items()}
    return out


def feature_method(method: str, train: tuple, evals: dict, epsilon: float, seed: int, **hp):
    """A full-batch feature method of `dpft.linear` (``dp_least_squares`` | ``dp_fc``) on the
    features divided by ``scale`` (so that ``feature_clip`` is relative to their norm)."""
    import jax.numpy as jnp

    from dpft import linear
    from dpft.privacy import keys

    t0 = time.time()
    scale = float(hp.pop("scale", 1.0))
    X, y = train
    k = int(np.max(y)) + 1
    fn = {"dp_least_squares": linear.dp_least_squares, "dp_fc": linear.dp_fc}[method]
    key = keys.derive(keys.root_key(seed), "noise")
    params, info = fn(
        jnp.asarray(X / scale), jnp.asarray(y), k, epsilon=epsilon, delta=1e-5, key=key, **hp
    )
    out = {"epsilon": float(info["epsilon"])}
    for name, (Xe, ye) in evals.items():
        out[name] = float(linear.accuracy(params, jnp.asarray(Xe / scale), jnp.asarray(ye)))
    out["seconds"] = time.time() - t0
    return out


RESULTS = OUT / "fmnist_best.json"


def _load_results() -> dict:
    store = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    # the first tuning runs were stored with bare train keys: name them as `tune_head` does
    return {
        re.sub(r" (batch_size|epochs|learning_rate)=", r" train.\1=", k)
        if k.startswith("tune ")
        else k: v
        for k, v in store.items()
    }


def cached_run(tag: str, fn, store: dict) -> dict:
    """``fn()`` (a dict of figures), stored in `RESULTS` under ``tag`` and reused after."""
    if tag not in store:
        out = fn()
        out.pop("params", None)
        store[tag] = out
        RESULTS.write_text(json.dumps(store, indent=1, sort_keys=True))
        print(tag, json.dumps(out), flush=True)
    return store[tag]


def tune_head(store: dict, tag: str, arg: str, split: dict, evals: dict, hp: dict) -> dict:
    """`train_head` of the recipe ``arg`` with ``train.``/``dp.`` overrides ``hp``, cached."""
    over = {(k if "." in k else f"train.{k}"): v for k, v in hp.items()}
    tag = f"{tag} " + " ".join(f"{k}={v}" for k, v in sorted(over.items()))
    config = recipe(arg, **over)
    return cached_run(tag, lambda: train_head(config, split, evals, ema=0.999), store)


SEEDS = (0, 1, 2)


def mnist_features() -> dict:
    """MNIST's scattering block beside its MobileNetV2 block (as `concat`)."""
    return concat(scatter_features("mnist"), mobilenet_features("mnist", 64))


def final_runs(store: dict, scatter: dict) -> None:
    """Seeds 0-2 of each recipe on the whole training split, evaluated on test."""
    seeds = SEEDS
    both = concat(scatter, mobilenet_features("fashion_mnist", 64))
    runs = [
        ("final scatter+mobilenet", "3", lambda: both),
        ("final scatter+mobilenet", "1", lambda: both),
        ("final scatter", "3,scatter", lambda: scatter),
        ("final mnist scatter+mobilenet", "3,mnist", mnist_features),
        ("final scatter", "1,scatter", lambda: scatter),
    ]
    for name, arg, get in runs:
        tags = [f"{name} {arg} seed={seed}" for seed in seeds]
        if all(t in store for t in tags):
            continue
        feats = get()
        for tag, seed in zip(tags, seeds, strict=True):
            config = recipe(arg, seed=seed)
            evals = {"test": feats["test"]}
            run = functools.partial(train_head, config, feats["train"], evals, ema=0.999)
            cached_run(tag, run, store)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the report, from stored runs")
    p.add_argument("--stage", default="all", choices=("all", *STAGES))
    args = p.parse_args(argv)
    store = _load_results()
    if not args.quick:
        run_stages(store, STAGES if args.stage == "all" else (args.stage,))
    report = OUT / "fmnist_best.md"
    report.write_text(write_report(store))
    print(f"wrote {report}")


STAGES = ("tune", "mobilenet", "variants", "concat_tune", "final")


def run_stages(store: dict, stages) -> None:
    """The study's runs (each stored; a stored run is not run again)."""
    from dpft.host import tune_host_allocator

    tune_host_allocator()
    feats = scatter_features("fashion_mnist")
    split = validation_split(feats)
    evals = {"val": split["val"], "test": feats["test"]}
    if "tune" in stages:
        grid = [
            dict(batch_size=8192, epochs=60.0, learning_rate=16.0),
            dict(batch_size=8192, epochs=60.0, learning_rate=32.0),
            dict(batch_size=16384, epochs=120.0, learning_rate=16.0),
            dict(batch_size=8192, epochs=120.0, learning_rate=8.0),
            dict(batch_size=8192, epochs=30.0, learning_rate=16.0),
        ]
        for hp in grid:
            tune_head(store, "tune eps3 gn", "3", split["train"], evals, hp)
    if "mobilenet" in stages:
        mob = mobilenet_features("fashion_mnist", 64)
        for w in (1.0,):
            both = validation_split(concat(feats, mob, w))
            ev = {"val": both["val"], "test": concat(feats, mob, w)["test"]}
            hp = dict(batch_size=8192, epochs=60.0, learning_rate=16.0)
            tune_head(store, f"mobilenet64 w={w} eps3", "3", both["train"], ev, hp)
        mob = {k: (layer_norm(v[0]), v[1]) for k, v in mob.items()}
        split = validation_split(mob)
        mob_evals = {"val": split["val"], "test": mob["test"]}
        hp = dict(batch_size=8192, epochs=60.0, learning_rate=16.0)
        tune_head(store, "mobilenet64 alone eps3", "3", split["train"], mob_evals, hp)
    if "final" in stages:
        final_runs(store, feats)
    if "concat_tune" in stages:
        both = concat(feats, mobilenet_features("fashion_mnist", 64))
        sp = validation_split(both)
        ev = {"val": sp["val"], "test": both["test"]}
        for arg, hp in (
            ("1", dict(batch_size=8192, epochs=30.0, learning_rate=8.0)),
            ("1", dict(batch_size=8192, epochs=60.0, learning_rate=8.0)),
            ("3", dict(batch_size=8192, epochs=60.0, learning_rate=8.0)),
            ("3", dict(batch_size=8192, epochs=60.0, learning_rate=32.0)),
        ):
            tune_head(store, f"mobilenet64 w=1.0 eps{arg}", arg, sp["train"], ev, hp)
    if "variants" in stages:
        base = dict(batch_size=8192, epochs=60.0, learning_rate=16.0)
        for lr in (16.0, 32.0):
            hp = {**base, "learning_rate": lr, "schedule": "cosine"}
            tune_head(store, "tune eps3 gn", "3", split["train"], evals, hp)
        for lr in (8.0, 16.0):
            for ep in (30.0, 60.0):
                hp = {**base, "learning_rate": lr, "epochs": ep}
                tune_head(store, "tune eps1 gn", "1", split["train"], evals, hp)
        for norm, groups in (("group_norm", 81), ("group_norm", 9), ("none", 27)):
            f = scatter_features("fashion_mnist", norm, groups)
            sp = validation_split(f)
            ev = {"val": sp["val"], "test": f["test"]}
            tune_head(store, f"norm {norm} groups={groups} eps3", "3", sp["train"], ev, base)
        for method, hp in (
            ("dp_least_squares", dict(feature_clip=1.0, reg=300.0)),
            ("dp_least_squares", dict(feature_clip=1.0, reg=1000.0)),
            (
                "dp_fc",
                dict(
                    feature_clip=1.0,
                    clip_norm=1.0,
                    steps=30,
                    learning_rate=2.0,
                    cov_fraction=0.3,
                    reg=0.01,
                ),
            ),
        ):
            tag = f"method {method} eps3 " + " ".join(f"{k}={v}" for k, v in sorted(hp.items()))
            cached_run(
                tag,
                functools.partial(
                    feature_method, method, split["train"], evals, 3.0, 0, scale=63.0, **hp
                ),
                store,
            )


if __name__ == "__main__":
    main()
