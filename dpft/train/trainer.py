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

import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpft import data as dpdata
from dpft.metrics import CalibrationAccumulator
from dpft.privacy import keys, ledger, sampling
from dpft.train import accumulate, build, distributed, report
from dpft.train.checkpoint import Checkpointer, config_fingerprint
from dpft.train.phases import describe_phase, phase_index, plan_phases
from dpft.train.runtime import Runtime, build_runtime, noise_key, place
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


class _IndexLoader:
    """Yields ``(step, indices, mask)`` of the sampler's padded batches, for chunked steps."""

    def __init__(self, sampler, start: int, stop: int):
        self._it = ((s, *sampler.batch_at(s)) for s in range(start, stop))

    def __iter__(self):
        return self._it

    def close(self) -> None:
        pass


def _run_streamed_chunks(jitted, state, chunks, rng):
    """`accumulate.run_chunked` over a streamed batch's ``(offset, chunk)`` pairs: the same
    accumulation, each chunk read (by the grain workers) only when the device takes it."""
    acc = jitted.init(state)
    for offset, part in chunks:
        if not part["mask"].any():
            continue  # padding only: contributes exactly zero
        jax.block_until_ready(acc)  # one chunk ahead of the device at most
        acc = jitted.accumulate(acc, state, part, rng, np.uint32(offset))
    return jitted.finish(state, acc)


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
    """Trains with DP per ``config``, writing metrics, checkpoints and summary.json to workdir."""
    t_start = time.time()
    multi = distributed.initialize(config.get("parallel"))  # before anything touches JAX
    primary = distributed.is_primary()
    workdir = pathlib.Path(workdir)
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
    plan = build.plan_privacy(config, n, batch_multiple=chunk or n_dev)
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
    secure = bool(config.dp.get("secure_noise", False))

    resumable = _claim_workdir(workdir, config_json)  # everything above validated the inputs
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    latest = ckpt.latest_step() if resumable else None
    other = ConfigMismatchError(
        f"checkpoint {ckpt.directory / str(latest)} is of another config than "
        f"{workdir / 'config.json'} (expected fingerprint {fingerprint}): use a new --workdir"
    )
    saved = _checkpoint_meta(ckpt, latest) if latest is not None else {}
    if latest is not None and saved.get("fingerprint") != fingerprint:
        raise other
    seed = config.seed
    if secure:  # sampling and noise from OS entropy; resuming takes it from the checkpoint
        if latest is None:  # process 0's secret on every process
            seed = distributed.broadcast_seed(keys.run_seed(config.seed, True))
        else:
            seed = int(saved.get("secure_seed", -1))
        if seed < 0:
            raise other
        seed = keys.run_seed(config.seed, True, seed)
    sampler = sampling.PoissonSampler(n, plan.sampling_rate, seed, plan.max_batch_size)
    root = keys.root_key(seed)
    budget = ledger.PrivacyBudget(plan.target_epsilon, plan.delta, plan.accountant)
    data = (train_arrays, eval_arrays)

    def runtime(i: int) -> Runtime:
        return build_runtime(
            config, workdir, i, phases[i], plan, model, full, data, num_classes, mesh, root
        )

    start = 0
    current = phase_index(phases, latest) if latest is not None else 0
    rt = runtime(current)
    trained = {}  # phase name -> what it trains (printed, and kept in summary.json)

    def announce() -> None:
        trained[rt.phase.name] = describe_phase(config, rt.phase, rt.state.params, full)
        if primary:  # above the progress bar (stderr), on stdout
            from tqdm.auto import tqdm

            tqdm.write(trained[rt.phase.name], file=sys.stdout)

    announce()
    if latest is not None:
        try:
            state, meta = ckpt.restore(latest, rt.state)
        except (ValueError, KeyError, TypeError) as e:  # other tree structure, shapes, dtypes
            raise other from e
        if meta.get("phase", 0) != current:
            raise other
        rt.state = place(state, rt.shardings)
        budget.ledger = ledger.PrivacyLedger.from_dict(meta["ledger"])
        sampler.load_state_dict(meta["sampler"])
        start = int(meta["step"])
        log.info("resuming %s from step %d (phase %s)", workdir, start, rt.phase.name)

    writer = report.metrics_writer(workdir, start, config.tensorboard, primary)
    entry = plan.entry()

    def checkpoint(step: int) -> None:
        meta = {
            "step": step,
            "phase": current,
            "ledger": budget.ledger.to_dict(),
            "sampler": sampler.state_dict(),
            "fingerprint": fingerprint,
        }
        if secure:  # the secret: needed to resume exactly; protect the checkpoints
            meta["secure_seed"] = seed
        _test_kill_while_writing(step, ckpt.directory)
        ckpt.save(step, rt.state, meta)
        _test_kill("checkpoint", step)

    def run_eval(details=False):
        params, frozen = rt.state.params, rt.state.frozen
        if multi:  # every process evaluates on its own device, from a host copy
            params, frozen = distributed.to_host((params, frozen))
        return evaluate(
            rt.eval_fn,
            params,
            frozen,
            rt.eval_arrays,
            config.eval_batch_size,
            details=details,
        )

    last_eval: dict = {}
    calibration = None  # bins of the latest eval, for the reliability diagram
    stop_reason = "steps"
    t_train = time.time()
    steps_run = 0
    if secure and latest is None:  # persist the secret before anything is computed from it
        checkpoint(0)
    bar = report.progress_bar(plan.steps, start, config.name or "dpft", disable=not primary)
    step = start
    try:
        while stop_reason == "steps" and step < plan.steps:
            if step >= rt.phase.end:  # next phase: carry the trained parameters over
                live = {**rt.state.frozen, **rt.state.params}  # the step donated the old ones
                full.update(distributed.to_host(live) if multi else live)
                current += 1
                rt = runtime(current)
                announce()
                last_eval, calibration = {}, None
            rows = None  # a multi-process stream reads the rows of this process's devices
            streamed = isinstance(rt.train_arrays, dpdata.StreamSplit)  # not cached features
            if streamed:  # read, decoded and transformed by grain worker processes
                if multi:
                    rows = distributed.local_rows(mesh, plan.max_batch_size)
                loader = dpdata.StreamLoader(
                    rt.train_arrays,
                    sampler,
                    start_step=step,
                    stop_step=rt.phase.end,
                    rows=rows,
                    chunk_size=chunk or None,  # host-chunked: the batch read chunk by chunk
                )
            elif rt.chunked is None and not multi:
                loader = dpdata.BatchLoader(
                    rt.train_arrays, sampler, start_step=step, prefetch=2, stop_step=rt.phase.end
                )
            else:  # indices only; examples gathered chunk by chunk or per process
                loader = _IndexLoader(sampler, step, rt.phase.end)
            try:
                for step_idx, batch, mask in loader:
                    if step_idx >= rt.phase.end:
                        break
                    try:
                        budget.spend(entry)  # recorded BEFORE the step runs
                    except ledger.BudgetExceededError as e:
                        log.warning("stopping before step %d: %s", step_idx, e)
                        stop_reason = "budget"
                        break
                    rng = examples_key(root, step_idx)
                    if multi:  # each process reads or gathers the rows of its own devices
                        if streamed:
                            local = {**batch, "mask": mask}
                            batch = distributed.global_from_rows(
                                mesh, local, rows, plan.max_batch_size
                            )
                        else:
                            batch = distributed.gather_global(mesh, rt.train_arrays, batch, mask)
                        rng = distributed.replicated(mesh, rng)
                        rt.state, metrics = rt.step_fn(rt.state, batch, rng)
                    elif rt.chunked is not None and streamed:  # batch: its streamed chunks
                        rt.state, metrics = _run_streamed_chunks(rt.chunked, rt.state, batch, rng)
                    elif rt.chunked is not None:
                        rt.state, metrics = accumulate.run_chunked(
                            rt.chunked, rt.state, rt.train_arrays, batch, mask, chunk, rng
                        )
                    else:
                        batch = {**batch, "mask": mask}
                        if mesh is not None:  # examples split over the data axis
                            batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
                        rt.state, metrics = rt.step_fn(rt.state, batch, rng)
                    _test_kill("step", step_idx + 1)  # the step is (being) computed
                    step = step_idx + 1
                    sampler.step = step
                    steps_run += 1
                    bar.update(1)
                    is_last = step == plan.steps
                    phase_end = step == rt.phase.end
                    if step % config.train.log_every == 0 or is_last or phase_end:
                        host = distributed.to_host(metrics) if multi else metrics
                        record = {k: float(v) for k, v in host.items()}
                        epsilon = budget.epsilon()
                        record["epsilon"] = epsilon
                        if step % config.train.eval_every == 0 or is_last or phase_end:
                            last_eval, calibration = run_eval(details=True)
                            _test_kill("eval", step)
                            record.update(last_eval)
                        if len(phases) > 1:
                            record["phase"] = current
                        writer.write(step, record)
                        _test_kill("metrics", step)
                        bar.set_postfix(
                            eps=f"{epsilon:.3f}",
                            debug_loss=f"{record['debug/train_loss']:.3f}",
                            acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}",
                        )
                    if step % config.train.checkpoint_every == 0 or is_last or phase_end:
                        checkpoint(step)
            finally:
                loader.close()
    finally:
        bar.close()
    steps_done = budget.ledger.steps
    if stop_reason == "budget" and steps_done > start:
        checkpoint(steps_done)
    train_seconds = time.time() - t_train
    if calibration is None or stop_reason == "budget":  # evaluate the final model once
        last_eval, calibration = run_eval(details=True)
    epsilon = budget.epsilon()
    try:  # cross-check; RDP cannot account a binding batch cap, PLD (the default) can
        rdp_eps = (
            budget.ledger.epsilon(plan.delta, "rdp") if plan.noise_multiplier > 0 else math.inf
        )
    except ValueError as e:
        log.warning("no RDP cross-check: %s", e)
        rdp_eps = None
    summary = {
        **last_eval,
        "epsilon": epsilon,
        "epsilon_rdp": rdp_eps,
        "delta": plan.delta,
        "eval_data": eval_data_description(config),
        "accountant": plan.accountant,
        "target_epsilon": plan.target_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "sampling_rate": plan.sampling_rate,
        "expected_batch_size": plan.expected_batch_size,
        "steps": steps_done,
        "planned_steps": plan.steps,
        "phases": {p.name: p.steps for p in phases},
        "trained": trained,
        "stop_reason": stop_reason,
        "num_train_examples": n,
        "wall_seconds": time.time() - t_start,
        "train_seconds": train_seconds,
        # from the public expected batch size: the realised sizes are private
        "examples_per_second": (
            steps_run * plan.expected_batch_size / train_seconds if train_seconds > 0 else 0.0
        ),
    }
    writer.close()
    ckpt.close()
    title = f"{config.name}: eps={epsilon:.2f}, delta={plan.delta:g}"
    plots = config.get("plots", True)
    return report.finish_run(workdir, summary, calibration, title, plots, primary)
