"""The audited mechanism: DP-SGD through dpft's real code paths, fed white-box canary gradients.

Model. The "model" is one parameter vector ``w`` of size ``d = real_dim + m + free_dim`` and the
per-example loss is ``<w, example['g']>``, so each example's gradient IS the vector it carries.
That lets the auditor inject any per-example gradient while every privacy-relevant operation
(per-example clipping with `clipped_grad` + `FlatClip`, Gaussian noise with
`gaussian_privatizer`, division by the expected batch size, SGD) is dpft's own code, run through
`make_train_step` and `dp_sgd` exactly as in training.

* real examples: random gradients in the first ``real_dim`` coordinates, norms around C;
* canary ``i``: a dirac ``canary_scale * C * e_{real_dim + i}`` (clipped to exactly C), included
  in the training set with probability 1/2 (secret bit ``S_i``);
* ``free_dim`` coordinates no example touches: they hold pure noise, which is what an auditor
  that sees the iterates can use to read the per-step noise scale.

Scores. Canary ``i``'s coordinate moves by ``-lr * (C * [i sampled] + noise) / B`` per step, so the
default score is the total movement ``sum_t -update_t[i] = -(w_T[i] - w_0[i])``.

Broken variants (one component swapped, dpft untouched):

* ``noise``: noise multiplier 0, while the claimed epsilon is kept;
* ``clip``: clipping off (``FlatClip(inf)``) while the noise is still calibrated to C, so a canary
  moves its coordinate by 100 C per step;
* ``realized_batch``: the noisy sum is divided by the realised batch size instead of the public
  expected one (a custom step: dp_chain's normaliser cannot see the batch).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft.audit.bounds import GuessBound, best_lower_bound
from dpft.optim import dp_sgd
from dpft.privacy.accounting import (
    GaussianSteps,
    calibrate_noise_multiplier,
    compute_epsilon,
)
from dpft.privacy.clipping import FlatClip, clipped_grad
from dpft.privacy.noise import gaussian_privatizer
from dpft.privacy.sampling import PoissonSampler, poisson_batch_cap
from dpft.train.step import TrainState, make_train_step

__all__ = ["BROKEN", "SCORERS", "AuditConfig", "AuditResult", "build_mechanism", "run_audit"]

BROKEN = ("none", "noise", "clip", "realized_batch")
SCORERS = ("auto", "sum", "count_weighted")


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """Settings of one audit run.

    Attributes:
      epsilon, delta: the claimed guarantee; the noise multiplier is calibrated to it with
        dpft's accountant (PLD) unless ``noise_multiplier`` is given.
      canaries: m, the number of canaries (each included with probability 1/2).
      steps: T, DP-SGD steps.
      sampling_rate: Poisson rate q; 1.0 means full batch (every example, every step).
      num_real: real (non-canary) examples.
      broken: 'none' (the correct mechanism) or a broken variant: 'noise', 'clip',
        'realized_batch'.
      scorer: 'sum' (total movement), 'count_weighted' (per-step movement weighted by the
        estimated number of canaries in the batch; see `_scores`), or 'auto' (count_weighted
        for realized_batch, sum otherwise). Fixed before the run, so no union bound is needed.
      beta: 1 - confidence of the reported lower bound (split over the guess grid).
    """

    epsilon: float = 2.0
    delta: float = 1e-5
    canaries: int = 1000
    steps: int = 10
    sampling_rate: float = 1.0
    num_real: int = 100
    real_dim: int = 16
    free_dim: int = 256
    clip_norm: float = 1.0
    canary_scale: float = 100.0
    learning_rate: float = 1.0
    broken: str = "none"
    scorer: str = "auto"
    seed: int = 0
    beta: float = 0.05
    noise_multiplier: float | None = None

    def __post_init__(self):
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be a finite number > 0, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        for name in ("canaries", "steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.canaries < 2:
            raise ValueError(f"canaries must be >= 2, got {self.canaries}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        if not (isinstance(self.num_real, int) and self.num_real >= 0):
            raise ValueError(f"num_real must be an int >= 0, got {self.num_real!r}")
        if self.broken not in BROKEN:
            raise ValueError(f"broken must be one of {BROKEN}, got {self.broken!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if not 0 < self.beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {self.beta!r}")
        if self.clip_norm <= 0 or self.canary_scale <= 0 or self.learning_rate <= 0:
            raise ValueError("clip_norm, canary_scale and learning_rate must be > 0")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")

    @property
    def full_batch(self) -> bool:
        return self.sampling_rate == 1.0

    @property
    def max_examples(self) -> int:
        """Dataset size if every canary were included (fixes static shapes and the cap)."""
        return self.num_real + self.canaries

    @property
    def expected_batch_size(self) -> float:
        """Public normaliser q * (num_real + m/2): it does not depend on the secret bits."""
        return self.sampling_rate * (self.num_real + self.canaries / 2)

    def accounting_kwargs(self) -> dict:
        """`GaussianSteps` keyword arguments describing this run's sampling."""
        if self.full_batch:
            return {"sampling": "full"}
        cap = poisson_batch_cap(self.max_examples, self.sampling_rate)
        # With fewer examples than max_examples the true overflow probability is only smaller.
        return {"sampling": "poisson", "dataset_size": self.max_examples, "max_batch_size": cap}


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of `run_audit`: claimed epsilon, the empirical lower bound and the settings."""

    config: AuditConfig
    claimed_epsilon: float  # what the accountant reports for the configured mechanism
    noise_multiplier: float  # the multiplier the claim is computed for
    noise_multiplier_used: float  # what the (possibly broken) run actually used
    bound: GuessBound
    scorer: str

    @property
    def lower_bound(self) -> float:
        return self.bound.epsilon


def _make_data(cfg: AuditConfig, rng: np.random.Generator):
    """Secret bits and the training set's per-example gradients, padded to max_examples rows."""
    m, c = cfg.canaries, cfg.clip_norm
    d = cfg.real_dim + m + cfg.free_dim
    secrets = rng.choice(np.array([-1, 1]), size=m)
    real = rng.normal(size=(cfg.num_real, cfg.real_dim))
    real *= (c * rng.uniform(0.5, 2.0, size=(cfg.num_real, 1))) / np.maximum(
        np.linalg.norm(real, axis=1, keepdims=True), 1e-12
    )
    data = np.zeros((cfg.max_examples, d), np.float32)
    data[: cfg.num_real, : cfg.real_dim] = real
    included = np.flatnonzero(secrets > 0)
    rows = cfg.num_real + np.arange(included.size)
    data[rows, cfg.real_dim + included] = cfg.canary_scale * c
    n = cfg.num_real + included.size
    return secrets, data, n


