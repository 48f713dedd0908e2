"""Privacy accounting on the host with dp-accounting: epsilon and calibration.

The ledger and budget of a run are in `dpft.privacy.ledger` (also reachable from here as
``accounting.PrivacyLedger``, ``accounting.PrivacyBudget``, ``accounting.BudgetExceededError``),
the command line in `dpft.privacy.accounting_cli`.

Everything here is numpy/python and runs outside jit. PLD (privacy loss distributions,
pessimistic discretisation) is the default accountant; RDP is the cross-check. Both give upper
bounds on epsilon, so neither under-reports.

Neighbouring relations: Poisson-sampled and full-batch steps are accounted under add/remove-one;
shuffled fixed-size batches (sampling without replacement) under replace-one, with RDP only.
Under replace-one the clipped sum has L2 sensitivity 2C (one example's clipped gradient is
swapped for another's), while the noise std is ``sigma * C``: the event recorded for a shuffle
step is ``GaussianDpEvent(sigma / 2)``, dp-accounting's multiplier being relative to the
sensitivity.

Truncated Poisson batches (static shapes): a step whose Poisson draw exceeds the cap keeps a
random subset. Let ``M'`` be the truncated mechanism and ``M`` the untruncated one, ``eta`` the
probability that any step of the ledger truncates on the N examples of the run and ``eta'`` the
same on N + 1 examples (a neighbour; ``eta' >= eta``). ``M'`` and ``M`` are within total
variation ``eta`` (``eta'`` on the neighbour), so if ``M`` is (eps, delta_M)-DP, for every set S

    P[M'(D) in S] <= P[M(D) in S] + eta <= e^eps (P[M'(D') in S] + eta') + delta_M + eta,

and ``M'`` is (eps, delta_M + eta + e^eps eta')-DP (the other direction gives
``eta' + e^eps eta``, no larger). When that charge ``eta + e^eps eta'`` is at most 1% of delta,
the steps are accounted as untruncated Poisson and epsilon is the smallest eps with
``delta_M(eps) + eta + e^eps eta' <= delta`` (`_charged_epsilon`). Otherwise PLD accounts the
truncation exactly with ``TruncatedSubsampledGaussianDpEvent``. RDP, which has no exact event,
keeps the charge whenever ``eta' <= 1%`` of delta (sound for any charge below delta; epsilon is
inf beyond) and refuses a cap that binds more often.
`overflow_probability_for` gives the per-step overflow probability that keeps the charge within
1% of delta, for sizing the cap.

Command line::

    python -m dpft.privacy.accounting epsilon --sampling-rate Q --noise-multiplier S \
        --steps T --delta D [--accountant pld|rdp]
    python -m dpft.privacy.accounting sigma --sampling-rate Q --epsilon E --steps T --delta D
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import sys
from collections.abc import Sequence

import dp_accounting as dpa
from dp_accounting import pld, rdp
from scipy import stats

__all__ = [
    "ACCOUNTANTS",
    "GaussianSteps",
    "calibrate_noise_multiplier",
    "calibrate_steps",
    "check_delta",
    "compute_epsilon",
    "dp_event",
    "overflow_probability_for",
]

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "shuffle", "full")
_OVERFLOW_SHARE_OF_DELTA = 0.01


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def check_delta(delta: float, num_examples: int, name: str = "config.dp.delta") -> float:
    """``delta`` as a float if it lies in (0, 1/N); else a one-line ValueError naming ``name``.

    Privacy:
        A delta of 1/N or more admits mechanisms that publish one of the N examples in the clear
        with probability delta per example (under add/remove-one neighbouring), so every driver
        refuses it with this one check.
    """
    if int(num_examples) != num_examples or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    if not 0 < delta < 1.0 / num_examples:
        raise ValueError(f"{name} must be in (0, 1/N = {1.0 / num_examples:.3g}), got {delta}")
    return float(delta)


@dataclasses.dataclass(frozen=True)
class GaussianSteps:
    """``count`` steps of a subsampled Gaussian mechanism: one ledger entry.

    Attributes:
      noise_multiplier: sigma (noise std / L2 sensitivity).
      sampling_rate: q (Poisson rate; batch/dataset for shuffle; 1 for full batch).
      count: number of steps.
      sampling: 'poisson', 'shuffle' (without replacement) or 'full' (every example, q = 1).
      dataset_size: N; needed for truncation and for 'shuffle'.
      max_batch_size: the static Poisson cap (truncation), or the batch size for 'shuffle'.
    """

    noise_multiplier: float
    sampling_rate: float
    count: int = 1
    sampling: str = "poisson"
    dataset_size: int | None = None
    max_batch_size: int | None = None

    def __post_init__(self):
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        if not (isinstance(self.count, int) and self.count >= 0):
            raise ValueError(f"steps must be a non-negative int, got {self.count!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.sampling == "shuffle" and not (self.dataset_size and self.max_batch_size):
            raise ValueError("shuffle sampling needs dataset_size and max_batch_size (batch)")

    def with_count(self, count: int) -> GaussianSteps:
        return dataclasses.replace(self, count=count)

    def same_mechanism(self, other: GaussianSteps) -> bool:
        return self.with_count(0) == other.with_count(0)

    @property
    def neighboring(self) -> dpa.NeighboringRelation:
        if self.sampling == "shuffle":
            return dpa.NeighboringRelation.REPLACE_ONE
        return dpa.NeighboringRelation.ADD_OR_REMOVE_ONE

    def overflow(self, extra_examples: int = 0) -> float:
        """Probability that any of these steps truncated its Poisson batch (union bound).

        ``extra_examples=1`` gives it on a neighbouring dataset of N + 1 examples.
        """
        if self.sampling != "poisson" or self.max_batch_size is None or self.count == 0:
            return 0.0
        if self.dataset_size is None:
            raise ValueError("a capped Poisson entry needs dataset_size to bound truncation")
        n = self.dataset_size + extra_examples
        p = float(stats.binom.sf(self.max_batch_size, n, self.sampling_rate))
        return min(1.0, self.count * p)

    def event(self, exact_truncation: bool = False) -> dpa.DpEvent:
        """The dp-accounting event of these steps.

        Privacy:
            The noise std is ``noise_multiplier * C`` for a clipped sum of per-example bound C.
            Poisson and full-batch steps: sensitivity C under add/remove-one, so the event's
            multiplier is ``noise_multiplier``. Shuffle steps: sensitivity 2C under
            replace-one, so the event is ``GaussianDpEvent(noise_multiplier / 2)``.
        """
        gauss = dpa.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "shuffle":  # replace-one: sensitivity 2C for noise std sigma C
            half = dpa.GaussianDpEvent(self.noise_multiplier / 2)
            one = half
            if self.max_batch_size < self.dataset_size:  # a batch of all N is no subsample
                one = dpa.SampledWithoutReplacementDpEvent(
                    self.dataset_size, self.max_batch_size, half
                )
        elif self.sampling == "full" or self.sampling_rate == 1:
            one = gauss
        elif exact_truncation and self.max_batch_size is not None:
            one = dpa.TruncatedSubsampledGaussianDpEvent(
                self.dataset_size, self.sampling_rate, self.max_batch_size, self.noise_multiplier
            )
        else:
            one = dpa.PoissonSampledDpEvent(self.sampling_rate, gauss)
        return dpa.SelfComposedDpEvent(one, self.count)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_entries(steps: GaussianSteps | Sequence[GaussianSteps]) -> list[GaussianSteps]:
    return [steps] if isinstance(steps, GaussianSteps) else list(steps)


def dp_event(
    steps: GaussianSteps | Sequence[GaussianSteps], exact_truncation: bool = False
) -> dpa.DpEvent:
    """The composed DpEvent of ledger entries (for use with any dp-accounting accountant)."""
    return dpa.ComposedDpEvent([e.event(exact_truncation) for e in _as_entries(steps) if e.count])


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting's RDP logs a warning per order it drops; harmless during a bracket search."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _accountant(kind: str, relation: dpa.NeighboringRelation) -> dpa.PrivacyAccountant:
    if kind == "pld":
        return pld.PLDAccountant(neighboring_relation=relation)
    return rdp.RdpAccountant(neighboring_relation=relation)


def compute_epsilon(
    steps: GaussianSteps | Sequence[GaussianSteps], delta: float, accountant: str = "pld"
) -> float:
    """Epsilon of the composition of ``steps`` at ``delta`` (an upper bound; inf if sigma = 0).

    Privacy:
        Sound for the mechanisms described by the entries: Poisson and full-batch entries under
        add/remove-one neighbouring, shuffle entries under replace-one (sensitivity 2C, see
        `GaussianSteps.event`). Truncated Poisson batches are charged ``eta + e^eps eta'``
        or accounted exactly, as described in the module docstring.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    entries = tuple(e for e in _as_entries(steps) if e.count)
    try:
        hash(entries)
    except TypeError:  # e.g. an array-valued field: account without the memo
        return _epsilon.__wrapped__(entries, float(delta), accountant)
    return _epsilon(entries, float(delta), accountant)


