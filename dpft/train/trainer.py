"""``train_and_evaluate(config, workdir)``: one DP training run, resumable from its workdir.

Order of events per step, which is what makes the reported epsilon trustworthy:
1. the budget records the step in the ledger (or refuses it: the run stops before exceeding
   its target);
2. the step runs;
3. at log/checkpoint points metrics and checkpoints are written, the checkpoint carrying the
   ledger of every step it reflects.
A resumed run replays from its last checkpoint with the same keys and sampler, so it recomputes
exactly what the interrupted run computed: nothing new about the data is released.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp

from dpft import data as dpdata
from dpft.privacy import accounting, sampling
from dpft.train import build, report
from dpft.train.checkpoint import Checkpointer, config_fingerprint
from dpft.train.step import (
    TrainState,
    cross_entropy_loss,
    make_eval_step,
    make_train_step,
    partition,
)

log = logging.getLogger("dpft")


class ConfigMismatchError(ValueError):
    """The workdir holds a run of a different config."""


def _config_json(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, indent=2, default=str)


def _claim_workdir(workdir: pathlib.Path, config_json: str) -> bool:
    """Writes config.json, or checks it against an existing run; True if resuming is possible."""
    path = workdir / "config.json"
    if path.exists():
        old = path.read_text()
        if old != config_json:
            raise ConfigMismatchError(
                f"{path} holds a different config (fingerprint {config_fingerprint(old)} vs "
                f"{config_fingerprint(config_json)}): use a new --workdir"
            )
        return True
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config_json)
    tmp.replace(path)
    return False


def evaluate(eval_fn, params, frozen, arrays: dict, batch_size: int) -> dict:
    """Accuracy and mean NLL on a public eval set, with static-shape padded batches."""
    loss = correct = count = 0.0
    for batch, mask in dpdata.eval_batches(arrays, batch_size):
        out = eval_fn(params, frozen, {**batch, "mask": jnp.asarray(mask, jnp.float32)})
        loss += float(out["loss_sum"])
        correct += float(out["correct_sum"])
        count += float(out["count"])
    return {"test_accuracy": correct / count, "test_loss": loss / count}


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
    """Trains with DP per ``config``, writing metrics, checkpoints and summary.json to workdir."""
    t_start = time.time()
    workdir = pathlib.Path(workdir)
    config_json = _config_json(config)
    fingerprint = config_fingerprint(config_json)
    train_arrays, eval_arrays, num_classes = build.load_data(config)
    n = len(train_arrays["label"])
    plan = build.plan_privacy(config, n)
    mb = config.train.microbatch_size or None
    if mb is not None and mb > plan.max_batch_size:
        raise ValueError(
            f"config.train.microbatch_size={mb} is larger than the padded batch "
            f"{plan.max_batch_size}"
        )
    model, variables = build.build_model(config, num_classes, train_arrays["image"][0])
    trainable, frozen = partition(variables, config.finetune.trainable)
    clipper = build.build_clipper(config.dp)
    sensitivity = clipper.sensitivity(trainable) if config.dp.clip_norm < math.inf else math.inf
    base_key = jax.random.PRNGKey(config.seed)
    tx = build.build_optimizer(config, plan, sensitivity, jax.random.fold_in(base_key, 1))
    state = TrainState(jnp.zeros([], jnp.int32), trainable, tx.init(trainable), frozen)

    resumable = _claim_workdir(workdir, config_json)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    sampler = sampling.PoissonSampler(n, plan.sampling_rate, config.seed, plan.max_batch_size)
    budget = accounting.PrivacyBudget(plan.target_epsilon, plan.delta, plan.accountant)
    start = 0
    latest = ckpt.latest_step() if resumable else None
    if latest is not None:
        state, meta = ckpt.restore(latest, state)
        if meta["fingerprint"] != fingerprint:
            raise ConfigMismatchError(f"checkpoint {latest} in {workdir} is of another config")
        budget.ledger = accounting.PrivacyLedger.from_dict(meta["ledger"])
        sampler.load_state_dict(meta["sampler"])
        start = int(meta["step"])
        log.info("resuming %s from step %d", workdir, start)

    apply_fn = model.apply
    step_fn = jax.jit(
        make_train_step(cross_entropy_loss(apply_fn), clipper, tx, microbatch_size=mb),
        donate_argnums=0,
    )
    eval_fn = jax.jit(make_eval_step(apply_fn))
    writer = report.MetricsWriter(workdir, resume_step=start, tensorboard=config.tensorboard)
    step_key = jax.random.fold_in(base_key, 2)
    entry = plan.entry()

    def checkpoint(step: int) -> None:
        meta = {
            "step": step,
            "ledger": budget.ledger.to_dict(),
            "sampler": sampler.state_dict(),
            "fingerprint": fingerprint,
        }
        ckpt.save(step, state, meta)

    last_eval: dict = {}
    stop_reason = "steps"
    t_train = time.time()
    examples_seen = 0
    bar = report.progress_bar(plan.steps, start, config.name or "dpft")
    loader = dpdata.BatchLoader(train_arrays, sampler, start_step=start, prefetch=2)
    try:
        step = start
        for step_idx, batch, mask in loader:
            if step_idx >= plan.steps:
                break
            try:
                budget.spend(entry)  # recorded BEFORE the step runs
            except accounting.BudgetExceededError as e:
                log.warning("stopping before step %d: %s", step_idx, e)
                stop_reason = "budget"
                break
            batch = {**batch, "mask": mask}
            state, metrics = step_fn(state, batch, jax.random.fold_in(step_key, step_idx))
            step = step_idx + 1
            sampler.step = step
            examples_seen += int(mask.sum())
            bar.update(1)
            is_last = step == plan.steps
            if step % config.train.log_every == 0 or is_last:
                record = {k: float(v) for k, v in metrics.items()}
                epsilon = budget.epsilon()
                record["epsilon"] = epsilon
                if step % config.train.eval_every == 0 or is_last:
                    last_eval = evaluate(
                        eval_fn, state.params, state.frozen, eval_arrays, config.eval_batch_size
                    )
                    record.update(last_eval)
                writer.write(step, record)
                bar.set_postfix(
                    eps=f"{epsilon:.3f}",
                    loss=f"{record['debug/train_loss']:.3f}",
                    acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}",
                )
            if step % config.train.checkpoint_every == 0 or is_last:
                checkpoint(step)
    finally:
        loader.close()
        bar.close()
    steps_done = budget.ledger.steps
    if stop_reason == "budget" and steps_done > start:
        checkpoint(steps_done)
    train_seconds = time.time() - t_train
    if not last_eval or stop_reason == "budget":
        last_eval = evaluate(
            eval_fn, state.params, state.frozen, eval_arrays, config.eval_batch_size
        )
    epsilon = budget.epsilon()
    rdp_eps = budget.ledger.epsilon(plan.delta, "rdp") if plan.noise_multiplier > 0 else math.inf
    summary = {
        **last_eval,
        "epsilon": epsilon,
        "epsilon_rdp": rdp_eps,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "target_epsilon": plan.target_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "sampling_rate": plan.sampling_rate,
        "expected_batch_size": plan.expected_batch_size,
        "steps": steps_done,
        "planned_steps": plan.steps,
        "stop_reason": stop_reason,
        "num_train_examples": n,
        "wall_seconds": time.time() - t_start,
        "train_seconds": train_seconds,
        "examples_per_second": examples_seen / train_seconds if train_seconds > 0 else 0.0,
    }
    summary = {k: report._jsonable(v) if isinstance(v, float) else v for k, v in summary.items()}
    writer.close()
    ckpt.close()
    tmp = workdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(workdir / "summary.json")
    report.plot_curves(workdir, title=f"{config.name}: eps={epsilon:.2f}, delta={plan.delta:g}")
    return summary