def _loss(params, frozen, example, rng):
    """Linear per-example loss <w, g>: its gradient with respect to w is exactly g."""
    del frozen, rng
    return jnp.vdot(params["w"], example["g"]), {"correct": jnp.zeros((), jnp.float32)}


def _realized_batch_step(clipper, sigma, sensitivity, lr, key):
    """BROKEN step: like `make_train_step` + `dp_sgd`, but divides by the realised batch size.

    Returns ``(init, step)``. The noise is still calibrated for sensitivity C on the sum, but
    the normaliser ``1 / |B_t|`` is a function of the private batch: it leaks how many examples
    were sampled, and with it membership (the sum's sensitivity after division is no longer
    C / (qN) but depends on |B_t|).
    """
    priv = gaussian_privatizer(sigma, sensitivity, key)
    base = optax.sgd(lr)

    def per_example(params, example, rng):
        return _loss(params, {}, example, rng)

    grad_fn = clipped_grad(per_example, clipper)

    def init(params):
        return (priv.init(params), base.init(params))

    def step(state: TrainState, batch: dict, rng):
        mask = batch["mask"]
        out = grad_fn(state.params, {"g": batch["g"]}, mask, rng)
        ps, bs = state.opt_state
        noisy, ps = priv.update(out.grad_sum, ps)
        realized = jnp.maximum(jnp.sum(mask), 1.0)  # the bug: a private normaliser
        noisy = jax.tree_util.tree_map(lambda u: u / realized, noisy)
        updates, bs = base.update(noisy, bs, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, (ps, bs), state.frozen), {}

    return init, step


