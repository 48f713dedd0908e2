"""``train_and_evaluate(config, workdir)``: one DP training run, resumable from its workdir.

Order of events per step, which is what makes the reported epsilon trustworthy:
1. the budget records the step in the ledger (or refuses it: the run stops before exceeding
   its target);
2. the step runs;
3. at log/checkpoint points metrics and checkpoints are written, the checkpoint carrying the
   ledger of every step it reflects.
A resumed run replays from its last checkpoint with the same keys and sampler, so it recomputes
exactly what the interrupted run computed: nothing new about the data is released. Every output
of step t (metrics.jsonl, a checkpoint) is written after step t is in the ledger, so a checkpoint's
ledger covers every step reflected in its arrays and a logged epsilon is never below the ledger's
(tests/test_crash.py kills the CLI with SIGKILL at random and targeted points to check this).

Config and data are validated before the workdir is touched: a bad input leaves it as it was.

Randomness (docs/randomness.md): by default the sampler and the noise are seeded from
``config.seed`` (reproducible). With ``config.dp.secure_noise`` both are seeded from OS entropy;
the secret seed is stored only inside the checkpoints (a step-0 checkpoint is written before
the first step), so that a resumed run still replays exactly.

Multi-process runs (`dpft.train.distributed`, README "Launching on a TPU pod"): every process
runs this same function on the same config; the mesh spans every device of every process, each
process gathers only its own rows of the common Poisson batch, the noise is drawn once per
logical batch on the replicated clipped sum, the accounting runs (identically) on every host,
checkpoints are saved by all processes together and everything else is written by process 0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpft import data as dpdata
from dpft.metrics import CalibrationAccumulator
from dpft.privacy import keys, ledger
from dpft.train import accumulate, batches, build, distributed, report
from dpft.train.checkpoint import Checkpointer, config_fingerprint
from dpft.train.phases import describe_phase, phase_index, plan_phases
from dpft.train.runtime import Runtime, RuntimeSpec, build_runtime, noise_key, place
from dpft.train.step import flatten
from dpft.train.workdir import ConfigMismatchError, eval_data_description
from dpft.train.workdir import checkpoint_meta as _checkpoint_meta
from dpft.train.workdir import claim_workdir as _claim_workdir
from dpft.train.workdir import config_json as _config_json

log = logging.getLogger("dpft")
__all__ = ["ConfigMismatchError", "evaluate", "examples_key", "noise_key", "train_and_evaluate"]

# TEST HOOK (tests/test_crash.py), inert unless the variable is set: "POINT:STEP" makes the
# process SIGKILL itself at POINT (step | eval | metrics | checkpoint) of step STEP.
_KILL_ENV = "DPFT_TEST_KILL_AT"


def _test_kill(point: str, step: int) -> None:
    if os.environ.get(_KILL_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _test_kill_while_writing(step: int, directory: pathlib.Path) -> None:
    """For "checkpoint:STEP": a thread that kills as soon as orbax's temporary dir appears."""
    if os.environ.get(_KILL_ENV) != f"checkpoint:{step}":
        return

    def watch():
        while not any("tmp" in p.name for p in directory.glob("*")):
            time.sleep(0.0002)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def examples_key(root: jax.Array, step) -> jax.Array:
    """The key handed to the per-example losses of step ``step`` (dropout, augmentation)."""
    return keys.derive(root, "examples", step)


def evaluate(eval_fn, params, frozen, arrays: dict, batch_size: int, *, details=False):
    """Accuracy, mean NLL and calibration (ECE, MCE; 15 bins) on a public eval set.

    Static-shape padded batches; padding rows are masked out. With ``details`` also returns the
    `CalibrationResult` (for the reliability diagram).
    """
    acc = CalibrationAccumulator(num_bins=15)
    for batch, mask in dpdata.eval_batches(arrays, batch_size):
        out = eval_fn(params, frozen, {**batch, "mask": jnp.asarray(mask, jnp.float32)})
        acc.update(np.asarray(out["logits"]), batch["label"], mask)
    result = acc.result()
    metrics = {
        "test_accuracy": result.accuracy,
        "test_loss": result.nll,
        "test_ece": result.ece,
        "test_mce": result.mce,
    }
    return (metrics, result) if details else metrics


_run_streamed_chunks = batches.run_streamed_chunks  # tests/test_stream.py


