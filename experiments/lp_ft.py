"""Study (b) of issue 6: LP vs FT vs LP-FT on Fashion-MNIST from the CIFAR-10-pretrained ResNet-20.

    nice -n 19 .venv/bin/python -m experiments.lp_ft            # -> experiments/results/lp_ft.*

One DP-SGD run of T steps (Poisson, expected batch B, one noise multiplier calibrated with PLD
for all T steps at (epsilon, 1e-5)) spends ``round(lp_fraction * T)`` steps training the
zero-initialised head on the frozen backbone's pooled features (LP), then the remaining steps
fine-tuning ``FT_BLOCKS`` + head (FT), exactly the semantics of ``finetune.mode=lp_ft`` in
`dpft.train.phases` (lp_fraction 1 = LP only, 0 = FT only). Each phase has its own optimizer
(SGD, momentum 0.9, cosine decay over the phase) and learning rate.

Scaled down for 2 shared CPU cores (written into the results file): the FT arm tunes the last
stage's blocks ``FT_BLOCKS`` + head, on the frozen prefix's activations computed once (the
prefix has no trainable parameter, so its output is a fixed function of each image: training on
cached activations is exactly training the full network with that prefix frozen); the private
training set is a fixed random subset of the training split. The report (``lp_ft.md``,
``lp_ft.png``) is written by `experiments.lp_ft_report`. Helpers here are also used by
`experiments.lamb_vs_sgd`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpft import optim
from dpft.privacy import accounting, clipping, sampling
from experiments.lp_ft_report import (
    DELTA,
    EPSILONS,
    FRACTIONS,
    FT_BLOCKS,
    FT_LRS,
    LP_LRS,
    OUT,
    write_report,
)

# OUT, DELTA, FT_BLOCKS and the study's grids live in experiments.lp_ft_report, which quotes them.
ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "lp_ft_cache"
SPLIT_SEED = 0
VAL_FRACTION = 0.1
MICROBATCH = None  # the whole padded batch (a few hundred rows) in one vmap


# ---------------------------------------------------------------------------------------------
# Data: prefix activations and pooled features of train (subset) / val / test, cached.


def load_arrays(train_subset: int) -> dict:
    """{'train','val','test'}: {'act': prefix activations, 'feat': pooled features, 'y'}."""
    from dpft.config import base_config
    from dpft.models import pretrained
    from dpft.train.build import load_data
    from dpft.train.features import cached_features, file_identity

    model, variables = pretrained.load("resnet20")

    def cfg(val_fraction, subset):
        c = base_config()
        c.seed = SPLIT_SEED
        c.data.name = "fashion_mnist"
        c.model.name = "resnet20"
        c.data.validation_fraction = val_fraction
        c.data.train_subset = subset
        return c

    train, val, _ = load_data(cfg(VAL_FRACTION, train_subset))
    _, test, _ = load_data(cfg(0.0, 0))
    images = {"train": train["image"], "val": val["image"], "test": test["image"]}
    desc = {
        "backbone": "resnet20",
        "weights": file_identity(pretrained.weights_path("resnet20", None)),
        "dataset": "fashion_mnist",
        "validation_fraction": VAL_FRACTION,
        "split_seed": SPLIT_SEED,
        "train_subset": train_subset,
        "prefix_until": FT_BLOCKS[0],
        "jax": jax.__version__,
    }
    acts = cached_features(
        CACHE, desc, lambda x: model.apply(variables, x, method=prefix), images, 250
    )
    suffix_fn = jax.jit(lambda a: model.apply(variables, a, method=pooled_suffix))
    out = {}
    for k, lab in (("train", train), ("val", val), ("test", test)):
        feat = np.concatenate([np.asarray(suffix_fn(a)) for a in np.array_split(acts[k], 20)])
        out[k] = {"act": acts[k], "feat": feat, "y": lab["label"].astype(np.int32)}
    return out, model, variables


def _blocks(m):
    return [*m.layer1, *m.layer2, *m.layer3]


def _names(m):
    return [f"layer{s}_{i}" for s in (1, 2, 3) for i in range(len(m.layer1))]


def prefix(m, x):
    """Frozen prefix: stem and every block before ``FT_BLOCKS[0]``."""
    x = jax.nn.relu(m.bn1(m.conv1(jnp.asarray(x, jnp.float32))))
    for name, block in zip(_names(m), _blocks(m), strict=True):
        if name == FT_BLOCKS[0]:
            break
        x = block(x)
    return x


def pooled_suffix(m, a):
    """The trainable blocks on prefix activations, then global average pooling -> [N, 64]."""
    for name, block in zip(_names(m), _blocks(m), strict=True):
        if name in FT_BLOCKS:
            a = block(a)
    return jnp.mean(a, axis=(1, 2))


def logits_suffix(m, a):
    return m.linear(pooled_suffix(m, a))


# ---------------------------------------------------------------------------------------------
# DP-SGD (or DP-LAMB) phases over one Poisson sampler and one noise multiplier.


class Trainer:
    """Jitted clipped-gradient sums for the head (on features) and the FT suffix (on acts)."""

    def __init__(self, model, variables, clip_norm=1.0, microbatch: int | None = MICROBATCH):
        self.model, self.clip_norm = model, clip_norm
        params = variables["params"]
        self.stats = variables["batch_stats"]
        self.frozen = {k: v for k, v in params.items() if k not in (*FT_BLOCKS, "linear")}
        self.suffix0 = {k: params[k] for k in FT_BLOCKS}
        clipper = clipping.FlatClip(clip_norm)

        def head_loss(p, ex, rng):
            z = ex["x"] @ p["linear"]["kernel"] + p["linear"]["bias"]
            return -jax.nn.log_softmax(z)[ex["y"]], ()

        def ft_loss(p, ex, rng):
            v = {"params": {**self.frozen, **p}, "batch_stats": self.stats}
            z = model.apply(v, ex["x"][None], method=logits_suffix)[0]
            return -jax.nn.log_softmax(z)[ex["y"]], ()

        self.grad = {
            "lp": jax.jit(clipping.clipped_grad(head_loss, clipper)),
            "ft": jax.jit(clipping.clipped_grad(ft_loss, clipper, microbatch_size=microbatch)),
        }

        def ft_logits(p, a):
            v = {"params": {**self.frozen, **p}, "batch_stats": self.stats}
            return model.apply(v, a, method=logits_suffix)

        self.ft_logits = jax.jit(ft_logits)

    def zero_head(self, k=10):
        return {"kernel": jnp.zeros((64, k), jnp.float32), "bias": jnp.zeros((k,), jnp.float32)}

    def evaluate(self, params, split: dict, ft: bool) -> dict:
        from dpft.metrics import calibration_metrics

        if ft:
            chunks = np.array_split(np.arange(len(split["y"])), max(1, len(split["y"]) // 1000))
            z = np.concatenate(
                [np.asarray(self.ft_logits(params, split["act"][c])) for c in chunks]
            )
        else:
            z = split["feat"] @ np.asarray(params["linear"]["kernel"]) + np.asarray(
                params["linear"]["bias"]
            )
        if not np.all(np.isfinite(z)):  # diverged (too large a step): scored as chance 0
            return {"accuracy": 0.0, "ece": float("nan"), "nll": float("nan"), "diverged": True}
        r = calibration_metrics(z, split["y"])
        return {"accuracy": r.accuracy, "ece": r.ece, "nll": r.nll}


def run(
    tr: Trainer,
    data: dict,
    *,
    epsilon: float,
    lp_fraction: float,
    batch: int,
    epochs: float,
    lr_lp: float,
    lr_ft: float,
    seed: int,
    optimizer: str = "sgd",
    eval_split: str = "val",
    population: int | None = None,
) -> dict:
    """One LP-FT run (see the module doc) -> metrics on ``eval_split`` and the privacy spent.

    The Poisson rate is ``batch / population`` (default: the training set's size), so a tuning
    run on part of the training set can use the rate of the final run on all of it.
    """
    n = len(data["train"]["y"])
    q = batch / (population or n)
    if not 0 < q <= 1:
        raise ValueError(f"batch / population must be in (0, 1], got {batch} / {population or n}")
    total = max(1, int(round(epochs / q)))
    lp_steps = int(round(lp_fraction * total))
    sampler = sampling.PoissonSampler(n, q, seed)
    cap = sampler.max_batch_size
    sigma = _sigma(epsilon, q, total, n, cap)
    params = {"linear": tr.zero_head()}
    t0 = time.time()
    for phase, start, end, lr in (("lp", 0, lp_steps, lr_lp), ("ft", lp_steps, total, lr_ft)):
        if end <= start:
            continue
        trainable = params if phase == "lp" else {**tr.suffix0, **params}
        x_all = data["train"]["feat" if phase == "lp" else "act"]
        tx = _optimizer(optimizer, lr, end - start, sigma, batch, seed, phase)
        state = tx.init(trainable)
        update = jax.jit(lambda g, s, p, tx=tx: _apply(tx, g, s, p))
        for step in range(start, end):
            idx, mask = sampler.batch_at(step)
            ex = {"x": jnp.asarray(x_all[idx]), "y": jnp.asarray(data["train"]["y"][idx])}
            rng = jax.random.PRNGKey(step)
            g = tr.grad[phase](trainable, ex, jnp.asarray(mask, jnp.float32), rng).grad_sum
            trainable, state = update(g, state, trainable)
        params = trainable
    spent = accounting.compute_epsilon(
        accounting.GaussianSteps(sigma, q, total, dataset_size=n, max_batch_size=cap), DELTA
    )
    metrics = tr.evaluate(params, data[eval_split], ft=lp_steps < total)
    return {
        **metrics,
        "epsilon": spent,
        "sigma": sigma,
        "steps": total,
        "lp_steps": lp_steps,
        "seconds": time.time() - t0,
    }


def _apply(tx, g, s, p):
    updates, s = tx.update(g, s, p)
    return jax.tree_util.tree_map(jnp.add, p, updates), s


def _optimizer(name, lr, steps, sigma, batch, seed, phase):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1 if phase == "lp" else 2)
    kw = {"momentum": 0.9} if name == "sgd" else {}
    return optim.dp_optimizer(
        name,
        optim.make_schedule(lr, steps, "cosine"),
        noise_multiplier=sigma,
        l2_sensitivity=1.0,  # FlatClip(1.0): every run here clips to norm 1
        expected_batch_size=float(batch),
        key=key,
        **kw,
    )


_SIGMAS: dict = {}


def _sigma(eps, q, steps, n, cap) -> float:
    path = CACHE / "sigmas.json"
    if not _SIGMAS and path.exists():
        _SIGMAS.update(json.loads(path.read_text()))
    k = repr((eps, q, steps, n, cap, DELTA))
    if k not in _SIGMAS:
        _SIGMAS[k] = accounting.calibrate_noise_multiplier(
            eps, DELTA, q, steps, "pld", 1e-2, dataset_size=n, max_batch_size=cap
        )
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_SIGMAS, indent=1))
    return _SIGMAS[k]


# ---------------------------------------------------------------------------------------------
# The study (its grids FRACTIONS, EPSILONS, LP_LRS and FT_LRS are in experiments.lp_ft_report).

TUNE_SEED = 100


def subsample(data: dict, n_train: int, n_val: int) -> dict:
    """A fixed random ``n_train`` of the cached train rows and the first ``n_val`` val rows."""
    perm = np.random.default_rng([SPLIT_SEED, 11]).permutation(len(data["train"]["y"]))
    idx = np.sort(perm[:n_train])
    out = dict(data)
    out["train"] = {k: v[idx] for k, v in data["train"].items()}
    out["val"] = {k: v[:n_val] for k, v in data["val"].items()}
    return out


def tune(tr, data, res, save, common) -> tuple[float, float]:
    """Learning rates of the LP and FT arms on the validation split at epsilon 3."""
    # Tuning on the validation split at epsilon 3, once per arm, with a seed not used for test.
    for lr in LP_LRS:
        r = run(tr, data, epsilon=3.0, lp_fraction=1.0, lr_lp=lr, lr_ft=0, seed=TUNE_SEED, **common)
        res["tuning"][f"lp lr={lr}"] = r
        print(f"tune LP lr={lr}: val {r['accuracy']:.4f}", flush=True)
    lr_lp = max(LP_LRS, key=lambda lr: res["tuning"][f"lp lr={lr}"]["accuracy"])
    for lr in FT_LRS:
        r = run(tr, data, epsilon=3.0, lp_fraction=0.0, lr_lp=0, lr_ft=lr, seed=TUNE_SEED, **common)
        res["tuning"][f"ft lr={lr}"] = r
        print(f"tune FT lr={lr}: val {r['accuracy']:.4f} ({r['seconds']:.0f}s)", flush=True)
        save()
    lr_ft = max(FT_LRS, key=lambda lr: res["tuning"][f"ft lr={lr}"]["accuracy"])
    res["chosen"] = {"lr_lp": lr_lp, "lr_ft": lr_ft}
    save()
    return lr_lp, lr_ft


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-val", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget-minutes", type=float, default=25.0)
    ap.add_argument("--resume", action="store_true", help="continue the study in lp_ft.json")
    ap.add_argument("--report-only", action="store_true", help="rewrite md/png from the json")
    args = ap.parse_args(argv)
    if args.report_only:
        write_report(json.loads((OUT / "lp_ft.json").read_text()))
        return
    t_start = time.time()
    raw, model, variables = load_arrays(10000)
    data = subsample(raw, args.n_train, args.n_val)
    tr = Trainer(model, variables)
    common = dict(batch=args.batch, epochs=args.epochs)
    path = OUT / "lp_ft.json"
    res = {"args": vars(args), "ft_blocks": FT_BLOCKS, "tuning": {}, "runs": []}

    def save():
        res["wall_seconds"] = time.time() - t_start + sum(res.get("resumed_wall_seconds", []))
        path.write_text(json.dumps(res, indent=1))
        write_report(res)

    if args.resume:  # keep the tuning and the finished runs of an earlier (stopped) study
        res = {**json.loads(path.read_text()), "args": vars(args)}
        res.setdefault("resumed_wall_seconds", []).append(res.get("wall_seconds", 0.0))
        lr_lp, lr_ft = res["chosen"]["lr_lp"], res["chosen"]["lr_ft"]
    else:
        lr_lp, lr_ft = tune(tr, data, res, save, common)
    # Test runs: seed-major, so that a stopped study has whole seeds.
    for seed in range(args.seeds):
        for eps in EPSILONS:
            for f in sorted(FRACTIONS, reverse=True):  # cheap LP-heavy runs first
                done = [
                    r
                    for r in res["runs"]
                    if (r["seed"], r["target_epsilon"], r["lp_fraction"]) == (seed, eps, f)
                ]
                if done:
                    continue
                if (time.time() - t_start) / 60 > args.budget_minutes:
                    print("budget exhausted: stopping", flush=True)
                    save()
                    return
                r = run(
                    tr,
                    data,
                    epsilon=eps,
                    lp_fraction=f,
                    lr_lp=lr_lp,
                    lr_ft=lr_ft,
                    seed=seed,
                    eval_split="test",
                    **common,
                )
                res["runs"].append({"seed": seed, "target_epsilon": eps, "lp_fraction": f, **r})
                print(
                    f"seed {seed} eps {eps} f {f}: test {r['accuracy']:.4f} ({r['seconds']:.0f}s)",
                    flush=True,
                )
                save()
    save()


if __name__ == "__main__":
    main()