def build_mechanism(
    broken: str,
    noise_multiplier: float,
    clip_norm: float,
    learning_rate: float,
    expected_batch_size: float,
    key: jax.Array,
):
    """``(init, step)`` of DP-SGD on the white-box linear model, correct or with one bug.

    The correct mechanism is dpft's own: `make_train_step` (per-example `clipped_grad` with
    `FlatClip(clip_norm)`) and `dp_sgd` (`gaussian_privatizer` with std ``noise_multiplier *
    clip_norm``, division by the public ``expected_batch_size``, SGD). ``broken`` swaps one
    component (see the module docstring); ``noise_multiplier`` is the one the claim is
    computed for, and the 'noise' variant drops it.
    """
    if broken not in BROKEN:
        raise ValueError(f"broken must be one of {BROKEN}, got {broken!r}")
    sigma = 0.0 if broken == "noise" else noise_multiplier
    clipper = FlatClip(math.inf) if broken == "clip" else FlatClip(clip_norm)
    if broken == "realized_batch":
        return _realized_batch_step(clipper, sigma, clip_norm, learning_rate, key)
    tx = dp_sgd(
        learning_rate,
        noise_multiplier=sigma,
        l2_sensitivity=clip_norm,  # the clip norm the noise is calibrated to, also for 'clip'
        expected_batch_size=expected_batch_size,
        key=key,
    )
    return tx.init, make_train_step(_loss, clipper, tx)


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
    the claimed (epsilon, delta) with dpft's accountant; train with Poisson (or full) batches;
    score every canary; guess "in" for the k highest and "out" for the k lowest scores over a
    grid of k; convert the best (guesses, correct) pair into a lower bound on epsilon with
    `best_lower_bound` (beta split over the grid).

    Reasoning:
        If the implementation is correct, it is (claimed_epsilon, delta)-DP, so with
        probability >= 1 - beta the returned lower bound is <= claimed_epsilon. A lower bound
        above the claim is statistical evidence (at confidence 1 - beta) of a privacy bug.
    """
    rng = np.random.default_rng([cfg.seed, 0xA0D17])
    secrets, data, n = _make_data(cfg, rng)
    acct = cfg.accounting_kwargs()
    q = cfg.sampling_rate
    if cfg.noise_multiplier is None:
        sigma = calibrate_noise_multiplier(cfg.epsilon, cfg.delta, q, cfg.steps, **acct)
        claimed = cfg.epsilon
    else:
        sigma = float(cfg.noise_multiplier)
        claimed = compute_epsilon(GaussianSteps(sigma, q, cfg.steps, **acct), cfg.delta)

    key = jax.random.PRNGKey(int(rng.integers(2**31)))
    sigma_used = 0.0 if cfg.broken == "noise" else sigma
    init, step = build_mechanism(
        cfg.broken, sigma, cfg.clip_norm, cfg.learning_rate, cfg.expected_batch_size, key
    )

    d = data.shape[1]
    lo, hi = cfg.real_dim, cfg.real_dim + cfg.canaries
    params = {"w": jnp.zeros((d,), jnp.float32)}
    state = TrainState(jnp.zeros([], jnp.int32), params, init(params), {})

    @jax.jit
    def train_step(state, g, mask, rng):
        new, _ = step(state, {"g": g, "mask": mask}, rng)
        delta_w = new.params["w"] - state.params["w"]
        return new, delta_w[lo:hi], jnp.std(delta_w[hi:])

    if cfg.full_batch:
        sampler = None
        full_mask = (np.arange(cfg.max_examples) < n).astype(np.float32)
    else:
        cap = acct["max_batch_size"]
        sampler = PoissonSampler(n, q, seed=int(rng.integers(2**31)), max_batch_size=cap)
    data_j = jnp.asarray(data)
    step_key = jax.random.PRNGKey(int(rng.integers(2**31)))
    deltas, free_std = [], []
    for t in range(cfg.steps):
        if sampler is None:
            g, mask = data_j, jnp.asarray(full_mask)
        else:
            b = sampler.batch_at(t)
            g, mask = data_j[jnp.asarray(b.indices)], jnp.asarray(b.mask, jnp.float32)
        state, dw, fs = train_step(state, g, mask, jax.random.fold_in(step_key, t))
        deltas.append(dw)
        free_std.append(fs)
    deltas = np.asarray(jnp.stack(deltas), np.float64)
    free_std = np.asarray(jnp.stack(free_std), np.float64)

    scorer = cfg.scorer
    if scorer == "auto":
        scorer = "count_weighted" if cfg.broken == "realized_batch" else "sum"
    scores = _scores(cfg, deltas, free_std, sigma_used, scorer)
    bound = best_lower_bound(scores, secrets, cfg.delta, cfg.beta)
    return AuditResult(cfg, float(claimed), float(sigma), float(sigma_used), bound, scorer)
