"""LP vs FT vs LP-FT (Ke et al. 2024) on all of Fashion-MNIST from the ImageNet MobileNetV2.

    nice -n 10 .venv/bin/python -m experiments.lp_ft           # -> experiments/results/lp_ft.*
    nice -n 10 .venv/bin/python -m experiments.lp_ft --quick   # 1 seed, eps 3 only (smoke)

One DP-SGD run of T steps (Poisson, expected batch B, one noise multiplier calibrated with PLD
for all T steps at (epsilon, 1e-5)) spends ``round(lp_fraction * T)`` steps training the
zero-initialised head on the frozen backbone's pooled features (LP), then the remaining steps
fine-tuning ``FT_BLOCKS`` + head (FT), the semantics of ``finetune.mode=lp_ft`` in
`dpft.train.phases` (lp_fraction 1 = LP only, 0 = FT only). Each phase has its own optimizer
(SGD, momentum 0.9, cosine decay over the phase) and learning rate.

Backbone: torchvision's ImageNet MobileNetV2 (`dpft.models.pretrained.load('mobilenet_v2')`,
frozen BatchNorm folded into the convolutions) on the 28x28 images resized to `SIZE` px
(bilinear), grey replicated to RGB, ImageNet mean/std. The FT arm trains its last two inverted
residual blocks, the final 1x1 convolution to 1280 channels and the head (`Suffix`). The frozen
prefix (stem .. ``features_15``) has no trainable parameter, so its output is a fixed function of
each image: it is computed once and cached (`load_arrays`), and training `Suffix` on the cached
activations is exactly training the whole network with that prefix frozen.

Data: tuning runs train on the 54k training rows left after carving a 10% validation split
(seed 0) and score on that split, at the Poisson rate ``B / 60000`` of the final runs; the final
runs train on all 60k training images and score on the 10k test images. Every finished run is
cached in ``runs/lp_ft_cache/runs.json`` under its full description, so a rerun only redraws the
report. The report (``lp_ft.md``, ``lp_ft.png``, ``lp_ft.json``) is written by
`experiments.lp_ft_report`. `Suffix`, `load_arrays`, `Trainer` and `run` are also used by
`experiments.lamb_vs_sgd`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpft import optim
from dpft.privacy import accounting, clipping, sampling
from experiments.lp_ft_report import (
    BATCH,
    DELTA,
    EPOCHS,
    EPSILONS,
    FRACTIONS,
    FT_BLOCKS,
    FT_LRS,
    LP_LRS,
    OUT,
    PREFIX_END,
    SIZE,
    write_report,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "lp_ft_cache"
SPLIT_SEED = 0
VAL_FRACTION = 0.1
FULL_N = 60000
MICROBATCH = 250  # examples per vectorised chunk of the clipped-gradient sum
LP_FT_MICROBATCH = None  # the whole padded batch (the Poisson cap, ~300 rows) in one vmap
TUNE_SEED = 100
FT_TUNE_EPSILON = 3.0


# ---------------------------------------------------------------------------------------------
# The trainable suffix of MobileNetV2 and the cached prefix activations.


class Suffix(nn.Module):
    """MobileNetV2's ``features_16``, ``features_17``, ``features_18`` and head ``linear``.

    Input: the output of ``features_15`` (``[N, H, W, 160]``); the submodule names and
    parameter shapes are MobileNetV2's, so its pretrained variables apply unchanged.
    """

    num_classes: int = 10

    def setup(self) -> None:
        self.linear = nn.Dense(self.num_classes)

    @nn.compact
    def features(self, a: jax.Array) -> jax.Array:
        from dpft.models.conv import torch_padded_conv
        from dpft.models.mobilenet import InvertedResidual, relu6
        from dpft.models.resnet import make_norm

        x = InvertedResidual(160, stride=1, expansion=6, name="features_16")(a)
        x = InvertedResidual(320, stride=1, expansion=6, name="features_17")(x)
        x = torch_padded_conv(1280, 1, 1, jnp.float32, "auto", "features_18_0")(x)
        x = relu6(make_norm("frozen_bn", 8, "features_18_1")(x))
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, a: jax.Array) -> jax.Array:
        return self.linear(self.features(a))


def _backbone():
    from dpft.models import pretrained

    model, variables = pretrained.load("mobilenet_v2")
    mean, std = jnp.asarray(pretrained.MEAN), jnp.asarray(pretrained.STD)

    def prefix(x):
        """Images [N, 28, 28, 1] in [0, 1] -> the output of ``PREFIX_END``."""
        x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, x.shape[-1]), "bilinear")
        x = (jnp.broadcast_to(x, (*x.shape[:3], 3)) - mean) / std
        _, state = model.apply(
            variables,
            x,
            method=model.features,
            capture_intermediates=lambda m, name: m.name == PREFIX_END and name == "__call__",
            mutable=["intermediates"],
        )
        return state["intermediates"][PREFIX_END]["__call__"][0]

    return model, variables, prefix


def suffix_variables(variables: dict, head: bool = False) -> dict:
    """The pretrained variables of `Suffix` (``FT_BLOCKS``; and the 1000-way head if ``head``)."""
    keys = (*FT_BLOCKS, "linear") if head else FT_BLOCKS
    return {
        c: {k: variables[c][k] for k in keys if k in variables[c]}
        for c in ("params", "batch_stats")
    }


def load_arrays() -> dict:
    """{'train' (54k), 'val' (6k), 'all' (60k train), 'test' (10k)}: {'act', 'feat', 'y'}.

    ``act``: the frozen prefix's output (``[N, 1, 1, 160]`` at 32 px), cached in `CACHE`;
    ``feat``: the pretrained `Suffix`'s pooled 1280-d features of it (the LP features).
    """
    from dpft import data as dpdata
    from dpft.data.datasets import validation_indices
    from dpft.train.features import cached_features
    from experiments import common

    images, labels = {}, {}
    for split in ("train", "test"):
        ds = dpdata.load("fashion_mnist", split)
        images[split] = np.asarray(ds.images, np.float32) / 255.0  # uint8 -> [0, 1]
        labels[split] = np.asarray(ds.labels, np.int32)
    _, variables, prefix = _backbone()
    desc = common.mobilenet_description(SIZE, "fashion_mnist", prefix_end=PREFIX_END)
    acts = cached_features(CACHE, desc, prefix, images, 250)
    sv = suffix_variables(variables)
    pooled = jax.jit(lambda a: Suffix().apply(sv, a, method=Suffix.features))
    out = {}
    for split in ("train", "test"):
        a = acts[split]
        feat = np.concatenate([np.asarray(pooled(c)) for c in np.array_split(a, len(a) // 2000)])
        out[split] = {"act": a, "feat": feat, "y": labels[split]}
    tr, va = validation_indices(len(labels["train"]), VAL_FRACTION, SPLIT_SEED)
    full = out.pop("train")
    out["all"] = full
    out["train"] = {k: v[tr] for k, v in full.items()}
    out["val"] = {k: v[va] for k, v in full.items()}
    return out


# ---------------------------------------------------------------------------------------------
# DP-SGD (or DP-LAMB / DP-Adam) phases over one Poisson sampler and one noise multiplier.


class Trainer:
    """Jitted clipped-gradient sums for the head (on features) and `Suffix` (on activations)."""

    def __init__(
        self, variables: dict, clip_norm: float = 1.0, microbatch: int | None = MICROBATCH
    ):
        from dpft.privacy.ghost import GhostNorms

        self.clip_norm = clip_norm
        sv = suffix_variables(variables)
        self.stats = sv["batch_stats"]
        self.suffix0 = sv["params"]
        suffix = Suffix()
        clipper = clipping.FlatClip(clip_norm)

        def head_loss(p, ex, rng):
            z = ex["x"] @ p["linear"]["kernel"] + p["linear"]["bias"]
            return -jax.nn.log_softmax(z)[ex["y"]], ()

        def ft_loss(p, ex, rng):
            z = suffix.apply({"params": p, "batch_stats": self.stats}, ex["x"][None])[0]
            return -jax.nn.log_softmax(z)[ex["y"]], ()

        self.grad = {
            "lp": jax.jit(clipping.clipped_grad(head_loss, clipper)),
            "ft": jax.jit(
                clipping.clipped_grad(
                    ft_loss, clipper, microbatch_size=microbatch, norm_strategy=GhostNorms()
                )
            ),
        }
        self.ft_logits = jax.jit(
            lambda p, a: suffix.apply({"params": p, "batch_stats": self.stats}, a)
        )

    def zero_head(self, k: int = 10) -> dict:
        return {"kernel": jnp.zeros((1280, k), jnp.float32), "bias": jnp.zeros((k,), jnp.float32)}

    def evaluate(self, params, split: dict, ft: bool) -> dict:
        from dpft.metrics import calibration_metrics

        if ft:
            chunks = np.array_split(np.arange(len(split["y"])), max(1, len(split["y"]) // 2000))
            z = np.concatenate(
                [np.asarray(self.ft_logits(params, split["act"][c])) for c in chunks]
            )
        else:
            w = params["linear"]
            z = split["feat"] @ np.asarray(w["kernel"]) + np.asarray(w["bias"])
        if not np.all(np.isfinite(z)):  # diverged (too large a step): scored as accuracy 0
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
    lr_lp: float,
    lr_ft: float,
    seed: int,
    epochs: float | None = None,
    steps: int | None = None,
    optimizer: str = "sgd",
    eval_split: str = "val",
    population: int = FULL_N,
) -> dict:
    """One LP-FT run (see the module doc) -> metrics on ``eval_split`` and the privacy spent.

    The Poisson rate is ``min(1, batch / population)``, so a tuning run on part of the training
    set uses the rate of the final run on all of it. The length is ``steps``, or ``epochs / q``.
    """
    n = len(data["train"]["y"])
    q = min(1.0, batch / population)
    total = steps if steps is not None else max(1, int(round(epochs / q)))
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
        tx = _optimizer(optimizer, lr, end - start, sigma, q * n, seed, phase)
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
        tmp = path.with_name(f"sigmas.json.tmp{os.getpid()}")  # atomic: studies run side by side
        tmp.write_text(json.dumps(_SIGMAS, indent=1))
        tmp.replace(path)
    return _SIGMAS[k]


class RunCache:
    """Finished runs in a json file, keyed by their full description (a rerun reuses them)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.runs = json.loads(path.read_text()) if path.exists() else {}

    def reload(self) -> None:
        """Merge in the runs another process has written since."""
        if self.path.exists():
            self.runs = {**json.loads(self.path.read_text()), **self.runs}

    def get(self, key: str, fn) -> dict:
        if key not in self.runs:
            r = fn()
            self.reload()
            self.runs[key] = r
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.runs, indent=1))
            tmp.replace(self.path)
        return self.runs[key]


