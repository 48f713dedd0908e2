"""Correlated-noise DP-SGD: banded matrix factorization (BandMF) with amplification by sampling.

The mechanism (Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta, Xu, "(Amplified)
Banded Matrix Factorizations: A unified approach to private training", NeurIPS 2023). Write the
clipped gradient sums of n steps as the rows of X (n x d) and the prefix-sum workload as the
lower-triangular all-ones matrix A (model t of SGD is a linear function of the prefix sums).
Factor ``A = B C`` with ``C`` lower triangular, release ``C X + Z`` (Z i.i.d. Gaussian) and
train on ``C^{-1} (C X + Z) = X + C^{-1} Z``: step t adds the correlated noise ``(C^{-1} Z)_t``
to its clipped sum instead of fresh noise. Part of the noise of earlier steps cancels in the
prefix sums, so the models see less noise than with DP-SGD (``C = I``) at the same release
noise Z.

The pieces:

* **strategy** (`dpft.privacy.banded_strategy.optimal_banded_coefs`): ``C`` is b-banded
  lower-triangular Toeplitz, ``C[t, t-j] = c_j`` for ``0 <= j < b`` with ``c_0 = 1``. Its
  inverse is lower-triangular Toeplitz with the coefficients of the power series ``1 / c(x)``
  (`inverse_coefs`), so ``||A C^{-1}||_F^2`` costs O(n b), and so does its exact gradient. The
  coefficients minimise the total squared error of the n prefix sums at unit noise multiplier
  relative to the sensitivity, ``||c||^2 ||A C^{-1}||_F^2`` (`prefix_sum_error`; the factor
  ``||c||^2`` is the squared column-norm sensitivity, so the objective is invariant to scaling
  C), with scipy's L-BFGS-B on ``c_1 .. c_{b-1}`` from the truncated coefficients of
  ``A^{1/2}``. ``b = 1`` is ``C = I``: DP-SGD.
* **privatizer** (`banded_mf_privatizer`): an optax transform that adds, at step t,
  ``noise_t = z_t - sum_{j=1}^{b-1} c_j noise_{t-j}`` (that is ``(C^{-1} Z)_t``, computed
  recursively), with ``z_t ~ N(0, (sigma S)^2)`` fresh per step; its state keeps the last
  ``b - 1`` noise vectors and the step counter (a pytree: checkpointed and restored exactly).
* **sampling** (`dpft.privacy.sampling.CyclicPoissonSampler`): every example is assigned to one
  of b partitions (i.i.d. uniform, a fixed public function of ``config.seed``); step t draws a
  Poisson sample of rate q from partition ``t mod b``. An example can only take part in steps
  ``k, k + b, k + 2b, ...`` of its partition k (b-min-separated participation).
* **accounting** (`banded_entry`, `banded_epsilon`, `calibrate_banded_noise_multiplier`,
  `BandedLedger`, `BandedBudget`): see `banded_entry`.

Noise keys: the z of step t come from ``noise.step_key(correlated_key(key), t)``, where
``correlated_key(key) = keys.derive(key, "noise", 1)``. The independent privatizer uses
``noise.step_key(key, t) = keys.derive(key, "step", t)``: the first purpose folded into ``key``
differs ("noise" vs "step"), so the two draw from disjoint key domains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft.privacy import accounting, keys, noise
from dpft.privacy.banded_strategy import (
    apply_inverse,
    band_matrix,
    check_coefs,
    column_norm,
    inverse_coefs,
    optimal_banded_coefs,
    prefix_sum_error,
    prefix_sum_error_grad,
)
from dpft.privacy.ledger import BudgetExceededError, PrivacyBudget, PrivacyLedger

__all__ = [
    "NOISES",
    "BandedBudget",
    "BandedLedger",
    "BandedState",
    "apply_inverse",
    "band_matrix",
    "banded_dp_event",
    "banded_entry",
    "banded_epsilon",
    "banded_mf_privatizer",
    "banded_step_key",
    "calibrate_banded_noise_multiplier",
    "check_coefs",
    "column_norm",
    "correlated_key",
    "inverse_coefs",
    "optimal_banded_coefs",
    "participations",
    "prefix_sum_error",
    "prefix_sum_error_grad",
]

NOISES = ("independent", "banded_mf")
_CORRELATED_INDEX = 1  # index of the correlated privatizer's root under the "noise" purpose


# --------------------------------------------------------------------------------------------
# The privatizer
# --------------------------------------------------------------------------------------------


def correlated_key(key: jax.Array) -> jax.Array:
    """The correlated privatizer's root under ``key``: ``keys.derive(key, "noise", 1)``.

    Privacy:
        Its step keys ``noise.step_key(correlated_key(key), t)`` start with the "noise" purpose
        folded into ``key``, the independent privatizer's ``noise.step_key(key, t)`` with the
        "step" purpose: distinct first inputs to the PRF, so the two never share a key and
        their draws are independent.
    """
    return keys.derive(key, "noise", _CORRELATED_INDEX)


def banded_step_key(key: jax.Array, step) -> jax.Array:
    """The key of the fresh Gaussian ``z_t`` of step ``step``: one per step.

    Privacy:
        One key per step in the "step" domain of `correlated_key`, so the ``z_t`` of distinct
        steps are independent, as the factorization's release ``C X + Z`` needs.
    """
    return noise.step_key(correlated_key(key), step)


class BandedState(NamedTuple):
    """Key, step counter and the last ``b - 1`` noise vectors (checkpointed with the optimizer).

    ``history`` is shaped like the parameters with a leading axis of ``b - 1``: entry
    ``j - 1`` holds ``noise_{t-j}`` before step t (zeros before the first steps).
    """

    key: jax.Array  # raw uint32[2] key data
    count: jax.Array  # int32: logical batches privatized so far
    history: Any


def banded_mf_privatizer(
    noise_multiplier: float,
    l2_sensitivity: float,
    coefs: Sequence[float],
    key: jax.Array | int,
) -> optax.GradientTransformation:
    """Adds the correlated noise ``(C^{-1} Z)_t`` of a b-banded Toeplitz C at step t.

    ``noise_t = z_t - sum_{j=1}^{b-1} c_j noise_{t-j}`` with ``z_t`` i.i.d.
    ``N(0, (noise_multiplier * l2_sensitivity)^2)`` per coordinate, drawn from
    `banded_step_key` ``(key, t)`` (then one key per leaf, as `noise.gaussian_noise`).
    ``update`` must be called once per LOGICAL batch with the sum of clipped per-example
    gradients; the output is float32. State: `BandedState` (O(b x params) memory). With
    ``coefs = (1,)`` the noise is i.i.d. like `noise.gaussian_privatizer`'s (from other keys).

    Args:
      noise_multiplier: sigma, the std of z over ``l2_sensitivity``. The accountant's noise
        multiplier is ``sigma / column_norm(coefs)`` (`banded_entry`).
      l2_sensitivity: the clipped sum's L2 sensitivity (``clipper.sensitivity(params)``).
      coefs: ``(1, c_1, .., c_{b-1})`` (`optimal_banded_coefs`).
      key: a PRNG key or an int seed.

    Privacy:
        The outputs up to step t are a post-processing of rows 0..t of ``C X + Z``: adding
        ``(C^{-1} Z)_t`` to ``x_t`` gives ``(C^{-1} (C X + Z))_t``, and C^{-1} is lower
        triangular. If one example changes the clipped sums of the steps it takes part in by at
        most ``l2_sensitivity`` each (add/remove-one neighbouring), ``C X`` changes by at most
        ``column_norm(coefs) * l2_sensitivity`` per participation, on rows that are disjoint
        for b-min-separated participations; the accounting of that is `banded_entry`.
    """
    c = check_coefs(coefs)
    band = int(c.size)
    std = noise.noise_std(noise_multiplier, l2_sensitivity)
    tail = jnp.asarray(c[1:], jnp.float32)
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)

    def init_fn(params):
        history = jax.tree_util.tree_map(
            lambda p: jnp.zeros((band - 1, *jnp.shape(p)), jnp.float32), params
        )
        return BandedState(
            key=jnp.asarray(key, jnp.uint32), count=jnp.zeros([], jnp.int32), history=history
        )

    def correlate(z, hist):
        if band == 1:
            return z, hist
        out = z - jnp.tensordot(tail, hist, axes=1)
        return out, jnp.concatenate([out[None], hist[:-1]], axis=0)

    def update_fn(updates, state, params=None):
        del params
        z = noise.gaussian_noise(banded_step_key(state.key, state.count), updates, std)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        z_leaves = treedef.flatten_up_to(z)
        h_leaves = treedef.flatten_up_to(state.history)
        pairs = [correlate(zl, hl) for zl, hl in zip(z_leaves, h_leaves, strict=True)]
        noisy = [u.astype(jnp.float32) + p[0] for u, p in zip(leaves, pairs, strict=True)]
        history = treedef.unflatten([p[1] for p in pairs])
        new_state = BandedState(key=state.key, count=state.count + 1, history=history)
        return treedef.unflatten(noisy), new_state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def participations(steps: int, band: int) -> int:
    """Most steps an example can take part in among ``steps`` b-min-separated ones: ceil(n/b).

    The example of partition k can be sampled only at steps ``k, k+b, k+2b, ...``; partition 0
    has the most, ``ceil(steps / b)``.
    """
    if not (isinstance(steps, int | np.integer) and steps >= 0):
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not (isinstance(band, int | np.integer) and band >= 1):
        raise ValueError(f"band must be a positive int, got {band!r}")
    return -(-int(steps) // int(band))


def banded_entry(
    noise_multiplier: float,
    coefs: Sequence[float],
    sampling_rate: float,
    count: int = 1,
    *,
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> accounting.GaussianSteps:
    """``count`` participation rounds of BandMF as the equivalent DP-SGD ledger entry.

    ``GaussianSteps(noise_multiplier / column_norm(coefs), sampling_rate, count)``: Poisson
    sampled Gaussian steps (dp-accounting's ``PoissonSampledDpEvent(q, GaussianDpEvent(.))``,
    self-composed ``count`` times). For n steps, ``count = participations(n, b)``.

    Args:
      noise_multiplier: sigma of the privatizer (std of z over the clipped sum's sensitivity).
      coefs: the band ``(1, c_1, .., c_{b-1})``; the sampler must have ``b = len(coefs)``
        partitions.
      sampling_rate: the Poisson rate q within a partition.
      dataset_size, max_batch_size: the largest partition and the static cap, to bound the
        truncation of a capped Poisson batch (`accounting.GaussianSteps.overflow`).

    Privacy:
        Add/remove-one neighbouring; the clipped sum of a step has L2 sensitivity S (the
        privatizer's ``l2_sensitivity``) and z has std ``sigma S``. Theorem 4 of Choquette-Choo
        et al. (NeurIPS 2023, "Amplified banded matrix factorizations"): if C is lower
        triangular and b-banded with column norms at most 1, and each step samples by Poisson
        (rate q) from partition ``t mod b`` of a data-independent partition into b parts, the
        release ``C X + Z`` satisfies the DP guarantee of DP-SGD with sampling rate q, noise
        multiplier sigma and ``ceil(n / b)`` steps. The reason: the example's participations
        are b-min-separated, so their columns of C (rows ``t .. t+b-1``) have disjoint supports
        and the rows of ``C X + Z`` split into ``ceil(n/b)`` blocks, block j affected by
        participation j only; each block is a Poisson-subsampled Gaussian mechanism (the other
        examples' contributions are the same function of earlier outputs on both neighbours),
        and the blocks compose adaptively. Here column norms are ``||c|| S`` (`column_norm`),
        i.e. C normalised by ``||c||``: the event's multiplier is ``sigma / ||c||``. Capped
        batches: truncation at steps of other partitions is the same on both neighbours, so
        only the ``count`` steps of the example's partition are charged, with
        ``dataset_size`` the largest partition.
    """
    return accounting.GaussianSteps(
        float(noise_multiplier) / column_norm(coefs),
        sampling_rate,
        int(count),
        dataset_size=dataset_size,
        max_batch_size=max_batch_size,
    )


def banded_dp_event(
    noise_multiplier: float,
    coefs: Sequence[float],
    sampling_rate: float,
    steps: int,
    **entry_kwargs,
) -> dpa.DpEvent:
    """The dp-accounting event of ``steps`` steps of BandMF (`banded_entry`'s rounds).

    Privacy:
        ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma / ||c||)),
        ceil(steps / b))`` under add/remove-one neighbouring, per `banded_entry`.
    """
    rounds = participations(steps, len(check_coefs(coefs)))
    return banded_entry(noise_multiplier, coefs, sampling_rate, rounds, **entry_kwargs).event()


def banded_epsilon(
    noise_multiplier: float,
    coefs: Sequence[float],
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    **entry_kwargs,
) -> float:
    """Epsilon at ``delta`` of ``steps`` steps of BandMF with b-min-separated Poisson sampling.

    Privacy:
        `accounting.compute_epsilon` of the `banded_entry` of ``ceil(steps / b)`` rounds:
        add/remove-one neighbouring, per-participation sensitivity ``||c|| S``.
    """
    rounds = participations(steps, len(check_coefs(coefs)))
    entry = banded_entry(noise_multiplier, coefs, sampling_rate, rounds, **entry_kwargs)
    return accounting.compute_epsilon(entry, delta, accountant)


def calibrate_banded_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    coefs: Sequence[float],
    accountant: str = "pld",
    rtol: float = 1e-3,
    **entry_kwargs,
) -> float:
    """Smallest privatizer sigma (to ``rtol``) whose `banded_epsilon` is <= the target.

    `accounting.calibrate_noise_multiplier` for ``ceil(steps / b)`` rounds, times
    ``column_norm(coefs)`` (rounded up so that the ratio is never below the calibrated one).

    Privacy:
        The returned sigma satisfies ``banded_epsilon(sigma, ...) <= target_epsilon`` under
        add/remove-one neighbouring, per `banded_entry`.
    """
    norm = column_norm(coefs)
    rounds = participations(steps, len(check_coefs(coefs)))
    acct = accounting.calibrate_noise_multiplier(
        target_epsilon, delta, sampling_rate, rounds, accountant, rtol, **entry_kwargs
    )
    sigma = acct * norm
    while sigma / norm < acct:
        sigma = float(np.nextafter(sigma, math.inf))
    return float(sigma)


class BandedLedger(PrivacyLedger):
    """A ledger of BandMF steps: ``steps`` counts logical steps, ``entries`` their rounds.

    Step t opens a participation round when ``t % band == 0``; recording steps records one
    `banded_entry` round per round opened, so after n steps the entries hold
    ``ceil(n / band)`` rounds (``band = 1``: one per step, like `PrivacyLedger`).
    """

    def __init__(self, band: int, entries: Sequence[accounting.GaussianSteps] = (), steps=0):
        super().__init__(entries)
        participations(0, band)  # checks band
        self.band = int(band)
        self.logical_steps = int(steps)

    def opens_round(self) -> bool:
        """Whether the next step starts a new round (may add a participation)."""
        return self.logical_steps % self.band == 0

    def record(self, entry: accounting.GaussianSteps, count: int | None = None) -> None:
        count = entry.count if count is None else int(count)
        before = participations(self.logical_steps, self.band)
        rounds = participations(self.logical_steps + count, self.band) - before
        if rounds:
            super().record(entry, rounds)
        self.logical_steps += count

    @property
    def steps(self) -> int:
        return self.logical_steps

    @property
    def rounds(self) -> int:
        return sum(e.count for e in self.entries)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "band": self.band, "steps": self.logical_steps}

    @classmethod
    def from_dict(cls, d: dict) -> BandedLedger:
        entries = [accounting.GaussianSteps(**e) for e in d["entries"]]
        return cls(int(d["band"]), entries, int(d["steps"]))

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, BandedLedger)
            and (self.band, self.logical_steps) == (other.band, other.logical_steps)
            and self.entries == other.entries
        )


class BandedBudget(PrivacyBudget):
    """`PrivacyBudget` over a `BandedLedger`: only a step that opens a round can exceed it.

    ``spend(entry)`` takes the `banded_entry` of ONE round and is called before every step;
    ``remaining`` counts rounds.

    Privacy:
        After n recorded steps the ledger's epsilon is that of ``ceil(n / b)`` rounds, the
        bound of `banded_entry` for any prefix of the run (add/remove-one neighbouring); a step
        that opens no round leaves it unchanged, and a step that opens one is refused when that
        round would exceed the target.
    """

    def __init__(
        self,
        target_epsilon: float,
        delta: float,
        accountant: str,
        band: int,
        ledger: BandedLedger | None = None,
    ):
        super().__init__(target_epsilon, delta, accountant, ledger or BandedLedger(band))

    def spend(self, entry: accounting.GaussianSteps) -> None:
        if self.ledger.opens_round() and self.remaining(entry) < 1:
            raise BudgetExceededError(
                f"one more round would exceed the target epsilon {self.target_epsilon} at delta "
                f"{self.delta} (spent {self.ledger.steps} steps, {self.ledger.rounds} rounds)"
            )
        self.ledger.record(entry, 1)
