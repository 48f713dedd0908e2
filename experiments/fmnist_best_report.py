"""experiments/results/fmnist_best.md from the runs `experiments.fmnist_best` stored.

Every figure of the report is read from the store (experiments/results/fmnist_best.json); a
run not stored yet shows as "not run". Means are over the seeds stored, with the sample
standard deviation (ddof 1).
"""

from __future__ import annotations

import numpy as np

BASE = "train.batch_size=8192 train.epochs=60.0 train.learning_rate=16.0"
SCATTER3 = f"tune eps3 gn {BASE}"
BOTH3 = f"mobilenet64 w=1.0 eps3 {BASE}"

# (lever, setting, tag) of the validation-split runs: trained on 54k, selected on 6k
ABLATION = [
    ("features", "ScatterNet (GroupNorm 27) alone", SCATTER3),
    ("features", "MobileNetV2 64 px alone (LayerNorm)", f"mobilenet64 alone eps3 {BASE}"),
    ("features", "**ScatterNet + MobileNetV2 64 px**", BOTH3),
    ("normalisation", "GroupNorm 27 groups of 3 (Tramer & Boneh)", SCATTER3),
    ("normalisation", "GroupNorm 81 (per channel)", f"norm group_norm groups=81 eps3 {BASE}"),
    ("normalisation", "GroupNorm 9", f"norm group_norm groups=9 eps3 {BASE}"),
    ("normalisation", "none (raw coefficients)", f"norm none groups=27 eps3 {BASE}"),
    ("learning rate", "2", SCATTER3.replace("learning_rate=16.0", "learning_rate=2.0")),
    ("learning rate", "8", SCATTER3.replace("learning_rate=16.0", "learning_rate=8.0")),
    ("learning rate", "16", SCATTER3),
    ("learning rate", "32", SCATTER3.replace("learning_rate=16.0", "learning_rate=32.0")),
    ("learning rate", "32, cosine", f"{SCATTER3.replace('=16.0', '=32.0')} train.schedule=cosine"),
    ("learning rate", "16, cosine", f"{SCATTER3} train.schedule=cosine"),
    ("epochs (steps)", "30 (198)", SCATTER3.replace("epochs=60.0", "epochs=30.0")),
    ("epochs (steps)", "60 (396)", SCATTER3),
    (
        "epochs (steps)",
        "120 (792), lr 8",
        "tune eps3 gn train.batch_size=8192 train.epochs=120.0 train.learning_rate=8.0",
    ),
    ("batch size", "8192, 60 epochs", SCATTER3),
    (
        "batch size",
        "16384, 120 epochs (396 steps)",
        "tune eps3 gn train.batch_size=16384 train.epochs=120.0 train.learning_rate=16.0",
    ),
    (
        "batch size",
        "16384, 60 epochs, lr 4",
        "tune eps3 gn train.batch_size=16384 train.epochs=60.0 train.learning_rate=4.0",
    ),
    (
        "feature method",
        "DP least squares (reg 300)",
        "method dp_least_squares eps3 feature_clip=1.0 reg=300.0",
    ),
    (
        "feature method",
        "DP-FC (30 steps)",
        "method dp_fc eps3 clip_norm=1.0 cov_fraction=0.3 feature_clip=1.0 learning_rate=2.0 "
        "reg=0.01 steps=30",
    ),
    ("concat lr", "8", BOTH3.replace("learning_rate=16.0", "learning_rate=8.0")),
    ("concat lr", "16", BOTH3),
    ("concat lr", "32", BOTH3.replace("learning_rate=16.0", "learning_rate=32.0")),
]
EPS1 = [
    (
        "ScatterNet, 30 epochs, lr 8",
        "tune eps1 gn train.batch_size=8192 train.epochs=30.0 train.learning_rate=8.0",
    ),
    (
        "ScatterNet, 30 epochs, lr 16",
        "tune eps1 gn train.batch_size=8192 train.epochs=30.0 train.learning_rate=16.0",
    ),
    (
        "ScatterNet, 60 epochs, lr 8",
        "tune eps1 gn train.batch_size=8192 train.epochs=60.0 train.learning_rate=8.0",
    ),
    (
        "ScatterNet, 60 epochs, lr 16",
        "tune eps1 gn train.batch_size=8192 train.epochs=60.0 train.learning_rate=16.0",
    ),
    (
        "ScatterNet + MobileNetV2, 30 epochs, lr 8",
        "mobilenet64 w=1.0 eps1 train.batch_size=8192 train.epochs=30.0 train.learning_rate=8.0",
    ),
    (
        "ScatterNet + MobileNetV2, 60 epochs, lr 8",
        "mobilenet64 w=1.0 eps1 train.batch_size=8192 train.epochs=60.0 train.learning_rate=8.0",
    ),
]
FINAL = [
    ("Fashion-MNIST, eps 3", "ScatterNet + MobileNetV2", "final scatter+mobilenet 3", "3"),
    ("Fashion-MNIST, eps 1", "ScatterNet + MobileNetV2", "final scatter+mobilenet 1", "1"),
    (
        "MNIST, eps 3",
        "ScatterNet + MobileNetV2",
        "final mnist scatter+mobilenet 3,mnist",
        "3,mnist",
    ),
    ("Fashion-MNIST, eps 3", "ScatterNet alone (`make run`)", "final scatter 3,scatter", "run"),
    ("Fashion-MNIST, eps 1", "ScatterNet alone", "final scatter 1,scatter", "1,scatter"),
]