@dataclasses.dataclass
class _Run:
    """One run's state, shared by the steps of `train_and_evaluate`."""

    config: Any
    workdir: pathlib.Path
    multi: bool  # a multi-process run
    primary: bool  # process 0, which writes everything but the checkpoints
    config_json: str
    fingerprint: str
    num_examples: int
    chunk: int  # config.train.host_chunk_size (0: off)
    spec: RuntimeSpec  # what every phase's runtime is built from
    phases: list
    secure: bool  # config.dp.secure_noise
    user_ids: Any = None  # config.dp.unit='user': the user of every training example
    ckpt: Checkpointer | None = None
    latest: int | None = None  # the step of the checkpoint resumed from
    seed: int = 0
    sampler: Any = None
    budget: Any = None
    entry: Any = None  # the ledger entry of one step
    rt: Runtime | None = None  # the current phase's
    current: int = 0  # its index
    trained: dict = dataclasses.field(default_factory=dict)  # phase name -> what it trains
    writer: Any = None
    bar: Any = None
    start: int = 0  # the step the run (re)started at
    step: int = 0  # steps done
    steps_run: int = 0  # by this process
    stop_reason: str = "steps"
    last_eval: dict = dataclasses.field(default_factory=dict)
    calibration: Any = None  # bins of the latest eval, for the reliability diagram

    @property
    def plan(self) -> build.PrivacyPlan:
        return self.spec.plan

    @property
    def mesh(self):
        return self.spec.mesh

    @property
    def layout(self) -> batches.Layout:
        return batches.Layout(self.multi, self.mesh, self.plan.max_batch_size, self.chunk)


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
    """Trains with DP per ``config``, writing metrics, checkpoints and summary.json to workdir.

    `_validated` checks the inputs, `_open` claims the workdir and restores its checkpoint,
    `_train` runs the phases' steps (`_run_steps`: each one `dpft.train.batches.run_step`) and
    `_finish` writes the summary.
    """
    t_start = time.time()
    run = _validated(config, pathlib.Path(workdir))
    _open(run)
    t_train = time.time()
    _train(run)
    train_seconds = time.time() - t_train
    return _finish(run, t_start, train_seconds)


def _validated(config, workdir: pathlib.Path) -> _Run:
    """The run's data, mesh, privacy plan, phases and model, checked before the workdir is
    touched (a bad input leaves it as it was)."""
    multi = distributed.initialize(config.get("parallel"))  # before anything touches JAX
    primary = distributed.is_primary()
    config_json = _config_json(config)
    fingerprint = config_fingerprint(config_json)
    train_arrays, eval_arrays, num_classes = build.load_data(config)
    streamed = isinstance(train_arrays, dpdata.StreamSplit)  # config.data.pipeline='grain'
    n = len(train_arrays) if streamed else len(train_arrays["label"])
    mesh = build.make_mesh(config.get("parallel", {}).get("data", 1))
    n_dev = mesh.size if mesh is not None else 1
    if config.get("parallel", {}).get("fsdp", False) and mesh is None:
        raise ValueError(
            "config.parallel.fsdp=True shards over a mesh: set config.parallel.data to 0 (all "
            "devices) or > 1"
        )
    chunk = config.train.get("host_chunk_size", 0)
    if chunk and (chunk < 0 or n_dev > 1):
        raise ValueError(
            f"config.train.host_chunk_size must be >= 0 and used on one device, got {chunk}"
        )
    ids = None if streamed else build.user_ids(config, train_arrays)  # unit='user' only
    plan = build.plan_privacy(config, n, batch_multiple=chunk or n_dev, user_ids=ids)
    phases = plan_phases(config, plan.steps)
    if multi and any(p.use_features for p in phases):
        raise ValueError(
            "config.finetune.feature_cache=True is not supported in a multi-process run "
            "(every host would write the cache): set it False"
        )
    per_device = plan.max_batch_size // n_dev
    accumulate.check_microbatching(config.train, chunk or per_device, per_device)  # rows per call
    example = train_arrays.example_image if streamed else train_arrays["image"][0]
    model, variables = build.build_model(config, num_classes, example)
    full = flatten(variables)
    data = (train_arrays, eval_arrays)
    spec = RuntimeSpec(config, workdir, plan, model, full, *data, num_classes, mesh)  # root: _open
    secure = bool(config.dp.get("secure_noise", False))
    run = _Run(
        config, workdir, multi, primary, config_json, fingerprint, n, chunk, spec, phases, secure
    )
    run.user_ids = ids
    return run


def _mismatch(run: _Run) -> ConfigMismatchError:
    return ConfigMismatchError(
        f"checkpoint {run.ckpt.directory / str(run.latest)} is of another config than "
        f"{run.workdir / 'config.json'} (expected fingerprint {run.fingerprint}): use a new "
        "--workdir"
    )


