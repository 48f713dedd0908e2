"""``run(...)``: R federated rounds with eval callbacks, per-round checkpoints and exact resume.

`run` takes its inputs as arguments, `run_spec` as one `RunSpec`: set-up (plan, compiled round
function, initial state), resume from the workdir's checkpoint, then one round at a time
(ledger, round, metrics, eval, checkpoint).

The checkpoint of round ``r`` holds the global parameters, the server optimizer state, the
round number, with adaptive clipping (``config.adaptive_quantile > 0``) the clip state
(`dpft.privacy.adaptive.AdaptiveClipState` in ``ServerState.clip``, started at
``config.client_clip``), the privacy ledger of every round it reflects and the history so far
(with adaptive clipping each record holds the round's ``clip_norm`` and its noisy
``unclipped_fraction``, DP outputs). Client
sampling, local batches and every key are pure functions of ``(seed, round, client)``, so a run
resumed from its workdir recomputes exactly what the uninterrupted run computes. A later phase
of a multi-phase run (`dpft.federated.phases`) runs global rounds ``[start_round, rounds)`` on
the ledger of the phases before it.

With ``config.secure_noise`` the seed is a 64-bit secret (`dpft.privacy.keys.run_seed`): a
fresh run draws it and writes it with a checkpoint of its first round number before any round
runs; every checkpoint's metadata holds it (``secure_seed``), and a resumed run takes it from
there. It is never put in the history or the result.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpft.federated import driver
from dpft.federated import server as srv
from dpft.privacy import adaptive, clipping, keys
from dpft.privacy.accounting import PrivacyLedger
from dpft.train.checkpoint import Checkpointer

__all__ = ["RunResult", "RunSpec", "run", "run_spec"]


@dataclasses.dataclass
class RunResult:
    params: Any  # final global trainable parameters
    state: srv.ServerState
    history: list[dict]  # one record per round
    ledger: PrivacyLedger
    epsilon: float  # at config.delta and config.dp's level (inf without DP)
    plan: driver.FedPlan


@functools.lru_cache(maxsize=8)
def _compiled_round(loss_fn, config, plan, server_tx_args, clipper, mesh=None, norms=None):
    """One jitted round function per (loss, config without rounds, plan, clipper, mesh, norm
    strategy): a resumed or extended run in the same process reuses its compilation."""
    server_tx = srv.make_server_optimizer(*server_tx_args)
    round_fn = driver.make_round(
        loss_fn,
        config,
        plan,
        server_tx,
        clipper,
        mesh=mesh,
        norm_strategy=norms,
        adaptive_clip=driver.adaptive_clip(config, plan),
    )
    return server_tx, round_fn


def _identity(config: driver.FedConfig, plan: driver.FedPlan) -> dict:
    """What a checkpoint must match to be resumed (everything but the number of rounds)."""
    d = dataclasses.asdict(config)
    d.pop("rounds")
    d.pop("client_group")  # how clients are batched, not what the run computes
    if not d["secure_noise"]:  # off: the identity of checkpoints written before the option
        d.pop("secure_noise")
    if not d["adaptive_quantile"]:  # likewise for adaptive clipping
        for key in ("adaptive_quantile", "adaptive_lr", "adaptive_count_noise"):
            d.pop(key)
    d["client_sizes"] = list(plan.client_sizes)
    d["noise_multiplier_used"] = plan.noise_multiplier
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _epsilon(ledger: PrivacyLedger, config: driver.FedConfig, cache: dict) -> float:
    """Epsilon of the ledger (PLD takes a second or so: memoized on the ledger's content)."""
    if config.dp == "none":
        return math.inf
    key = repr(ledger.to_dict())
    if key not in cache:
        cache[key] = ledger.epsilon(config.delta, config.accountant)
    return cache[key]


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The inputs of one federated run (`run`'s arguments, described there)."""

    config: driver.FedConfig
    loss_fn: Callable
    params: dict
    frozen: dict
    dataset: dict[str, np.ndarray]
    clients: Sequence[np.ndarray]
    workdir: str | pathlib.Path | None = None
    eval_fn: Callable[[dict, dict], dict] | None = None
    eval_every: int = 1
    checkpoint_every: int = 1
    clipper: clipping.Clipper | None = None
    norm_strategy: clipping.NormStrategy | None = None
    mesh: jax.sharding.Mesh | None = None
    log_every: int | None = None
    on_round: Callable[[dict, srv.ServerState], None] | None = None
    start_round: int = 0
    ledger: PrivacyLedger | None = None


@dataclasses.dataclass
class _Rounds:
    """A run's state between rounds (`run_spec`)."""

    spec: RunSpec
    plan: driver.FedPlan
    round_fn: Callable
    entry: Any  # the ledger entry of one round (None without DP)
    identity: dict  # what a checkpoint must match to be resumed
    state: srv.ServerState
    frozen: dict
    ledger: PrivacyLedger
    ckpt: Checkpointer | None
    history: list = dataclasses.field(default_factory=list)
    start: int = 0  # the first round to run
    latest: int | None = None  # the checkpoint resumed from
    seed: int = 0
    eps_cache: dict = dataclasses.field(default_factory=dict)


def run(config, loss_fn, params, frozen, dataset, clients, **options) -> RunResult:
    """Runs ``config.rounds`` rounds of FedAvg/FedSGD from ``params`` (resuming from workdir).

    ``options`` are the keyword fields of `RunSpec` (workdir, eval_fn, ...); `run_spec` runs it.

    Args:
      config: the `dpft.federated.driver.FedConfig` of the run.
      loss_fn: per-example ``loss(params, frozen, example, rng) -> (loss, aux)`` with
        ``aux['correct']``, e.g. `dpft.train.step.cross_entropy_loss(model.apply)`.
      params, frozen: ``dpft.train.step.partition(variables, patterns)``: only ``params`` are
        trained (by every client) and aggregated; ``frozen`` is shared and never changes.
      dataset: host arrays with a common leading axis (e.g. image, label).
      clients: index arrays into ``dataset`` (see `dpft.federated.partition`).
      workdir: if given, a checkpoint is written every ``checkpoint_every`` rounds and at the
        end, and a run with an existing checkpoint resumes from it (its config must match,
        except ``rounds``, so a run may be extended).
      eval_fn: ``eval_fn(params, frozen) -> dict`` of floats, run every ``eval_every`` rounds
        and after the last round; merged into that round's history record.
      clipper, norm_strategy: the clients' per-example clipping rule and how its norms and
        clipped sums are computed (see `dpft.federated.driver.make_local_update`).
      mesh: a device mesh with a 'data' axis: client slots are sharded over it (the slots are
        rounded up to a multiple of its size; padding slots hold no client).
      log_every: epsilon is computed every ``log_every`` rounds (default ``eval_every``), at
        every eval point and after the last round.
      on_round: ``on_round(record, state)`` after each round (and its checkpoint), e.g. to
        write metrics or move a progress bar.
      start_round: the global number of the first round (a later phase of a multi-phase run
        runs rounds ``[start_round, config.rounds)``): client sampling, local batches, keys and
        checkpoint numbers are those of the global rounds, so no two phases share a key.
      ledger: the privacy ledger of the rounds before ``start_round`` (earlier phases); the
        run's epsilon composes them with its own rounds. Ignored when resuming from workdir
        (the checkpoint's ledger already holds them).

    With ``config.secure_noise`` the run's seed is a fresh 64-bit secret, or the one saved in
    the checkpoint it resumes from; a fresh run with a workdir checkpoints round
    ``start_round`` (the initial state and the secret) before the first round.

    Returns:
      `RunResult`: history records hold ``round``, the ``debug/`` train metrics, ``epsilon``
      (at eval points; None when infinite) and the eval metrics.

    Privacy:
        'example': every example of every client is protected under add/remove-one example
        within its client's dataset, with the epsilon of `dpft.federated.accounting`
        (rounds * K local DP-SGD steps at rate q_local). 'client': every client's whole dataset
        is protected under add/remove-one client (rounds subsampled Gaussian steps at rate
        q_c, sensitivity S). The ledger records each round before it runs. ``debug/``
        metrics and eval metrics on private data are not private. In secure mode the noise
        and the sampling cannot be regenerated from the config; the checkpoints can (they
        hold the secret) and must be protected like the data.
    """
    return run_spec(RunSpec(config, loss_fn, params, frozen, dataset, clients, **options))


def run_spec(spec: RunSpec) -> RunResult:
    """`run` of ``spec``: set-up (`_prepare`), resume (`_resume`), then one `_round` per round."""
    config = spec.config
    rs = _prepare(spec)
    _resume(rs)
    try:
        if config.secure_noise and rs.ckpt is not None and rs.latest is None:
            _save(rs, rs.start)  # the secret is persisted before anything is computed from it
        for r in range(rs.start, config.rounds):
            record = _round(rs, r)
            if rs.ckpt is not None and (
                r + 1 == config.rounds or (r + 1) % spec.checkpoint_every == 0
            ):
                _save(rs, r + 1)
            if spec.on_round is not None:
                spec.on_round(record, rs.state)
    finally:
        if rs.ckpt is not None:
            rs.ckpt.close()
    epsilon = _epsilon(rs.ledger, config, rs.eps_cache)
    return RunResult(rs.state.params, rs.state, rs.history, rs.ledger, epsilon, rs.plan)


def _prepare(spec: RunSpec) -> _Rounds:
    """The plan, the compiled round function and the initial state of a run of ``spec``."""
    config, mesh = spec.config, spec.mesh
    n_dev = mesh.shape["data"] if mesh is not None else 1
    plan = driver.make_plan(config, [len(c) for c in spec.clients], slot_multiple=n_dev)
    tx_args = (config.server_optimizer, config.server_lr, config.server_momentum)
    base = dataclasses.replace(config, rounds=0, seed=0, secure_noise=False)  # seed: an input
    compile_args = (spec.loss_fn, base, plan, tx_args, spec.clipper, mesh, spec.norm_strategy)
    try:
        server_tx, round_fn = _compiled_round(*compile_args)
    except TypeError:  # an unhashable clipper or loss: build without the cache
        server_tx, round_fn = _compiled_round.__wrapped__(*compile_args)
    params = jax.tree_util.tree_map(jnp.asarray, spec.params)
    if not 0 <= spec.start_round <= config.rounds:
        raise ValueError(f"start_round={spec.start_round} is not in [0, {config.rounds}]")
    round0 = jnp.asarray(spec.start_round, jnp.int32)
    clip = adaptive.init_state(config.client_clip) if config.adaptive_quantile else None
    state = srv.ServerState(round0, params, server_tx.init(params), clip)
    entry = driver.round_entry(config, plan)
    given = spec.ledger
    ledger = PrivacyLedger.from_dict(given.to_dict()) if given is not None else PrivacyLedger()
    ckpt = Checkpointer(spec.workdir) if spec.workdir is not None else None
    identity = _identity(config, plan)
    return _Rounds(
        spec,
        plan,
        round_fn,
        entry,
        identity,
        state,
        spec.frozen,
        ledger,
        ckpt,
        start=spec.start_round,
    )


def _resume(rs: _Rounds) -> None:
    """Restores the latest checkpoint of the workdir (if any), then fixes the run's seed and
    places the state on the mesh."""
    config, workdir = rs.spec.config, rs.spec.workdir
    rs.latest = latest = rs.ckpt.latest_step() if rs.ckpt is not None else None
    saved = None
    if latest is not None:
        state, meta = rs.ckpt.restore(latest, rs.state)
        if meta["identity"] != rs.identity:
            raise ValueError(f"checkpoint {latest} in {workdir} is of another federated config")
        if config.secure_noise and meta.get("secure_seed") is None:
            raise ValueError(f"checkpoint {latest} in {workdir} holds no secure_seed to resume")
        saved = meta.get("secure_seed")
        rs.ledger = PrivacyLedger.from_dict(meta["ledger"])
        rs.history = list(meta["history"])
        rs.start = int(meta["round"])
        rs.state = jax.tree_util.tree_map(jnp.asarray, state)
    rs.seed = keys.run_seed(config.seed, config.secure_noise, saved)
    if rs.spec.mesh is not None:  # parameters and server state replicated, client slots sharded
        replicated = NamedSharding(rs.spec.mesh, P())
        rs.state, rs.frozen = jax.device_put((rs.state, rs.frozen), replicated)


def _save(rs: _Rounds, r: int) -> None:
    meta = {
        "round": r,
        "ledger": rs.ledger.to_dict(),
        "history": rs.history,
        "identity": rs.identity,
    }
    if rs.spec.config.secure_noise:  # the secret: needed to resume exactly; protect the checkpoints
        meta["secure_seed"] = rs.seed
    rs.ckpt.save(r, rs.state, meta)


def _round(rs: _Rounds, r: int) -> dict:
    """Round ``r`` (recorded in the ledger before it runs) -> its history record."""
    spec = rs.spec
    config, mesh = spec.config, spec.mesh
    inputs = driver.round_inputs(config, rs.plan, spec.dataset, spec.clients, r, rs.seed)
    if mesh is not None:  # client slots sharded, the root key replicated
        root = jax.device_put(inputs.seed, NamedSharding(mesh, P()))
        inputs = jax.device_put(inputs._replace(seed=None), NamedSharding(mesh, P("data")))
        inputs = inputs._replace(seed=root)
    if rs.entry is not None:
        rs.ledger.record(rs.entry)  # spent before the round's release
    rs.state, metrics = rs.round_fn(rs.state, rs.frozen, inputs)
    record: dict[str, Any] = {"round": r + 1}
    record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
    is_eval = r + 1 == config.rounds or (r + 1) % spec.eval_every == 0
    if is_eval or (r + 1) % (spec.log_every or spec.eval_every) == 0:
        record["epsilon"] = _json_float(_epsilon(rs.ledger, config, rs.eps_cache))
    if is_eval and spec.eval_fn is not None:
        record.update({k: float(v) for k, v in spec.eval_fn(rs.state.params, rs.frozen).items()})
    rs.history.append(record)
    return record