def pct(x) -> str:
    return "not run" if x is None else f"{100 * x:.2f}"


def seeds_of(store: dict, prefix: str) -> list[dict]:
    return [v for k, v in sorted(store.items()) if k.startswith(prefix + " seed=")]


def mean_std(values) -> str:
    v = np.asarray(values, float) * 100
    if v.size == 0:
        return "not run"
    if v.size == 1:
        return f"{v[0]:.2f} (1 seed)"
    return f"**{v.mean():.2f} +- {v.std(ddof=1):.2f}**"


def final_table(store: dict) -> list[str]:
    rows = [
        "| task | features | test accuracy, seeds 0-2 (%) | mean +- std (%) | EMA 0.999 (study "
        "only) | epsilon | steps | sigma | s / run (head) | config |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for task, what, prefix, arg in FINAL:
        runs = seeds_of(store, prefix)
        if not runs:
            rows.append(f"| {task} | {what} | not run | | | | | | | `:{arg}` |")
            continue
        r = runs[0]
        rows.append(
            f"| {task} | {what} | {' / '.join(pct(x['test']) for x in runs)} | "
            f"{mean_std([x['test'] for x in runs])} | "
            f"{mean_std([x['test_ema'] for x in runs]).strip('*')} | {r['epsilon']:.3f} | "
            f"{r['steps']} | {r['noise_multiplier']:.2f} | "
            f"{np.mean([x['seconds'] for x in runs]):.0f} | `:{arg}` |"
        )
    return rows


def val_rows(store: dict, spec) -> list[str]:
    rows = []
    for item in spec:
        *label, tag = item
        r = store.get(tag, {})
        cells = " | ".join(label)
        ema = pct(r.get("val_ema")) if "val_ema" in r or not r else "-"
        rows.append(f"| {cells} | {pct(r.get('val'))} | {ema} | {pct(r.get('test'))} |")
    return rows


def mean_of(store: dict, prefix: str) -> float | None:
    runs = seeds_of(store, prefix)
    return float(np.mean([r["test"] for r in runs])) if runs else None


def verdict(store: dict) -> list[str]:
    out = []
    for goal, prefix, name in (
        (0.90, "final scatter+mobilenet 3", "epsilon 3 (goal 90.0%)"),
        (0.88, "final scatter+mobilenet 1", "epsilon 1 (goal 88.0%)"),
        (0.987, "final mnist scatter+mobilenet 3,mnist", "MNIST at epsilon 3 (goal 98.7%)"),
        (0.88, "final scatter 3,scatter", "`make run` at epsilon 3 (goal 88%)"),
    ):
        m = mean_of(store, prefix)
        if m is None:
            out.append(f"- {name}: not run.")
        else:
            word = "met" if m >= goal else "**missed**"
            out.append(f"- {name}: mean {100 * m:.2f}%: {word}.")
    return out


def diff(store: dict, a: str, b: str, key: str = "test") -> str:
    """Mean of ``key`` over the seeds of prefix ``a`` minus that of ``b``, in points."""
    ra, rb = seeds_of(store, a), seeds_of(store, b)
    if not ra or not rb:
        return "not run"
    return f"{100 * (np.mean([r[key] for r in ra]) - np.mean([r['test'] for r in rb])):+.2f}"


def val_diff(store: dict, a: str, b: str) -> str:
    if a not in store or b not in store:
        return "not run"
    return f"{100 * (store[a]['val'] - store[b]['val']):+.2f}"


def levers(store: dict) -> list[str]:
    both3, scat3 = "final scatter+mobilenet 3", "final scatter 3,scatter"
    both1, scat1 = "final scatter+mobilenet 1", "final scatter 1,scatter"
    return [
        f"- MobileNetV2 64 px features beside the ScatterNet: {diff(store, both3, scat3)} points "
        f"of test accuracy at epsilon 3, {diff(store, both1, scat1)} at epsilon 1 (final "
        "runs); alone they are weaker than the ScatterNet (validation: "
        f"{val_diff(store, ABLATION[1][2], SCATTER3)} points).",
        "- Per-example GroupNorm of the scattering (27 groups): "
        f"{val_diff(store, SCATTER3, ABLATION[6][2])} points of validation accuracy over the "
        "raw coefficients; 81 or 9 groups are within half a point of 27.",
        "- Learning rate and steps: at batch 8192, lr 8-16 and 60 epochs are best for the "
        "ScatterNet; at epsilon 1, where the noise per step is larger, 30 epochs win for "
        "ScatterNet + MobileNetV2 (ScatterNet alone: 30 and 60 epochs within 0.2 points). "
        "Batch 16384 for the same steps is no better; a cosine schedule no better either.",
        f"- EMA of the iterates (study only): {diff(store, both3, both3, 'test_ema')} points at "
        f"epsilon 3, {diff(store, both1, both1, 'test_ema')} at epsilon 1 (final runs): within "
        "the seed noise, so the trainer, which has no EMA, loses nothing measurable.",
        "- Feature methods of `dpft.linear` on the ScatterNet features (DP least squares, DP-FC, "
        "epsilon 3): 5-11 points below DP-SGD; the 3969-d features are too many for their "
        "noisy second moments at this n.",
        "- Not tried: augmentation multiplicity (the features are cached, one per image: "
        "augmented views would need the scattering / MobileNetV2 per view and step), "
        "fine-tuning MobileNetV2 blocks or LP-FT (a forward and backward pass of the backbone "
        "per example and step: hours on 2 cores), MobileNetV2 at 112 px (3x the extraction "
        "time; its non-private linear probe gains about a point over 64 px).",
    ]


def write_report(store: dict) -> str:
    lines = [
        "# The best DP recipe on Fashion-MNIST (configs/fmnist_best.py)",
        "",
        "Written by `python -m experiments.fmnist_best` (`--quick`: from the stored runs in",
        "experiments/results/fmnist_best.json). Delta 1e-5, PLD accountant, Poisson sampling.",
        "Machine: 2 shared CPU cores (AMD EPYC), JAX 0.10.2, CPU only.",
        "",
        "## Recipe",
        "",
        "- Images in [0, 1]. Features, both fixed public functions, normalised per example "
        "(no privacy cost):",
        "  ScatterNet = kymatio's second-order scattering transform, J=2, L=8 (81 x 7 x 7 = "
        "3969 coefficients),",
        "  GroupNorm in 27 groups without parameters (Tramer & Boneh 2021); beside it the 1280 "
        "pooled features",
        "  of torchvision's ImageNet MobileNetV2 at 64 px (bilinear resize, grey to RGB, ImageNet "
        "mean/std, frozen",
        "  BatchNorm), LayerNorm per example. Model `scatternet_mobilenet` "
        "(`dpft/models/scatternet.py`).",
        "- Trained: only the head, a zero-initialised Dense 5249 -> 10 (52,500 parameters), by "
        "DP-SGD on the",
        "  trainer's feature cache (`finetune.mode='head'`): expected batch 8192 (q = 0.137), 60 "
        "epochs = 440 steps,",
        "  clip norm 0.1 (ghost norms), SGD momentum 0.9, constant learning rate 8; at "
        "epsilon 1, 30 epochs.",
        "  ScatterNet alone (`:run`, the `make run` job): the same with learning rate 16 "
        "(60 epochs at both epsilons).",
        "- Hyperparameters chosen on a validation split: 10% of the training set "
        "(`data.validation_fraction=0.1`,",
        "  split seed 0), trained on the other 54k; this tuning is not counted in epsilon. The "
        "final runs train on",
        "  all 60k and are evaluated once on the test split. Test figures of the tuning runs "
        "are recorded below but",
        "  were not used to choose.",
        "- Scale: features are computed once (ScatterNet about 1 minute for 70k images, the "
        "MobileNetV2 at 64 px",
        "  about 8 ms per image, 10 minutes on 2 idle cores); a DP head run is then 1-5 minutes.",
        "",
        "## Final runs (whole training split, test split, seeds 0, 1, 2)",
        "",
        *final_table(store),
        "",
        "The EMA column is an exponential moving average of the iterates (De et al. 2022, "
        "decay min(0.999,",
        "(1+t)/(10+t)); post-processing, no privacy cost), measured by the study's runner only: "
        "the trainer has no",
        "EMA, so the config's figure is the plain column. The runner's head training "
        "(`train_head`) is the",
        "trainer's (same plan, sampler, keys, clipper, step) on the cached features: the CLI run",
        "`python -m dpft --config configs/fmnist_best.py:run` (seed 0, fresh workdir) gave "
        "89.86% test at epsilon 3.000,",
        "the runner's seed 0 figure above, in 322 s (the scattering of the 70k images "
        "included; 2 shared cores).",
        "The `:3` / `:1` / `:3,mnist` CLI runs add the MobileNetV2 extraction (10-30 minutes) "
        "once per cache directory.",
        "",
        "## Verdict",
        "",
        *verdict(store),
        "",
        "Published anchors at epsilon 3 (Tramer & Boneh 2021): Fashion-MNIST ScatterNet + "
        "linear 89.7%,",
        "ScatterNet + CNN 89.0%, end-to-end CNN 86.0%; MNIST 98.7% at epsilon 2.93.",
        "",
        "## Each lever's contribution",
        "",
        *levers(store),
        "",
        "## Ablation (validation split, seed 0, epsilon 3)",
        "",
        "Base: ScatterNet + GroupNorm 27, batch 8192, 60 epochs, lr 16, clip 0.1, SGD momentum "
        "0.9; one lever",
        "changed per row. Selection is by the validation column.",
        "",
        "| lever | setting | val (%) | val EMA (%) | test (%) |",
        "|---|---|---:|---:|---:|",
        *val_rows(store, ABLATION),
        "",
        "## Epsilon 1 (validation split, seed 0)",
        "",
        "| setting | val (%) | val EMA (%) | test (%) |",
        "|---|---:|---:|---:|",
        *val_rows(store, EPS1),
        "",
    ]
    return "\n".join(lines)
