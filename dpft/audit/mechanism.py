"""The audited mechanism: DP-SGD through dpft's real code paths, fed white-box canary gradients.

The model and the training set (`dpft.audit.models`) let the auditor inject any per-example
gradient, while every privacy-relevant operation (per-example clipping with `clipped_grad` +
`FlatClip`, Gaussian noise with `gaussian_privatizer`, division by the expected batch size,
SGD, the samplers) is dpft's own code, run through `make_train_step` and `dp_sgd` exactly as in
training.

Canary designs. Poisson and full batches (add/remove-one neighbouring): canary ``i`` is in the
training set with probability 1/2 (secret bit ``S_i``). Shuffled fixed-size batches
(``sampling='shuffle'``, replace-one neighbouring, a public dataset size N): every canary slot
is present and holds ``S_i`` times the canary, so flipping ``S_i`` replaces one example by
another and moves the clipped sum by 2C, the replace-one sensitivity.

Scores. Canary ``i``'s coordinate moves by ``-lr * (C * [i sampled] + noise) / B`` per step
(``S_i C`` for the swap design), so the default score is the total movement
``sum_t -update_t[i] = -(w_T[i] - w_0[i])``.

Broken variants (``BROKEN``, one component swapped, dpft untouched) are listed in
`dpft.audit.broken`, which holds the pieces they need beyond a changed argument;
`build_mechanism` and the accounting below select them. The run's settings are `dpft.audit.config`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dpft.audit.bounds import GuessBound, best_lower_bound
from dpft.audit.broken import DropFromNorms, _realized_batch_step, _unhalved_shuffle_epsilon
from dpft.audit.config import BROKEN, NORMS, SAMPLINGS, SCORERS, AuditConfig, check_choice
from dpft.audit.models import _loss, _make_data, _model
from dpft.optim import dp_sgd
from dpft.privacy import keys
from dpft.privacy.accounting import (
    GaussianSteps,
    calibrate_noise_multiplier,
    compute_epsilon,
)
from dpft.privacy.clipping import FlatClip
from dpft.privacy.ghost import GhostNorms
from dpft.privacy.sampling import PoissonSampler, ShuffleSampler
from dpft.train.step import TrainState, make_train_step

__all__ = [
    "BROKEN",
    "NORMS",
    "SAMPLINGS",
    "SCORERS",
    "AuditConfig",
    "AuditResult",
    "build_mechanism",
    "run_audit",
    "calibrate",
]


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of `run_audit`: claimed epsilon, the empirical lower bound and the settings.

    ``actual_epsilon`` is dpft's accountant's epsilon for the mechanism that actually ran, for
    the controls whose bug is in the accounting ('shuffle_sigma', 'truncation'); None
    otherwise.
    """

    config: AuditConfig
    claimed_epsilon: float  # what the (possibly broken) accounting reports
    noise_multiplier: float  # the multiplier the claim is computed for
    noise_multiplier_used: float  # what the (possibly broken) run actually used
    bound: GuessBound
    scorer: str
    actual_epsilon: float | None = None

    @property
    def lower_bound(self) -> float:
        return self.bound.epsilon


# ------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------


def calibrate(eps_of, target: float, rtol: float = 1e-3) -> float:
    """Smallest sigma (to relative ``rtol``) with ``eps_of(sigma) <= target`` (eps decreasing)."""
    hi = 1.0
    while eps_of(hi) > target:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier <= 1e6 reaches epsilon {target}")
    lo = hi / 2
    while eps_of(lo) <= target:
        hi, lo = lo, lo / 2
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps_of(mid) <= target else (mid, hi)
    return hi


def _claimed_epsilon(cfg: AuditConfig, sigma: float) -> float:
    """Epsilon of the (possibly broken) accounting at ``sigma``."""
    if cfg.broken == "shuffle_sigma":
        return _unhalved_shuffle_epsilon(cfg, sigma)
    entry = GaussianSteps(sigma, cfg.accounted_rate, cfg.steps, **cfg.accounting_kwargs())
    return compute_epsilon(entry, cfg.delta)


def _actual_epsilon(cfg: AuditConfig, sigma: float) -> float | None:
    """dpft's accountant on what actually ran, for the accounting controls (else None)."""
    if cfg.broken not in ("shuffle_sigma", "truncation"):
        return None
    kwargs = cfg.accounting_kwargs(claimed=False)
    return compute_epsilon(GaussianSteps(sigma, cfg.accounted_rate, cfg.steps, **kwargs), cfg.delta)