def neighboring_of(entries: Sequence[GaussianSteps]) -> dpa.NeighboringRelation:
    """The one neighbouring relation the ``entries`` are accounted under (a mix is refused).

    Privacy:
        Poisson and full-batch entries are add/remove-one, shuffled ones replace-one; their
        compositions are not accounted together.
    """
    relations = {e.neighboring for e in entries}
    if len(relations) > 1:
        raise ValueError("cannot compose shuffled (replace-one) with Poisson (add/remove) steps")
    return relations.pop()


@functools.lru_cache(maxsize=4096)
def _epsilon(entries: tuple[GaussianSteps, ...], delta: float, accountant: str) -> float:
    """`compute_epsilon` of validated, hashable inputs, memoised: the epsilon is a pure function
    of the (frozen) entries, and calibrations and studies ask for the same ones many times."""
    if not entries:
        return 0.0
    if any(e.noise_multiplier == 0 for e in entries):
        return math.inf
    relation = neighboring_of(entries)
    if relation == dpa.NeighboringRelation.REPLACE_ONE and accountant == "pld":
        accountant = "rdp"  # dp-accounting's PLD has no sampling-without-replacement event
    eta = sum(e.overflow() for e in entries)
    eta_neighbour = sum(e.overflow(extra_examples=1) for e in entries)
    if eta_neighbour == 0:
        acc = _accountant(accountant, relation)
        acc.compose(dp_event(entries))
        with _quiet_absl():  # RDP drops orders it cannot evaluate: still an upper bound
            return float(acc.get_epsilon(delta))
    share = _OVERFLOW_SHARE_OF_DELTA * delta
    if eta_neighbour <= share:
        acc = _accountant(accountant, relation)
        acc.compose(dp_event(entries))
        with _quiet_absl():
            eps = _charged_epsilon(acc, delta, eta, eta_neighbour)
        # Any charge below delta is sound (RDP has no exact event: it keeps it, possibly inf);
        # PLD accounts the truncation exactly when the charge would exceed 1% of delta.
        if accountant == "rdp" or eta + math.exp(min(eps, 700.0)) * eta_neighbour <= share:
            return eps
    if accountant == "rdp":
        raise ValueError(
            f"the Poisson batch cap truncates too often (overflow probability {eta_neighbour:.3g}"
            f" > 1% of delta): raise max_batch_size or use the pld accountant"
        )
    acc = _accountant("pld", relation)
    acc.compose(dp_event(entries, exact_truncation=True))
    return float(acc.get_epsilon(delta))


