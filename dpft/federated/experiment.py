"""``train_and_evaluate(config, workdir)`` for configs with a ``federated`` section.

``python -m dpft --config configs/fmnist_fed.py --workdir DIR`` lands here (`dpft.__main__`
dispatches on the section). The run reuses the centralized trainer's pieces: data loading and
model building (`dpft.train.build`), fine-tuning modes (`dpft.train.phases`: ``scratch``,
``full``, ``head`` on cached features, ``partial``, and ``lp_ft``: a head phase for the first
``round(finetune.lp_fraction * rounds)`` rounds, then ``finetune.trainable`` from the learned
head, over one privacy budget, see `dpft.federated.phases`), the feature cache, evaluation with
calibration metrics, the metrics writer, progress bar and plots (`dpft.train.report`), and it
writes the same workdir contract: ``config.json``, ``metrics.jsonl`` (one record per logged
round, ``step`` = rounds done, counted across phases), TensorBoard events, orbax checkpoints
(every ``federated.checkpoint_every`` rounds; ``WORKDIR/lp`` and ``WORKDIR/ft`` per phase of
``lp_ft``), ``training_curves.png``, ``reliability.png`` and ``summary.json`` (with
``lp_rounds``). Rerunning with the same workdir resumes from the last checkpoint; a workdir
holding another config is refused.

Config mapping: ``config.dp`` gives the target ``epsilon``, ``delta``, ``noise_multiplier``
(< 0: calibrated to the target for the planned rounds), the accountant, and at example level
the per-example clipping (``clip_norm``, ``clipping``) and ``secure_noise`` (client sampling,
local batches, client keys and server noise from a 64-bit secret of OS entropy, kept in the
checkpoints' metadata and reused on resume, never written to ``config.json``, the metrics or
the summary; the checkpoints must then be protected like the data), and at client level the adaptive
clipping of the client updates (``adaptive_quantile`` > 0, ``adaptive_lr``,
``adaptive_count_noise``: the clip starts at ``federated.client_clip``, see `check_adaptive` and
docs/adaptive_clipping.md; metrics.jsonl then logs ``clip_norm`` and ``unclipped_fraction``);
``config.federated`` gives
everything else (see `FEDERATED_KEYS`). ``config.train`` is not used, except
``keep_checkpoints``. ``dp.delta`` must be below 1/N, N the number of examples at example level
and the number of clients at client level.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import time

import jax
import numpy as np

from dpft import optim
from dpft.federated import driver
from dpft.federated import partition as fed_partition
from dpft.federated import phases as fed_phases
from dpft.federated.plan import DP_LEVELS, FedConfig, check_delta
from dpft.privacy import accounting
from dpft.train import build, report
from dpft.train import trainer as central
from dpft.train import workdir as workdir_lib
from dpft.train.phases import plan_phases
from dpft.train.step import make_eval_step

log = logging.getLogger("dpft")

#: Keys of ``config.federated`` and their meaning (defaults in configs/fmnist_fed.py).
FEDERATED_KEYS = {
    "num_clients": "number of clients the training set is split into",
    "partition": "iid | dirichlet | shards",
    "alpha": "Dirichlet concentration (partition=dirichlet)",
    "shards_per_client": "shards per client (partition=shards)",
    "level": "DP level: example | client | none",
    "algorithm": "fedavg | fedsgd",
    "rounds": "number of rounds",
    "client_rate": "Poisson rate of client sampling per round",
    "max_clients": "static client slots per round (0: automatic)",
    "local_steps": "local steps K per round (fedavg)",
    "local_rate": "Poisson rate of a client's local batches (1: the whole client)",
    "local_batch": "static local batch cap (0: automatic)",
    "local_optimizer": "sgd | adam",
    "local_lr": "local learning rate",
    "local_momentum": "local SGD momentum (0: none)",
    "server_optimizer": "sgd | momentum | adam",
    "server_lr": "server learning rate",
    "server_momentum": "server momentum (server_optimizer=momentum)",
    "client_clip": "L2 clip of a client's whole update (level=client)",
    "weighting": "examples | uniform | '' (uniform at client level, else examples)",
    "microbatch_size": "per-example gradients per microbatch inside a local step (0: all)",
    "client_group": "clients vectorized together; groups run in sequence (0: all in one vmap)",
    "log_every": "rounds between metrics records",
    "eval_every": "rounds between test evaluations",
    "checkpoint_every": "rounds between checkpoints",
}
PARTITIONS = ("iid", "dirichlet", "shards")


def _check(config) -> None:
    """One-line errors for unknown or bad ``config.federated`` keys, before any work."""
    f = config.federated
    unknown = sorted(set(f.keys()) - set(FEDERATED_KEYS))
    if unknown:
        raise ValueError(
            f"unknown key config.federated.{unknown[0]} (valid: {', '.join(FEDERATED_KEYS)})"
        )
    missing = sorted(set(FEDERATED_KEYS) - set(f.keys()))
    if missing:
        raise ValueError(f"config.federated.{missing[0]} is missing")
    if f.partition not in PARTITIONS:
        raise ValueError(
            f"config.federated.partition must be {'|'.join(PARTITIONS)}, got {f.partition!r}"
        )
    if f.level not in DP_LEVELS:
        raise ValueError(f"config.federated.level must be {'|'.join(DP_LEVELS)}, got {f.level!r}")
    for key in ("num_clients", "rounds", "local_steps", "log_every", "eval_every"):
        if not (isinstance(f[key], int) and f[key] >= 1):
            raise ValueError(f"config.federated.{key} must be an int >= 1, got {f[key]!r}")
    if not (isinstance(f.checkpoint_every, int) and f.checkpoint_every >= 1):
        raise ValueError(
            f"config.federated.checkpoint_every must be an int >= 1, got {f.checkpoint_every!r}"
        )
    if not (isinstance(f.client_group, int) and f.client_group >= 0):
        raise ValueError(
            "config.federated.client_group must be an int >= 0 (0: all clients in one vmap), "
            f"got {f.client_group!r}"
        )
    if f.partition == "dirichlet" and not f.alpha > 0:
        raise ValueError(f"config.federated.alpha must be > 0, got {f.alpha!r}")
    build.build_norm_strategy(config.dp)  # an unknown config.dp.norms fails here, before any file
    check_adaptive(config)
    build.build_augment(config)  # bad config.data.augmult / augment keys, likewise


def check_adaptive(config) -> bool:
    """Whether ``config.dp.adaptive_quantile`` turns on adaptive clipping of the client updates;
    one-line errors for what it lacks (`dpft.optim.check_adaptive` is the centralized trainer's).

    Supported at ``federated.level='client'`` only: the client clip norm starts at
    ``federated.client_clip`` and tracks the ``dp.adaptive_quantile`` quantile of the client
    update norms (step ``dp.adaptive_lr``, count noise ``dp.adaptive_count_noise``, checked
    against the noise multiplier by `_check_count_noise`). At example level each client runs
    local DP-SGD with the per-example clip ``dp.clip_norm``, which is not adapted.
    """
    dp, f = config.dp, config.federated
    if not optim.adaptive_quantile(dp):
        return False
    if f.level != "client":
        raise ValueError(
            "config.dp.adaptive_quantile > 0 (adaptive clipping of client updates) needs "
            f"config.federated.level='client', got {f.level!r}"
        )
    clip = float(f.client_clip)
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(
            "adaptive clipping starts at config.federated.client_clip, which must be finite and "
            f"> 0, got {f.client_clip!r}"
        )
    eta = float(dp.get("adaptive_lr", 0.2))
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"config.dp.adaptive_lr must be finite and >= 0, got {eta!r}")
    return True


def _check_count_noise(fc: FedConfig, clients, n_dev: int) -> None:
    """Refuses a count noise std ``sigma_b <= z / 2`` (one line naming the key).

    Privacy:
        The round's clipped sum and centred count share the accounted multiplier z
        (`dpft.privacy.adaptive.split_noise_multiplier`), defined only for ``sigma_b > z / 2``.
    """
    if not fc.adaptive_quantile:
        return
    plan = driver.make_plan(fc, [len(c) for c in clients], slot_multiple=n_dev)
    driver.adaptive_clip(fc, plan, "config.dp.adaptive_count_noise")


def fed_config(config) -> FedConfig:
    """The driver's `FedConfig` from ``config.federated`` and ``config.dp``.

    Privacy:
        ``dp.noise_multiplier < 0`` calibrates the noise so that the run's epsilon at
        ``federated.level`` is <= ``dp.epsilon`` at ``dp.delta`` after ``federated.rounds``.
    """
    f, dp = config.federated, config.dp
    z = float(dp.noise_multiplier)
    if f.level != "none" and z < 0 and not math.isfinite(dp.epsilon):
        raise ValueError("config.dp.noise_multiplier < 0 (calibrate) needs a finite dp.epsilon")
    return FedConfig(
        rounds=int(f.rounds),
        client_rate=float(f.client_rate),
        max_clients=int(f.max_clients) or None,
        algorithm=f.algorithm,
        local_steps=int(f.local_steps),
        local_rate=float(f.local_rate),
        local_batch=int(f.local_batch) or None,
        local_optimizer=f.local_optimizer,
        local_lr=float(f.local_lr),
        local_momentum=float(f.local_momentum) or None,
        server_optimizer=f.server_optimizer,
        server_lr=float(f.server_lr),
        server_momentum=float(f.server_momentum),
        weighting=f.weighting or None,
        dp=f.level,
        noise_multiplier=z,
        example_clip=float(dp.clip_norm),
        client_clip=float(f.client_clip),
        target_epsilon=float(dp.epsilon) if math.isfinite(dp.epsilon) else None,
        delta=float(dp.delta),
        accountant=dp.accountant,
        seed=int(config.seed),
        microbatch_size=int(f.microbatch_size) or None,
        client_group=int(f.client_group) or None,
        secure_noise=bool(config.dp.get("secure_noise", False)),
        adaptive_quantile=float(dp.get("adaptive_quantile", 0.0)),
        adaptive_lr=float(dp.get("adaptive_lr", 0.2)),
        adaptive_count_noise=float(dp.get("adaptive_count_noise", -1.0)),
    )


def split_clients(config, labels: np.ndarray) -> list[np.ndarray]:
    """The clients' index arrays into the training set (seeded by ``config.seed``)."""
    f = config.federated
    n = int(f.num_clients)
    if f.partition == "iid":
        return fed_partition.iid(labels, n, seed=config.seed)
    if f.partition == "dirichlet":
        return fed_partition.dirichlet(labels, n, alpha=float(f.alpha), seed=config.seed)
    return fed_partition.shards(labels, n, int(f.shards_per_client), seed=config.seed)


def _load(config):
    """(train arrays, eval arrays, num_classes, model, variables, phases), validated."""
    train, evaluation, num_classes = build.load_data(config)
    model, variables = build.build_model(config, num_classes, train["image"][0])
    phases = plan_phases(config, int(config.federated.rounds))
    return train, evaluation, num_classes, model, variables, phases


def prepare(config):
    """`_load` for callers that run one phase themselves (e.g. experiments): refuses lp_ft."""
    *loaded, phases = _load(config)
    if len(phases) != 1:
        raise ValueError(
            f"config.finetune.mode={config.finetune.mode!r} has {len(phases)} phases: run it "
            "with train_and_evaluate"
        )
    return (*loaded, phases[0])


def _check_budget(fc: FedConfig, clients) -> None:
    """Refuses a run whose given noise multiplier would exceed the target epsilon.

    Privacy:
        With ``noise_multiplier >= 0`` and a finite target, the planned rounds' epsilon (at
        the run's level, same accountant as the run) must be <= the target before any round.
    """
    if fc.dp == "none" or fc.noise_multiplier < 0 or fc.target_epsilon is None:
        return
    plan = driver.make_plan(fc, [len(c) for c in clients])
    entry = driver.round_entry(fc, plan)
    total = dataclasses.replace(entry, count=entry.count * fc.rounds)
    eps = accounting.compute_epsilon(total, fc.delta, fc.accountant)
    if eps > fc.target_epsilon:
        raise ValueError(
            f"config.dp.noise_multiplier={fc.noise_multiplier} gives epsilon {eps:.3f} > "
            f"config.dp.epsilon={fc.target_epsilon} after {fc.rounds} rounds"
        )


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
    """Runs the federated experiment ``config`` in ``workdir`` (resuming) -> summary dict."""
    t_start = time.time()
    workdir = pathlib.Path(workdir)
    _check(config)
    fc = fed_config(config)
    mesh = build.make_mesh(config.get("parallel", {}).get("data", 1))
    f = config.federated
    train, evaluation, num_classes, model, variables, phases = _load(config)
    clients = split_clients(config, train["label"])
    check_delta(fc, [len(c) for c in clients], "config.dp.delta")  # N: examples or clients
    _check_budget(fc, clients)
    n_dev = mesh.shape["data"] if mesh is not None else 1
    _check_count_noise(fc, clients, n_dev)
    configs = fed_phases.phase_configs(config, fc, phases, clients, n_dev)
    workdir_lib.claim_workdir(workdir, workdir_lib.config_json(config))  # inputs validated above
    dirs = fed_phases.phase_dirs(config, workdir, phases)
    last: dict = {}  # the latest eval's metrics and calibration
    start = fed_phases.rounds_done(dirs, phases)
    writer = report.MetricsWriter(workdir, resume_step=start, tensorboard=config.tensorboard)
    bar = report.progress_bar(fc.rounds, start, config.name or "dpft-federated")
    t_train = time.time()
    try:
        result, eval_fn, frozen, train = fed_phases.run(
            config,
            phases,
            configs,
            dirs,
            (train, evaluation, num_classes),
            model,
            variables,
            clients,
            workdir=workdir,
            make_eval=functools.partial(_make_eval, config.eval_batch_size, last),
            on_round=functools.partial(_report_round, writer, bar),
            eval_every=int(f.eval_every),
            checkpoint_every=int(f.checkpoint_every),
            mesh=mesh,
            log_every=int(f.log_every),
        )
    finally:
        bar.close()
        writer.close()
    train_seconds = time.time() - t_train
    if "calibration" not in last:  # resumed a finished run: evaluate the final model once
        eval_fn(result.params, frozen)
    summary = {
        **last["metrics"],  # the last round's eval
        **_summary(config, fc, phases, result),
        "num_train_examples": len(train["label"]),
        "wall_seconds": time.time() - t_start,
        "train_seconds": train_seconds,
    }
    title = f"{config.name} ({fc.dp}-level): eps={result.epsilon:.2f}, delta={fc.delta:g}"
    plots = config.get("plots", True)
    return report.finish_run(workdir, summary, last["calibration"], title, plots)


def _make_eval(batch_size: int, last: dict, model, evaluation):
    """A phase's ``eval_fn(params, frozen)``, keeping its latest metrics and calibration in
    ``last`` (cleared: a new phase has its own last eval)."""
    eval_step = jax.jit(make_eval_step(model.apply))
    last.clear()

    def eval_fn(p, fr):
        last["metrics"], last["calibration"] = central.evaluate(
            eval_step, p, fr, evaluation, batch_size, details=True
        )
        return last["metrics"]

    return eval_fn


def _report_round(writer, bar, record, state) -> None:
    """Moves the progress bar; at a log or eval point writes the round's metrics."""
    bar.update(1)
    r = record["round"]
    if "epsilon" in record:  # a log or eval point (the runner computed epsilon)
        out = {k: v for k, v in record.items() if k != "round"}
        if out["epsilon"] is None:
            out["epsilon"] = math.inf
        writer.write(r, out)
        bar.set_postfix(
            eps=f"{out['epsilon']:.3f}",
            loss=f"{record.get('debug/train_loss', math.nan):.3f}",
            acc=f"{record.get('test_accuracy', math.nan):.3f}",
        )


def _summary(config, fc: FedConfig, phases, result) -> dict:
    """The privacy and plan entries of summary.json."""
    plan, f = result.plan, config.federated
    return {
        "epsilon": result.epsilon,
        "delta": fc.delta,
        "dp_level": fc.dp,
        "eval_data": workdir_lib.eval_data_description(config),
        "accountant": fc.accountant,
        "target_epsilon": fc.target_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "steps": int(result.state.round),
        "rounds": int(result.state.round),
        "ledger_steps": result.ledger.steps,
        "finetune_mode": config.finetune.mode or phases[0].name,
        "lp_rounds": sum(p.steps for p in phases if p.name == "lp"),
        "num_clients": plan.num_clients,
        "client_slots": plan.slots,
        "local_batch": plan.local_batch,
        "local_steps": plan.local_steps,
        "partition": f.partition,
        **_adaptive_summary(fc, plan, result.state),
    }


def _adaptive_summary(fc: FedConfig, plan, state) -> dict:
    """With adaptive clipping: its settings and the clip norm after the last round."""
    hyper = driver.adaptive_clip(fc, plan)
    if hyper is None:
        return {}
    return {
        "adaptive_quantile": hyper["target_quantile"],
        "adaptive_lr": hyper["learning_rate"],
        "adaptive_count_noise": hyper["count_noise"],
        "final_clip_norm": float(state.clip.clip_norm),
    }


__all__ = ["FEDERATED_KEYS", "check_adaptive", "fed_config", "split_clients", "train_and_evaluate"]
