"""``python -m dpft.tune``: private hyperparameter tuning with a random number of runs.

    python -m dpft.tune --config configs/NAME.py[:ARG] --workdir DIR \
        --grid 'train.learning_rate=0.5,1,2;dp.clip_norm=0.1,1' [--random N] \
        [--repetitions poisson:MU | tnb:ETA,GAMMA | geometric:GAMMA | logarithmic:GAMMA] \
        [--metric validation_accuracy] [--config.KEY=VALUE ...]

A quick example (a DP-GD linear head on cached features of a 2,000-example subset)::

    python -m dpft.tune --config configs/fmnist_linear.py:dp_gd,smoke --workdir /tmp/tune_lin \
        --grid 'linear.learning_rate=0.01,0.05,0.2' --repetitions poisson:2 \
        --config.data.validation_fraction=0.1 --config.linear.steps=20 \
        --config.finetune.cache_dir=/tmp/tune_features

Expected: per-candidate epsilon 3.00 (PLD; 3.30 by RDP), total epsilon 4.24 at delta 1e-4
including the tuning, whatever K is drawn (the distribution of K is accounted, not K).
About 1-2 minutes on 2 shared CPU cores (the backbone features are computed once, cached).

What it does (Papernot & Steinke 2022; the accounting is `dpft.privacy.tuning`):

1. K is drawn from ``--repetitions`` (default ``poisson:2``) with OS randomness and saved in
   ``DIR/tuning_state.json`` (mode 0600) together with the K candidates, each drawn uniformly
   from the pool: the grid's Cartesian product, or ``--random N`` points drawn from it.
2. Each candidate is a full dpft run of the config with its hyperparameters, in
   ``DIR/candidates/NNN``, through `dpft.__main__.train_and_evaluate` (the CLI's dispatcher).
   Every candidate has the same (epsilon, delta) target and runs with
   ``dp.secure_noise=True`` (independent noise per run; the config's seed, which fixes the
   validation split, is shared). Trainer candidates are accounted with ``dp.accountant=rdp``
   unless ``--config.dp.accountant`` is given, since the total is an RDP bound.
3. The best candidate by ``--metric`` on the validation split is selected
   (``data.validation_fraction`` must be > 0: the test split is never looked at; a run's eval
   metrics ``test_*`` are then its validation metrics, ``validation_*`` here).
4. ``DIR/summary.json`` (the release): the best candidate's results and hyperparameters, with
   ``epsilon`` the TOTAL epsilon of the tuning (``epsilon_includes_tuning``), and the
   per-candidate epsilon. ``DIR/tuning.json``: the full record, including K and every
   candidate's result; it and ``DIR/candidates`` are NOT covered by the guarantee (only the
   selected output is; see docs/tuning.md) and must not be released.

Rerunning with the same DIR and arguments continues: K and the candidates are read back,
finished candidates (those with a summary.json) are skipped and an interrupted one resumes.

Limits: the grid may not change the DP mechanism (keys of the data, the target, the steps,
the batch or the noise are refused, and every candidate's mechanism is checked equal to the
first's); federated configs are not supported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys

from dpft.__main__ import _one_line, train_and_evaluate
from dpft.privacy import tuning
from dpft.privacy.ledger import PrivacyLedger
from dpft.tune.grid import (
    candidate_pool,
    load_config,
    parse_args,
    parse_grid,
    parse_metric,
    parse_value,
    set_value,
)

log = logging.getLogger("dpft")

STATE = "tuning_state.json"
# Config keys a grid may not vary: they change the data, the (epsilon, delta) target, the
# randomness or the DP mechanism (steps, batch, noise), which must be one for all candidates.


def _write_json(path: pathlib.Path, obj, private: bool = False) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _identity(args, overrides, base_json: str) -> dict:
    return {
        "config": args.config,
        "overrides": [list(o) for o in overrides],
        "grid": args.grid,
        "random": args.random,
        "repetitions": args.repetitions,
        "metric": args.metric,
        "base_config": json.loads(base_json),
    }


def _mechanism(summary: dict, cdir: pathlib.Path) -> tuple[str, tuple]:
    """('ledger', GaussianSteps entries) of a trainer run or ('releases', sigmas) of a linear."""
    if "releases" in summary:
        return "releases", tuple(float(r["noise_multiplier"]) for r in summary["releases"])
    from dpft.train.checkpoint import Checkpointer
    from dpft.train.workdir import checkpoint_meta

    ckpt = Checkpointer(cdir)
    try:
        latest = ckpt.latest_step()
        if latest is None:
            raise ValueError(f"{cdir}: no checkpoint holds the run's privacy ledger")
        ledger = PrivacyLedger.from_dict(checkpoint_meta(ckpt, latest)["ledger"])
    finally:
        ckpt.close()
    return "ledger", tuple(ledger.entries)


def _total_epsilon(mechanism: tuple[str, tuple], reps, delta: float) -> float:
    kind, value = mechanism
    if kind == "releases":
        return tuning.release_total_epsilon(value, reps, delta)
    return tuning.ledger_total_epsilon(value, reps, delta)


def tune(args, overrides) -> dict:
    """Runs the tuning of ``args`` and returns the released summary.

    One piece because it is one privacy argument read top to bottom: the draw of K and the
    candidates (saved before any run), the K runs, the check that every run was the same
    mechanism, and the release of the best alone with the total epsilon.
    """
    from dpft.train.workdir import config_json

    base = load_config(args.config)
    if "federated" in base:
        raise ValueError("dpft.tune does not support federated configs (config.federated)")
    has_accountant = any(k == "dp.accountant" for k, _ in overrides)
    if "linear" not in base and not has_accountant:
        base.dp.accountant = "rdp"  # the total is an RDP bound: calibrate the base with RDP
    for key, text in overrides:
        set_value(base, key, parse_value(base, key, text))
    base.dp.secure_noise = True  # independent noise in every run
    if not base.data.validation_fraction > 0:
        raise ValueError(
            "config.data.validation_fraction must be > 0 for tuning: candidates are selected "
            "on a validation split, never on the test split (pass "
            "--config.data.validation_fraction=0.1)"
        )
    grid = parse_grid(base, args.grid)
    metric_key, higher = parse_metric(args.metric)
    reps = tuning.parse_repetitions(args.repetitions)
    workdir = pathlib.Path(args.workdir)
    identity = _identity(args, overrides, config_json(base))

    state_path = workdir / STATE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["identity"] != identity:
            raise ValueError(
                f"{state_path} holds a tuning run with other arguments or config: rerun it with "
                "the same ones or use a new --workdir"
            )
        log.info("resuming %s: K=%d drawn before", workdir, state["k"])
    else:
        pool = candidate_pool(grid, args.random)
        k = tuning.draw_repetitions(reps)
        candidates = [pool[tuning.draw_index(len(pool))] for _ in range(k)]
        state = {"identity": identity, "k": k, "pool": pool, "candidates": candidates}
        workdir.mkdir(parents=True, exist_ok=True)
        _write_json(state_path, state, private=True)  # before any run: K is never redrawn

    runs = []
    for i, hp in enumerate(state["candidates"]):
        cdir = workdir / "candidates" / f"{i:03d}"
        done = cdir / "summary.json"
        if done.exists():
            log.info("candidate %03d is finished: skipping it", i)
            summary = json.loads(done.read_text())
        else:
            config = base.copy_and_resolve_references()
            for key, value in hp.items():
                set_value(config, key, value)
            config.lock()
            log.info("candidate %03d of %d: %s", i, state["k"], hp)
            summary = train_and_evaluate(config, cdir)
        runs.append((i, hp, summary, _mechanism(summary, cdir)))

    delta = float(base.dp.delta)
    for i, _, summary, mech in runs[1:]:
        if mech != runs[0][3]:
            raise ValueError(
                f"candidate {i:03d} has another DP mechanism than candidate 000 (a grid key "
                "changes the steps, batch or noise): tuning needs one mechanism for all"
            )
        if summary.get("target_epsilon") != runs[0][2].get("target_epsilon"):
            raise ValueError(f"candidate {i:03d} has another target epsilon than candidate 000")
    for i, _, summary, _ in runs:
        if not str(summary.get("eval_data", "")).startswith("validation"):
            raise ValueError(f"candidate {i:03d} was not evaluated on a validation split")
        if metric_key not in summary:
            raise ValueError(f"candidate {i:03d}'s summary has no {metric_key!r} ({args.metric})")

    def score(run) -> float:
        v = run[2][metric_key]
        v = math.nan if v is None else float(v)
        return -math.inf if math.isnan(v) else (v if higher else -v)

    best = max(runs, key=score) if runs else None  # the first of equal scores
    if not runs:  # K = 0: no run, no mechanism to account; nothing but "no output" is released
        log.warning("K = 0 was drawn: no candidate runs and nothing is released")
    total = _total_epsilon(runs[0][3], reps, delta) if runs else None
    per_candidate = runs[0][2]["epsilon"] if runs else None
    per_candidate_rdp = runs[0][2].get("epsilon_rdp") if runs else None
    if runs and runs[0][3][0] == "releases":  # feature methods report PLD only
        per_candidate_rdp = tuning.release_rdp_epsilon(runs[0][3][1], delta)

    distribution = reps.to_dict()
    record = {
        "NOT_RELEASED": (
            "K, the candidates and their results are outside the DP guarantee; release only "
            "summary.json (the selected candidate)"
        ),
        "k": state["k"],
        "repetitions": distribution,
        "metric": args.metric,
        "grid": args.grid,
        "pool_size": len(state["pool"]),
        "candidates": [
            {
                "index": i,
                "workdir": str(workdir / "candidates" / f"{i:03d}"),
                "hyperparameters": hp,
                args.metric: s.get(metric_key),
                "epsilon": s.get("epsilon"),
                "epsilon_rdp": s.get("epsilon_rdp", per_candidate_rdp),
            }
            for i, hp, s, _ in runs
        ],
        "best": best[0] if best else None,
        "delta": delta,
        "epsilon_per_candidate": per_candidate,
        "epsilon_per_candidate_rdp": per_candidate_rdp,
        "epsilon_total": total,
        "accounting": "RDP (dp-accounting RepeatAndSelectDpEvent, Papernot & Steinke 2022)",
    }
    released = {}
    if best is not None:
        i, hp, s, _ = best
        validation = {
            "validation_" + k[len("test_") :]: v for k, v in s.items() if k.startswith("test_")
        }
        released = {
            **validation,
            "hyperparameters": hp,
            "epsilon": total,
            "epsilon_includes_tuning": True,
            "epsilon_per_candidate": per_candidate,
            "epsilon_per_candidate_rdp": per_candidate_rdp,
            "delta": delta,
            "repetitions": distribution,
            "metric": args.metric,
            "accounting": record["accounting"] + ": an upper bound covering the whole tuning",
            "eval_data": s.get("eval_data"),
            "steps": s.get("steps"),
            "best_workdir": str(workdir / "candidates" / f"{i:03d}"),
            "note": (
                "epsilon is the TOTAL of the tuning (the random number of candidate runs and "
                "the selection), not of one run; DIR/candidates/* other than best_workdir and "
                "DIR/tuning.json hold non-released artefacts"
            ),
        }
        record["released"] = released
    _write_json(workdir / "tuning.json", record)
    if best is not None:
        _write_json(workdir / "summary.json", released)
    return released


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 with one ``error:`` line on bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("dpft").setLevel(logging.INFO)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    try:
        args, overrides = parse_args(argv)
        summary = tune(args, overrides)
    except (ValueError, OSError, KeyError, AttributeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    if not summary:
        print(f"K=0: no candidate ran; nothing released ({args.workdir}/tuning.json)")
        return 0
    print(
        f"best={summary['hyperparameters']} {args.metric}={summary[args.metric]:.4f} "
        f"epsilon_total={summary['epsilon']:.4f} (per candidate "
        f"{summary['epsilon_per_candidate']:.4f}) delta={summary['delta']:g}  "
        f"({args.workdir}/summary.json)"
    )
    return 0