def _charged_epsilon(
    acc: dpa.PrivacyAccountant, delta: float, eta: float, eta_neighbour: float
) -> float:
    """Smallest eps (to 1e-6 relative) with ``acc``'s delta(eps) + eta + e^eps eta' <= delta.

    ``g(e) = acc.get_epsilon(delta - eta - e^e eta')`` is increasing in ``e``; a value ``t``
    with ``g(t) <= t`` is sound, since delta(t) <= delta(g(t)) <= delta - eta - e^t eta'
    (delta(eps) is non-increasing). The iteration ``t <- g(t)`` from below reaches such a
    value in a few steps when ``e^eps eta'`` is small; ``inf`` if the charge exceeds delta.
    """
    eps = 0.0
    for _ in range(100):
        trial = eps * (1 + 1e-6) + 1e-12
        rest = delta - eta - math.exp(min(trial, 700.0)) * eta_neighbour
        if rest <= 0:
            return math.inf
        nxt = float(acc.get_epsilon(rest))
        if nxt <= trial:
            return trial
        eps = nxt
    return math.inf


def overflow_probability_for(target_epsilon: float, delta: float, steps: int) -> float:
    """Per-step overflow probability whose truncation charge is at most 1% of ``delta``.

    With per-step probability p on N + 1 examples (at least that on N) over ``steps`` steps, the
    charge ``eta + e^eps eta'`` is at most ``(1 + e^eps) steps p``; this returns the p that
    makes it ``0.01 delta`` at ``eps = target_epsilon`` (for an infinite target, at eps = 0:
    such a run has no finite epsilon to protect).
    """
    _check_delta(delta)
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    e = 0.0 if math.isinf(target_epsilon) else float(target_epsilon)
    return _OVERFLOW_SHARE_OF_DELTA * delta / ((1.0 + math.exp(min(e, 700.0))) * steps)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "pld",
    rtol: float = 1e-3,
    **entry_kwargs,
) -> float:
    """Smallest noise multiplier (to relative tolerance ``rtol``) whose epsilon <= target.

    The returned sigma always satisfies ``compute_epsilon(...) <= target_epsilon`` for the
    chosen accountant. ``entry_kwargs`` go to `GaussianSteps` (sampling, dataset_size,
    max_batch_size). For PLD the search is bracketed with the much cheaper RDP answer (every
    bracket end is checked with PLD itself, so this only saves time).
    """
    if not target_epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {target_epsilon!r}")
    _check_delta(delta)
    _check_accountant(accountant)

    def eps(sigma: float, kind: str = accountant) -> float:
        entry = GaussianSteps(sigma, sampling_rate, steps, **entry_kwargs)
        return compute_epsilon(entry, delta, kind)

    hi = 1.0
    if accountant == "pld":
        try:
            with _quiet_absl():
                hi = calibrate_noise_multiplier(
                    target_epsilon, delta, sampling_rate, steps, "rdp", 0.05, **entry_kwargs
                )
        except ValueError:  # RDP cannot account this entry (e.g. a binding batch cap)
            hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier <= 1e6 reaches epsilon {target_epsilon}")
    lo = hi / (1.5 if accountant == "pld" else 2)
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
        if lo < 1e-4:
            return hi
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate_steps(
    noise_multiplier: float,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    accountant: str = "pld",
    prefix: Sequence[GaussianSteps] = (),
    **entry_kwargs,
) -> int:
    """Largest number of steps (after ``prefix``) whose total epsilon stays <= target.

    For PLD the search starts from the RDP answer, checked with PLD (only a speed-up).
    """
    if not target_epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {target_epsilon!r}")

    def ok(t: int, kind: str = accountant) -> bool:
        entry = GaussianSteps(noise_multiplier, sampling_rate, t, **entry_kwargs)
        return compute_epsilon([*prefix, entry], delta, kind) <= target_epsilon

    if not ok(0) or not ok(1):
        return 0
    lo = 1
    if accountant == "pld":
        try:
            start = calibrate_steps(
                noise_multiplier,
                target_epsilon,
                delta,
                sampling_rate,
                "rdp",
                prefix,
                **entry_kwargs,
            )
            if start > 1 and ok(start):
                lo = start
        except ValueError:
            pass
    hi = 2 * lo
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


_LEDGER_NAMES = ("BudgetExceededError", "PrivacyBudget", "PrivacyLedger")


def __getattr__(name):  # the ledger and budget live in dpft.privacy.ledger (imported lazily)
    if name in _LEDGER_NAMES:
        from dpft.privacy import ledger

        return getattr(ledger, name)
    if name == "main":
        from dpft.privacy.accounting_cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from dpft.privacy.accounting_cli import main

    sys.exit(main())
