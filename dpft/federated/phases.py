"""Fine-tuning phases of a federated run: one phase (scratch, full, head, partial) or LP-FT.

`dpft.train.phases.plan_phases` (with rounds for steps) gives the phases, as for centralized
training. ``lp_ft`` runs two phases over one privacy budget:

* LP, rounds ``[0, L)`` with ``L = round(finetune.lp_fraction * rounds)``: only the head
  ``linear`` is trained (on the frozen backbone's cached features with
  ``finetune.feature_cache``, as in mode ``head``), with ``finetune.lp_learning_rate`` (when
  > 0) as ``federated.local_lr`` (``server_lr`` for fedsgd, whose local step has learning rate 1);
* FT, rounds ``[L, rounds)``: ``finetune.trainable`` (default everything) of the pretrained
  model whose head is the LP phase's final head.

Every phase runs `dpft.federated.runner.run` on the GLOBAL round numbers (client sampling, local
batches, keys and checkpoint numbers), and the FT phase starts from the LP phase's ledger, so
``metrics.jsonl`` counts rounds across phases and its epsilon is the one spent so far. Each
``lp_ft`` phase checkpoints under its own subdirectory ``WORKDIR/<phase name>/checkpoints``: a
finished LP phase leaves its final head there, and a run interrupted in either phase resumes
that phase (a finished LP phase is restored from its last checkpoint, never rerun). One-phase
modes keep their checkpoints in ``WORKDIR/checkpoints``.

Privacy:
    The noise multiplier is resolved once for the whole run (calibrated to ``dp.epsilon`` for
    ``federated.rounds`` rounds when < 0) and every phase uses it with the same sampling, so
    every round records the same ledger entry: the run's epsilon is that of ``rounds`` rounds
    of the one-phase modes, <= the target. Neither the head nor the learning rate changes the
    per-round sensitivity (per-example clip at example level, client clip at client level).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax

from dpft.federated import driver, runner
from dpft.federated.plan import FedConfig
from dpft.privacy import clipping
from dpft.train import build
from dpft.train import features as features_lib
from dpft.train.checkpoint import Checkpointer
from dpft.train.phases import Phase
from dpft.train.step import cross_entropy_loss, flatten, partition, unflatten

__all__ = ["apply_mode", "make_clipper", "phase_configs", "phase_dirs", "rounds_done", "run"]


def apply_mode(config, workdir, data, model, variables, phase: Phase):
    """The fine-tuning mode: ``head`` with the feature cache swaps images for the frozen
    backbone's features and the model for the linear head, exactly as the centralized trainer
    does; then (params, frozen) per the phase's trainable patterns."""
    train, evaluation, num_classes = data
    if phase.use_features:  # the centralized trainer's head phase (in memory)
        model, variables, train, evaluation = features_lib.head_on_features(
            config,
            workdir,
            model,
            flatten(variables),
            num_classes,
            train,
            evaluation,
            in_memory=True,
        )
    params, frozen = partition(variables, phase.trainable)
    return train, evaluation, model, params, frozen


def make_clipper(config, fc: FedConfig, params):
    """The per-example clipper (example level) bound to the trainable parameters."""
    if fc.dp != "example":
        return None
    clipper = build.build_clipper(config.dp)
    if isinstance(clipper, clipping.PerLayerClip):
        clipper = clipper.bind(params)
    return clipper


def phase_dirs(config, workdir: pathlib.Path, phases: list[Phase]) -> list[pathlib.Path]:
    """Where each phase checkpoints: ``WORKDIR/<name>`` per phase of ``lp_ft``, else WORKDIR."""
    if config.finetune.mode != "lp_ft":
        return [workdir] * len(phases)
    return [workdir / p.name for p in phases]


def phase_configs(
    config, fc: FedConfig, phases: list[Phase], clients, n_dev: int = 1
) -> list[FedConfig]:
    """Each phase's `FedConfig`: ``rounds`` = the phase's end (a global round number), the
    run's noise multiplier resolved for all ``fc.rounds`` rounds, the phase's learning rate.

    Privacy:
        One noise multiplier for every phase, calibrated (``fc.noise_multiplier < 0``) for the
        whole run with the runner's client slots, so the phases compose to the one-phase run's
        epsilon. One-phase modes get ``fc`` itself (their calibration is the runner's).
    """
    if config.finetune.mode != "lp_ft":
        return [fc]
    sizes = [len(c) for c in clients]
    plan = driver.make_plan(fc, sizes, slot_multiple=n_dev)
    z, whole = plan.noise_multiplier, driver.round_entry(fc, plan)
    out = []
    for p in phases:
        pfc = dataclasses.replace(fc, rounds=p.end, noise_multiplier=z)
        if p.learning_rate is not None:
            key = "server_lr" if fc.algorithm == "fedsgd" else "local_lr"
            pfc = dataclasses.replace(pfc, **{key: float(p.learning_rate)})
        out.append(pfc)
    for pfc in out:  # guard: every round of every phase is accounted as one of the whole run
        if driver.round_entry(pfc, driver.make_plan(pfc, sizes, slot_multiple=n_dev)) != whole:
            raise AssertionError("the phases of an lp_ft run must share one round entry")
    return out


def _latest(directory: pathlib.Path) -> int | None:
    if not (directory / "checkpoints").exists():
        return None
    ckpt = Checkpointer(directory)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def rounds_done(dirs: list[pathlib.Path], phases: list[Phase]) -> int:
    """Global rounds done per the phases' checkpoints (0: none); refuses a later phase's
    checkpoint after an unfinished earlier phase."""
    done = 0
    for i, d in enumerate(dirs):
        latest = _latest(d)
        if latest is None:
            continue
        if i > 0 and done != phases[i - 1].end:
            raise ValueError(f"{d} holds checkpoints but phase {phases[i - 1].name} is unfinished")
        done = latest
    return done


def run(
    config,
    phases: list[Phase],
    configs: list[FedConfig],
    dirs: list[pathlib.Path],
    data: tuple,
    model,
    variables,
    clients,
    *,
    workdir: pathlib.Path,
    make_eval: Callable,
    on_round: Callable,
    **run_kwargs,
):
    """Runs the phases in order (each resuming from its own checkpoints) -> ``(result,
    eval_fn, frozen, train)`` of the last phase, ``result.ledger`` covering every phase.

    ``make_eval(model, eval_arrays) -> eval_fn(params, frozen)`` builds a phase's evaluation;
    ``on_round(record, state)`` gets each round's record (with ``phase`` when there are
    several); ``run_kwargs`` go to `dpft.federated.runner.run`.
    """
    full = flatten(variables)
    ledger = None
    for i, (phase, pfc, pdir) in enumerate(zip(phases, configs, dirs, strict=True)):
        train, evaluation, pmodel, params, frozen = apply_mode(
            config, workdir, data, model, unflatten(full), phase
        )
        eval_fn = make_eval(pmodel, evaluation)
        report = on_round
        if len(phases) > 1:
            report = lambda rec, st, i=i: on_round({**rec, "phase": i}, st)  # noqa: E731
        result = runner.run(
            pfc,
            cross_entropy_loss(pmodel.apply, build.build_augment(config, phase.use_features)),
            params,
            frozen,
            train,
            clients,
            workdir=pdir,
            eval_fn=eval_fn,
            clipper=make_clipper(config, pfc, params),
            norm_strategy=build.build_norm_strategy(config.dp),
            on_round=report,
            start_round=phase.start,
            ledger=ledger,
            **run_kwargs,
        )
        full.update(jax.device_get(result.params))  # the next phase starts from this head
        ledger = result.ledger
    return result, eval_fn, frozen, train
