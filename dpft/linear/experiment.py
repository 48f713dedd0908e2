"""``python -m dpft --config configs/fmnist_linear.py:METHOD --workdir DIR``: a feature method.

A config with a ``linear`` section is dispatched here by `dpft.__main__.train_and_evaluate`.
The run loads the data (`dpft.train.build.load_data`), the pretrained backbone
(`dpft.train.build.build_model`), takes its pooled features from the feature cache shared with
the head / LP runs of the trainer (`dpft.train.features`, ``finetune.cache_dir``), fits a linear
head with one of the methods of `dpft.linear` calibrated to ``config.dp.epsilon`` /
``config.dp.delta``, and writes the workdir contract of every dpft run:

* ``config.json`` (a workdir holding another config is refused);
* ``checkpoints/secret.json`` in secure mode (``config.dp.secure_noise``): the run's 64-bit
  secret (`dpft.privacy.keys.SecretFile`), saved before anything is computed from it and read
  back by a rerun, which then draws exactly the noise of the interrupted attempt (no second,
  unaccounted release). Protect it like the checkpoints of a trainer run (docs/randomness.md);
* ``metrics.jsonl``: one record at the last step with ``epsilon``, ``test_accuracy``,
  ``test_loss`` (NLL), ``test_ece``, ``test_mce`` (15 bins) and ``debug/`` train statistics;
* ``summary.json``: those metrics plus ``epsilon``, ``delta``, ``steps``, ``wall_seconds``, the
  releases and their noise multipliers;
* ``reliability.png`` and ``training_curves.png``.

A rerun in a finished workdir returns its summary without redoing any work; a rerun of an
interrupted one (no ``summary.json``) fits again with the same noise and rewrites the outputs.
``config.dp.delta`` must lie in (0, 1/N) for the N training examples: checked after the data is
read and before the workdir is touched.

``config.linear.method``:

* ``single_step``: one full-batch DP-GD step from zero (Mehta et al. 2022), SGD or Adam update;
* ``dp_gd``: ``linear.steps`` full-batch DP-GD steps;
* ``dp_least_squares``: noisy X^T X and X^T Y, PSD projection, ridge solve;
* ``dp_newton``: noisy gradients and curvature, Newton-type steps;
* ``dp_fc``: noisy feature covariance as preconditioner of full-batch DP-GD.

The per-example gradient clip of the gradient methods is ``config.dp.clip_norm``; the other
hyperparameters are the keys of ``config.linear`` (unused keys are ignored by a method).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import jax
import numpy as np

from dpft import linear
from dpft.data import StreamSplit
from dpft.metrics import CalibrationAccumulator
from dpft.privacy import accounting, keys

log = logging.getLogger("dpft")

METHODS = ("single_step", "dp_gd", "dp_least_squares", "dp_newton", "dp_fc")
SECRET = pathlib.Path("checkpoints") / "secret.json"  # relative to the workdir


def _method_kwargs(config) -> tuple:
    """(function, keyword arguments, number of optimisation steps) for ``config.linear``."""
    lin, clip = config.linear, float(config.dp.clip_norm)
    m = lin.method
    if m in ("single_step", "dp_gd") and lin.optimizer not in ("sgd", "adam"):
        raise ValueError(f"config.linear.optimizer must be sgd|adam, got {lin.optimizer!r}")
    if m == "single_step":
        kw = dict(clip_norm=clip, steps=1, learning_rate=lin.learning_rate, update=lin.optimizer)
        return linear.dp_gd, {**kw, "weight_decay": lin.weight_decay}, 1
    if m == "dp_gd":
        kw = dict(clip_norm=clip, steps=lin.steps, learning_rate=lin.learning_rate)
        return (
            linear.dp_gd,
            {**kw, "update": lin.optimizer, "weight_decay": lin.weight_decay},
            lin.steps,
        )
    if m == "dp_least_squares":
        kw = dict(feature_clip=lin.feature_clip, reg=lin.reg, targets=lin.targets)
        return linear.dp_least_squares, {**kw, "budget_split": lin.budget_split}, 1
    if m == "dp_newton":
        kw = dict(feature_clip=lin.feature_clip, steps=lin.steps, reg=lin.reg)
        kw.update(damping=lin.damping, hessian=lin.hessian, hessian_share=lin.hessian_share)
        return linear.dp_newton, kw, lin.steps
    if m == "dp_fc":
        kw = dict(feature_clip=lin.feature_clip, clip_norm=clip, steps=lin.steps)
        kw.update(learning_rate=lin.learning_rate, cov_fraction=lin.cov_fraction, reg=lin.reg)
        return linear.dp_fc, kw, lin.steps
    raise ValueError(f"config.linear.method must be one of {'|'.join(METHODS)}, got {m!r}")


def check_config(config) -> None:
    """One-line ValueErrors naming the key, before any data is read or the workdir touched."""
    _method_kwargs(config)
    dp = config.dp
    if not dp.epsilon > 0 or math.isnan(dp.epsilon):
        raise ValueError(f"config.dp.epsilon must be > 0, got {dp.epsilon}")
    if not 0 < dp.delta < 1:
        raise ValueError(f"config.dp.delta must be in (0, 1), got {dp.delta}")
    if dp.noise_multiplier >= 0:
        raise ValueError(
            "config.dp.noise_multiplier must be < 0 for config.linear runs (their noise is "
            f"calibrated to dp.epsilon), got {dp.noise_multiplier}"
        )
    if not config.model.pretrained:
        raise ValueError("config.linear needs a pretrained backbone: set config.model.pretrained")


def run_key(config, workdir: pathlib.Path) -> jax.Array:
    """The run's root key: ``keys.root_key`` of ``config.seed`` (reproducible mode) or, with
    ``config.dp.secure_noise``, of the secret in ``workdir / SECRET`` (drawn and saved first
    on a fresh run, read back on a rerun).

    Privacy:
        In secure mode the key holds 64 bits of OS randomness (both uint32 words), saved before
        any noise is drawn from it, so an interrupted run that is rerun releases the same noisy
        sums again instead of new ones (which the accounting would not cover).
    """
    secure = bool(config.dp.get("secure_noise", False))
    return keys.root_key(keys.SecretFile(workdir / SECRET).seed(config.seed, secure))


def fit(config, X, y, num_classes: int, root: jax.Array) -> tuple:
    """Runs ``config.linear.method`` on features ``X`` [N, d] -> (LinearParams, info, steps).

    The method gets the key ``keys.derive(root, "noise")`` and derives one key per release
    from it (``keys.derive(key, "release", j)``).

    Privacy:
        The method's own statement (`dpft.linear`): a fixed composition of full-batch Gaussian
        mechanisms on clipped sums, add/remove-one neighbouring, calibrated with PLD so that the
        returned ``info['epsilon']`` <= ``config.dp.epsilon`` at ``config.dp.delta``. ``X`` must
        be a public function (the frozen public backbone) of the private examples.
    """
    fn, kwargs, steps = _method_kwargs(config)
    key = keys.derive(root, "noise")
    try:
        params, info = fn(
            X, y, num_classes, epsilon=config.dp.epsilon, delta=config.dp.delta, key=key, **kwargs
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.linear ({config.linear.method}): {e}") from None
    return params, info, int(steps)


def calibration(params, X, y):
    """`CalibrationResult` (accuracy, NLL, ECE, MCE, 15 bins) of the head on (X, y); a sharded
    reader X is read shard by shard."""
    acc = CalibrationAccumulator(num_bins=15)
    if not hasattr(X, "iter_shards"):
        return acc.update(np.asarray(linear.logits(params, X)), np.asarray(y)).result()
    start = 0
    for x, _ in X.iter_shards():
        acc.update(np.asarray(linear.logits(params, x)), np.asarray(y)[start : start + len(x)])
        start += len(x)
    return acc.result()


def load_data(config) -> tuple[dict, dict, int]:
    """(train arrays, eval arrays, num_classes) of `dpft.train.build.load_data`; writes nothing."""
    from dpft.train import build

    return build.load_data(config)


def load_features(config, workdir: pathlib.Path, data: tuple) -> tuple[dict, dict]:
    """(train {'x','y'}, eval {'x','y'}): backbone features of ``data`` (`load_data`) as sharded
    readers (`dpft.train.features.feature_shards`: the methods read them shard by shard) from
    the cache, written under the workdir unless ``finetune.cache_dir`` is set. The splits may be
    arrays or streamed (``config.data.pipeline='grain'``: the labels stored in the shards)."""
    from dpft.train import build
    from dpft.train.features import feature_shards  # the trainer's cache and key
    from dpft.train.step import flatten

    train, evaluation, k = data
    model, variables = build.build_model(config, k, _example_image(train))
    feats = feature_shards(config, workdir, model, flatten(variables), train, evaluation)

    def labels(split, reader):  # a streamed split's labels are read with its features
        return reader.labels if isinstance(split, StreamSplit) else split["label"]

    return (
        {"x": feats["train"], "y": labels(train, feats["train"])},
        {"x": feats["eval"], "y": labels(evaluation, feats["eval"])},
    )


def _example_image(split) -> np.ndarray:
    """The first model input of a split: arrays, or a streamed `dpft.data.StreamSplit`."""
    return split.example_image if isinstance(split, StreamSplit) else split["image"][0]


def _num_rows(split) -> int:
    return len(split) if isinstance(split, StreamSplit) else len(split["label"])


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
    """Fits the head per ``config.linear`` and writes the workdir contract -> summary."""
    from dpft.train import report
    from dpft.train.workdir import claim_workdir, config_json, eval_data_description

    t_start = time.time()
    workdir = pathlib.Path(workdir)
    check_config(config)
    done = workdir / "summary.json"
    text = config_json(config)
    claimed = (workdir / "config.json").exists()
    if claimed:  # refuses another config; writes nothing
        claim_workdir(workdir, text)
        if done.exists():
            log.info("%s is finished: returning its summary", workdir)
            return json.loads(done.read_text())
    data = load_data(config)
    accounting.check_delta(config.dp.delta, _num_rows(data[0]), name="config.dp.delta")
    if not claimed:  # the inputs are valid: now the workdir is written
        claim_workdir(workdir, text)
    root = run_key(config, workdir)  # secure mode: the secret is saved before it is used
    train, evaluation = load_features(config, workdir, data)
    k = data[2]
    del data
    t_fit = time.time()
    params, info, steps = fit(config, train["x"], train["y"], k, root)
    fit_seconds = time.time() - t_fit
    result = calibration(params, evaluation["x"], evaluation["y"])
    train_cal = calibration(params, train["x"], train["y"])  # NOT private: debug/ only
    metrics = {
        "test_accuracy": result.accuracy,
        "test_loss": result.nll,
        "test_ece": result.ece,
        "test_mce": result.mce,
    }
    writer = report.MetricsWriter(workdir, resume_step=0, tensorboard=config.tensorboard)
    writer.write(
        steps,
        {
            "epsilon": info["epsilon"],
            **metrics,
            "debug/train_loss": train_cal.nll,
            "debug/train_accuracy": train_cal.accuracy,
        },
    )
    writer.close()
    summary = {
        **metrics,
        "epsilon": info["epsilon"],
        "delta": float(config.dp.delta),
        "target_epsilon": float(config.dp.epsilon),
        "method": config.linear.method,
        "eval_data": eval_data_description(config),
        "accountant": "pld (full-batch Gaussian compositions, dpft.privacy.releases)",
        "releases": info["releases"],
        "steps": steps,
        "num_train_examples": len(train["y"]),
        "feature_dim": int(train["x"].shape[1]),
        "fit_seconds": fit_seconds,
        "wall_seconds": time.time() - t_start,
    }
    title = f"{config.name or 'linear'} {config.linear.method}: eps={info['epsilon']:.2f}"
    return report.finish_run(workdir, summary, result, title, config.get("plots", True))