def _noise_multiplier(cfg: AuditConfig) -> tuple[float, float]:
    """(sigma, claimed epsilon): calibrated to the claim, or the given sigma and its epsilon."""
    if cfg.noise_multiplier is not None:
        sigma = float(cfg.noise_multiplier)
        return sigma, _claimed_epsilon(cfg, sigma)
    if cfg.broken == "shuffle_sigma":
        return calibrate(lambda s: _unhalved_shuffle_epsilon(cfg, s), cfg.epsilon), cfg.epsilon
    sigma = calibrate_noise_multiplier(
        cfg.epsilon, cfg.delta, cfg.accounted_rate, cfg.steps, **cfg.accounting_kwargs()
    )
    return sigma, cfg.epsilon


# ------------------------------------------------------------------------------------------
# Mechanism, scores and the run
# ------------------------------------------------------------------------------------------


def _norm_strategy(broken: str, norms: str):
    if broken == "ghost_drop_bias":
        return DropFromNorms(GhostNorms(allow_fallback=False), "bias")
    if norms == "ghost":
        return GhostNorms(allow_fallback=False)  # every leaf through the ghost computation
    return None  # VmapNorms


def build_mechanism(
    broken: str,
    noise_multiplier: float,
    clip_norm: float,
    learning_rate: float,
    expected_batch_size: float,
    key: jax.Array,
    *,
    norms: str = "vmap",
    loss_fn=None,
):
    """``(init, step)`` of DP-SGD on a white-box model, correct or with one bug.

    The correct mechanism is dpft's own: `make_train_step` (per-example `clipped_grad` with
    `FlatClip(clip_norm)`, norms by `VmapNorms` or, with ``norms='ghost'``, `GhostNorms`) and
    `dp_sgd` (`gaussian_privatizer` with std ``noise_multiplier * clip_norm``, division by the
    public ``expected_batch_size``, SGD). ``broken`` swaps one component (see
    `dpft.audit.broken`); ``noise_multiplier`` is the one the claim is computed for, and the
    'noise' variant drops it. 'shuffle_sigma' and 'truncation' are accounting bugs: the
    mechanism is the correct one. ``loss_fn`` defaults to the linear model; ``norms='ghost'``
    needs a flax model's loss (see `models._model`): `GhostNorms(allow_fallback=False)` refuses
    a leaf that no Dense/Conv layer owns.
    """
    check_choice("broken", broken, BROKEN)
    check_choice("norms", norms, NORMS)
    loss_fn = _loss if loss_fn is None else loss_fn
    sigma = 0.0 if broken == "noise" else noise_multiplier
    clipper = FlatClip(math.inf) if broken == "clip" else FlatClip(clip_norm)
    strategy = _norm_strategy(broken, norms)
    if broken == "realized_batch":
        return _realized_batch_step(
            clipper, sigma, clip_norm, learning_rate, key, loss_fn, strategy
        )
    tx = dp_sgd(
        learning_rate,
        noise_multiplier=sigma,
        l2_sensitivity=clip_norm,  # the clip norm the noise is calibrated to, also for 'clip'
        expected_batch_size=expected_batch_size,
        key=key,
    )
    return tx.init, make_train_step(loss_fn, clipper, tx, norm_strategy=strategy)


def _scores(cfg: AuditConfig, deltas: np.ndarray, free_std: np.ndarray, sigma: float, scorer):
    """Canary scores from per-step canary-coordinate updates ``deltas [T, m]``.

    'sum': ``-sum_t deltas[t]`` (equivalently minus the final canary coordinate): a canary that
    was in the batch pushed its coordinate by -lr * C / B per step.

    'count_weighted' (for the realised-batch bug): an auditor who sees the iterates reads the
    realised batch size from the noise scale of the untouched coordinates,
    ``|B_t| ~= lr * sigma * C / std(free update)``, undoes the division, and weights step t by
    the estimated number of canaries in the batch, ``|B_t| - q * num_real``: steps that
    (probably) held no canary carry only noise and get weight ~0.
    """
    lr, c = cfg.learning_rate, cfg.clip_norm
    if scorer == "sum":
        return -deltas.sum(axis=0)
    if sigma <= 0:
        raise ValueError("the count_weighted scorer needs noise to read the batch size")
    size = lr * sigma * c / np.maximum(free_std, 1e-30)  # [T] estimated realised batch sizes
    undone = -deltas * size[:, None] / lr  # C * [i sampled] + N(0, (sigma C)^2)
    weight = np.maximum(np.round(size) - cfg.sampling_rate * cfg.num_real, 0.0)
    return (weight[:, None] * undone).sum(axis=0)