def _open(run: _Run) -> None:
    """Claims the workdir, seeds the sampler and the keys, builds the phase to run (the first,
    or the latest checkpoint's), restores that checkpoint and opens the metrics."""
    config, plan = run.config, run.plan
    resumable = _claim_workdir(run.workdir, run.config_json)  # the inputs are validated
    run.ckpt = Checkpointer(run.workdir, keep=config.train.keep_checkpoints)
    run.latest = latest = run.ckpt.latest_step() if resumable else None
    saved = _checkpoint_meta(run.ckpt, latest) if latest is not None else {}
    if latest is not None and saved.get("fingerprint") != run.fingerprint:
        raise _mismatch(run)
    seed = config.seed
    if run.secure:  # sampling and noise from OS entropy; resuming takes it from the checkpoint
        if latest is None:  # process 0's secret on every process
            seed = distributed.broadcast_seed(keys.run_seed(config.seed, True))
        else:
            seed = int(saved.get("secure_seed", -1))
        if seed < 0:
            raise _mismatch(run)
        seed = keys.run_seed(config.seed, True, seed)
    run.seed = seed
    run.sampler = build.build_sampler(plan, seed, run.user_ids)  # Poisson, cyclic, or of users
    run.spec = dataclasses.replace(run.spec, root=keys.root_key(seed))
    run.budget = build.build_budget(plan)
    run.current = phase_index(run.phases, latest) if latest is not None else 0
    run.rt = build_runtime(run.spec, run.current, run.phases[run.current])
    _announce(run)
    if latest is not None:
        try:
            state, meta = run.ckpt.restore(latest, run.rt.state)
        except (ValueError, KeyError, TypeError) as e:  # other tree structure, shapes, dtypes
            raise _mismatch(run) from e
        if meta.get("phase", 0) != run.current:
            raise _mismatch(run)
        run.rt.state = place(state, run.rt.shardings)
        run.budget.ledger = run.budget.ledger.from_dict(meta["ledger"])  # of the budget's type
        run.sampler.load_state_dict(meta["sampler"])
        run.start = run.step = int(meta["step"])
        log.info("resuming %s from step %d (phase %s)", run.workdir, run.start, run.rt.phase.name)
    run.writer = report.metrics_writer(run.workdir, run.start, config.tensorboard, run.primary)
    run.entry = plan.entry()


def _announce(run: _Run) -> None:
    """Records (and prints, on stdout above the progress bar) what the current phase trains."""
    rt = run.rt
    line = describe_phase(run.config, rt.phase, rt.state.params, run.spec.full)
    if run.plan.unit == "user":  # the epsilon of this run is user-level
        p = run.plan
        line += f"; privacy unit: user ({p.num_users} users, up to {p.examples_per_user} "
        line += "examples each per step)"
    run.trained[rt.phase.name] = line
    if run.primary:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stdout)


def _checkpoint(run: _Run, step: int) -> None:
    meta = {
        "step": step,
        "phase": run.current,
        "ledger": run.budget.ledger.to_dict(),
        "sampler": run.sampler.state_dict(),
        "fingerprint": run.fingerprint,
    }
    if run.secure:  # the secret: needed to resume exactly; protect the checkpoints
        meta["secure_seed"] = run.seed
    _test_kill_while_writing(step, run.ckpt.directory)
    run.ckpt.save(step, run.rt.state, meta)
    _test_kill("checkpoint", step)


def _evaluate(run: _Run) -> None:
    """Evaluates the current parameters into ``run.last_eval`` and ``run.calibration``."""
    params, frozen = run.rt.state.params, run.rt.state.frozen
    if run.multi:  # every process evaluates on its own device, from a host copy
        params, frozen = distributed.to_host((params, frozen))
    bs = run.config.eval_batch_size
    out = evaluate(run.rt.eval_fn, params, frozen, run.rt.eval_arrays, bs, details=True)
    run.last_eval, run.calibration = out


def _train(run: _Run) -> None:
    """The phase loop: steps until the plan's last (or the budget's refusal), phase by phase."""
    if run.secure and run.latest is None:  # persist the secret before anything uses it
        _checkpoint(run, 0)
    name = run.config.name or "dpft"
    run.bar = report.progress_bar(run.plan.steps, run.start, name, disable=not run.primary)
    try:
        while run.stop_reason == "steps" and run.step < run.plan.steps:
            if run.step >= run.rt.phase.end:  # next phase: carry the trained parameters over
                live = {**run.rt.state.frozen, **run.rt.state.params}  # the old ones donated
                run.spec.full.update(distributed.to_host(live) if run.multi else live)
                run.current += 1
                run.rt = build_runtime(run.spec, run.current, run.phases[run.current])
                _announce(run)
                run.last_eval, run.calibration = {}, None
            _run_steps(run)
    finally:
        run.bar.close()
    steps_done = run.budget.ledger.steps
    if run.stop_reason == "budget" and steps_done > run.start:
        _checkpoint(run, steps_done)