SHARD_HELP = (
    "i/k: compute only every k-th run, starting at the i-th (k workers share the run cache; "
    "each waits for the others' tuning runs); a plain rerun then writes the complete report"
)


class Shard:
    """Which runs this worker computes: ``mine(key, wait)`` for the runs in program order.

    A run that is cached, or whose position is this worker's, is mine (True). Another
    worker's run is skipped (False), unless ``wait``: then this waits until it is cached
    (a tuning run whose result later runs depend on).
    """

    def __init__(self, spec: str, cache: RunCache):
        self.i, self.k = (int(v) for v in spec.split("/"))
        self.cache, self.n = cache, 0

    def __call__(self, key: str, wait: bool = False) -> bool:
        pos, self.n = self.n, self.n + 1
        if self.k == 1 or pos % self.k == self.i or key in self.cache.runs:
            return True
        if not wait:
            return False
        while key not in self.cache.runs:
            time.sleep(10)
            self.cache.reload()
        return True


# ---------------------------------------------------------------------------------------------
# The study (its grids are in experiments.lp_ft_report, which quotes them).


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed at epsilon 3 (smoke test)")
    ap.add_argument("--seeds", type=int, default=3, help="test seeds per cell (0..n-1)")
    ap.add_argument("--report-only", action="store_true", help="rewrite md/png from the json")
    ap.add_argument("--shard", default="0/1", help=SHARD_HELP)
    args = ap.parse_args(argv)
    if args.report_only:
        write_report(json.loads((OUT / "lp_ft.json").read_text()))
        return
    t_start = time.time()
    seeds = 1 if args.quick else args.seeds
    epsilons = (3.0,) if args.quick else EPSILONS
    data = load_arrays()
    from dpft.models import pretrained

    tr = Trainer(pretrained.load("mobilenet_v2")[1], microbatch=LP_FT_MICROBATCH)
    cache = RunCache(CACHE / "runs.json")
    tune_data = {"train": data["train"], "val": data["val"]}
    test_data = {"train": data["all"], "test": data["test"]}
    common = dict(batch=BATCH, epochs=EPOCHS)
    res = {
        "args": {"quick": args.quick, "seeds": seeds, "batch": BATCH, "epochs": EPOCHS},
        "backbone": f"mobilenet_v2 @ {SIZE}px",
        "ft_blocks": list(FT_BLOCKS),
        "tuning": {},
        "chosen": {},
        "runs": [],
    }

    mine = Shard(args.shard, cache)

    def one(tag, data_, **kw):
        key = repr(sorted({**common, **kw}.items())) + tag
        if not mine(key, wait=tag == "tune"):
            return None
        return cache.get(key, lambda: run(tr, data_, **common, **kw))

    # Learning rates per arm and epsilon on the validation split (seed 100, not a test seed).
    for eps in epsilons:
        for lr in LP_LRS:
            r = one(
                "tune", tune_data, epsilon=eps, lp_fraction=1.0, lr_lp=lr, lr_ft=0.0, seed=TUNE_SEED
            )
            res["tuning"][f"eps={eps:g} lp lr={lr}"] = r
            print(f"tune eps {eps:g} LP lr={lr}: val {r['accuracy']:.4f}", flush=True)
        lr_lp = max(LP_LRS, key=lambda lr: res["tuning"][f"eps={eps:g} lp lr={lr}"]["accuracy"])
        res["chosen"][f"{eps:g}"] = {"lr_lp": lr_lp}
    # The FT rate (the expensive arm) is tuned once, at FT_TUNE_EPSILON, for every epsilon.
    for lr in FT_LRS:
        r = one(
            "tune",
            tune_data,
            epsilon=FT_TUNE_EPSILON,
            lp_fraction=0.0,
            lr_lp=0.0,
            lr_ft=lr,
            seed=TUNE_SEED,
        )
        res["tuning"][f"eps={FT_TUNE_EPSILON:g} ft lr={lr}"] = r
        print(f"tune FT lr={lr}: val {r['accuracy']:.4f} ({r['seconds']:.0f}s)", flush=True)
    key = f"eps={FT_TUNE_EPSILON:g} ft lr={{}}"
    lr_ft = max(FT_LRS, key=lambda lr: res["tuning"][key.format(lr)]["accuracy"])
    for eps in epsilons:
        lr_lp = res["chosen"][f"{eps:g}"]["lr_lp"]
        res["chosen"][f"{eps:g}"] = {"lr_lp": lr_lp, "lr_ft": lr_ft}

    def save():
        res["compute_seconds"] = sum(r["seconds"] for r in cache.runs.values())
        res["wall_seconds"] = time.time() - t_start
        (OUT / "lp_ft.json").write_text(json.dumps(res, indent=1))
        write_report(res)

    # Test runs: seed-major (a stopped study has whole seeds), cheap LP-heavy runs first.
    for seed in range(seeds):
        for eps in epsilons:
            ch = res["chosen"][f"{eps:g}"]
            for f in sorted(FRACTIONS, reverse=True):
                r = one(
                    "test",
                    test_data,
                    epsilon=eps,
                    lp_fraction=f,
                    lr_lp=ch["lr_lp"],
                    lr_ft=ch["lr_ft"],
                    seed=seed,
                    eval_split="test",
                )
                if r is None:  # another worker's run
                    continue
                res["runs"].append({"seed": seed, "target_epsilon": eps, "lp_fraction": f, **r})
                print(
                    f"seed {seed} eps {eps:g} f {f}: test {r['accuracy']:.4f} "
                    f"({r['seconds']:.0f}s)",
                    flush=True,
                )
                save()
    save()


if __name__ == "__main__":
    main()