def run_audit(cfg: AuditConfig) -> AuditResult:
    """Runs T steps of the (possibly broken) DP-SGD mechanism once and audits it.

    Steps: draw the secret bits and build the training set; calibrate the noise multiplier to
    the claimed (epsilon, delta) with dpft's accountant (or the broken accounting); train with
    Poisson, full or shuffled batches; score every canary; guess "in" (+1) for the k highest
    and "out" (-1) for the k lowest scores over a grid of k; convert the best (guesses,
    correct) pair into a lower bound on epsilon with `best_lower_bound` (beta split over the
    grid). Keys: ``keys.root_key(seed)``, then the "audit" purpose, then "noise" for the
    privatizer and "examples" (with the step) for the per-example keys.

    Reasoning:
        If the implementation is correct, it is (claimed_epsilon, delta)-DP with respect to
        each secret bit (add/remove-one of a canary, or for shuffled batches replace-one of
        +canary by -canary), so with probability >= 1 - beta the returned lower bound is
        <= claimed_epsilon. A lower bound above the claim is statistical evidence (at
        confidence 1 - beta) of a privacy bug.
    """
    rng = np.random.default_rng([cfg.seed, 0xA0D17])
    secrets, data, n = _make_data(cfg, rng)
    sigma, claimed = _noise_multiplier(cfg)

    root = keys.derive(keys.root_key(cfg.seed), "audit")
    sigma_used = 0.0 if cfg.broken == "noise" else sigma
    d = data["g"].shape[1]
    params, loss_fn, view = _model(cfg.norms, d)
    init, step = build_mechanism(
        cfg.broken,
        sigma,
        cfg.clip_norm,
        cfg.learning_rate,
        cfg.expected_batch_size,
        keys.derive(root, "noise"),
        norms=cfg.norms,
        loss_fn=loss_fn,
    )

    lo, hi = cfg.real_dim, cfg.real_dim + cfg.canaries
    state = TrainState(jnp.zeros([], jnp.int32), params, init(params), {})

    @jax.jit
    def train_step(state, batch, t):
        new, _ = step(state, batch, keys.derive(root, "examples", t))
        delta_w = view(new.params) - view(state.params)
        return new, delta_w[lo:hi], jnp.std(delta_w[hi:])

    if cfg.shuffle:
        sampler = ShuffleSampler(n, cfg.batch_size, seed=int(rng.integers(2**31)))
    elif cfg.full_batch:
        sampler = None
        full_mask = (np.arange(cfg.max_examples) < n).astype(np.float32)
    else:
        sampler = PoissonSampler(
            n, cfg.sampling_rate, seed=int(rng.integers(2**31)), max_batch_size=cfg.batch_size
        )
    data_j = {k: jnp.asarray(v) for k, v in data.items()}
    deltas, free_std = [], []
    for t in range(cfg.steps):
        if sampler is None:
            batch = {**data_j, "mask": jnp.asarray(full_mask)}
        else:
            b = sampler.batch_at(t)
            idx = jnp.asarray(b.indices)
            batch = {k: v[idx] for k, v in data_j.items()}
            batch["mask"] = jnp.asarray(b.mask, jnp.float32)
        state, dw, fs = train_step(state, batch, jnp.uint32(t))
        deltas.append(dw)
        free_std.append(fs)
    deltas = np.asarray(jnp.stack(deltas), np.float64)
    free_std = np.asarray(jnp.stack(free_std), np.float64)

    scorer = cfg.scorer
    if scorer == "auto":
        scorer = "count_weighted" if cfg.broken == "realized_batch" else "sum"
    scores = _scores(cfg, deltas, free_std, sigma_used, scorer)
    bound = best_lower_bound(scores, secrets, cfg.delta, cfg.beta)
    actual = _actual_epsilon(cfg, sigma)
    return AuditResult(cfg, float(claimed), float(sigma), float(sigma_used), bound, scorer, actual)