def _run_steps(run: _Run) -> None:
    """Steps of the current phase from ``run.step`` to its end (or the budget's refusal)."""
    loader, rows = batches.open_loader(run.rt, run.sampler, run.step, run.layout)
    try:
        for step_idx, batch, mask in loader:
            if step_idx >= run.rt.phase.end:
                break
            try:
                run.budget.spend(run.entry)  # recorded BEFORE the step runs
            except ledger.BudgetExceededError as e:
                log.warning("stopping before step %d: %s", step_idx, e)
                run.stop_reason = "budget"
                break
            rng = examples_key(run.spec.root, step_idx)
            metrics = batches.run_step(run.rt, run.layout, batch, mask, rng, rows)
            _test_kill("step", step_idx + 1)  # the step is (being) computed
            run.step = run.sampler.step = step_idx + 1
            run.steps_run += 1
            run.bar.update(1)
            tr, step = run.config.train, run.step
            end = step in (run.plan.steps, run.rt.phase.end)  # of the run or of the phase
            if step % tr.log_every == 0 or end:
                _log(run, metrics, evaluate=step % tr.eval_every == 0 or end)
            if step % tr.checkpoint_every == 0 or end:
                _checkpoint(run, step)
    finally:
        loader.close()


def _log(run: _Run, metrics, *, evaluate: bool) -> None:
    """Writes step ``run.step``'s metrics and epsilon (and an evaluation with ``evaluate``)."""
    step = run.step
    host = distributed.to_host(metrics) if run.multi else metrics
    record = {k: float(v) for k, v in host.items()}
    epsilon = run.budget.epsilon()
    record["epsilon"] = epsilon
    if evaluate:
        _evaluate(run)
        _test_kill("eval", step)
        record.update(run.last_eval)
    if len(run.phases) > 1:
        record["phase"] = run.current
    run.writer.write(step, record)
    _test_kill("metrics", step)
    run.bar.set_postfix(
        eps=f"{epsilon:.3f}",
        debug_loss=f"{record['debug/train_loss']:.3f}",
        acc=f"{run.last_eval.get('test_accuracy', float('nan')):.3f}",
    )


def _finish(run: _Run, t_start: float, train_seconds: float) -> dict:
    """The final evaluation (unless the last step's is current), the summary and its report."""
    plan, config = run.plan, run.config
    if run.calibration is None or run.stop_reason == "budget":  # evaluate the final model once
        _evaluate(run)
    epsilon = run.budget.epsilon()
    try:  # cross-check; RDP cannot account a binding batch cap, PLD (the default) can
        spent = run.budget.ledger
        rdp_eps = spent.epsilon(plan.delta, "rdp") if plan.noise_multiplier > 0 else math.inf
    except ValueError as e:
        log.warning("no RDP cross-check: %s", e)
        rdp_eps = None
    summary = {
        **run.last_eval,
        "epsilon": epsilon,
        "epsilon_rdp": rdp_eps,
        "delta": plan.delta,
        "eval_data": eval_data_description(config),
        "accountant": plan.accountant,
        "target_epsilon": plan.target_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "sampling_rate": plan.sampling_rate,
        "expected_batch_size": plan.expected_batch_size,
        "steps": run.budget.ledger.steps,
        "planned_steps": plan.steps,
        "phases": {p.name: p.steps for p in run.phases},
        "trained": run.trained,
        "stop_reason": run.stop_reason,
        "num_train_examples": run.num_examples,
        **plan.unit_summary(),  # user-level: epsilon, rate and expected batch are of users
        "wall_seconds": time.time() - t_start,
        "train_seconds": train_seconds,
        # from the public expected batch size: the realised sizes are private
        "examples_per_second": (
            run.steps_run * plan.expected_batch_size / train_seconds if train_seconds > 0 else 0.0
        ),
    }
    run.writer.close()
    run.ckpt.close()
    title = f"{config.name}: eps={epsilon:.2f}, delta={plan.delta:g}"
    plots = config.get("plots", True)
    return report.finish_run(run.workdir, summary, run.calibration, title, plots, run.primary)
