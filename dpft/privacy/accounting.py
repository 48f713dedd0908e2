"""Privacy accounting on the host with dp-accounting: epsilon, calibration, ledger, budget.

Everything here is numpy/python and runs outside jit. PLD (privacy loss distributions,
pessimistic discretisation) is the default accountant; RDP is the cross-check. Both give upper
bounds on epsilon, so neither under-reports.

Neighbouring relations: Poisson-sampled and full-batch steps are accounted under add/remove-one;
shuffled fixed-size batches (sampling without replacement) under replace-one, with RDP only.

Truncated Poisson batches (static shapes): a step whose Poisson draw exceeds the cap keeps a
random subset. If the total overflow probability over the ledger is at most 1% of delta, the
steps are accounted as untruncated Poisson and the overflow probability is charged to delta
(epsilon is computed at ``delta - overflow``, which is sound because the truncated and untruncated
mechanisms are within that total-variation distance). Otherwise PLD accounts the truncation
exactly with ``TruncatedSubsampledGaussianDpEvent``; RDP refuses.

Command line::

    python -m dpft.privacy.accounting epsilon --sampling-rate Q --noise-multiplier S \
        --steps T --delta D [--accountant pld|rdp]
    python -m dpft.privacy.accounting sigma --sampling-rate Q --epsilon E --steps T --delta D
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import sys
from collections.abc import Sequence

import dp_accounting as dpa
from dp_accounting import pld, rdp
from scipy import stats

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceededError",
    "GaussianSteps",
    "PrivacyBudget",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "calibrate_steps",
    "compute_epsilon",
    "dp_event",
]

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "shuffle", "full")
_OVERFLOW_SHARE_OF_DELTA = 0.01


class BudgetExceededError(RuntimeError):
    """Raised when a step would take epsilon past the run's target."""


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


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

    def overflow(self) -> float:
        """Probability that any of these steps truncated its Poisson batch (union bound)."""
        if self.sampling != "poisson" or self.max_batch_size is None or self.count == 0:
            return 0.0
        if self.dataset_size is None:
            raise ValueError("a capped Poisson entry needs dataset_size to bound truncation")
        p = float(stats.binom.sf(self.max_batch_size, self.dataset_size, self.sampling_rate))
        return min(1.0, self.count * p)

    def event(self, exact_truncation: bool = False) -> dpa.DpEvent:
        gauss = dpa.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "full" or self.sampling_rate == 1:
            one = gauss
        elif self.sampling == "shuffle":
            one = dpa.SampledWithoutReplacementDpEvent(
                self.dataset_size, self.max_batch_size, gauss
            )
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
        add/remove-one neighbouring, shuffle entries under replace-one. Truncated Poisson
        batches are covered as described in the module docstring.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    entries = [e for e in _as_entries(steps) if e.count]
    if not entries:
        return 0.0
    if any(e.noise_multiplier == 0 for e in entries):
        return math.inf
    relations = {e.neighboring for e in entries}
    if len(relations) > 1:
        raise ValueError("cannot compose shuffled (replace-one) with Poisson (add/remove) steps")
    relation = relations.pop()
    if relation == dpa.NeighboringRelation.REPLACE_ONE and accountant == "pld":
        accountant = "rdp"  # dp-accounting's PLD has no sampling-without-replacement event
    overflow = sum(e.overflow() for e in entries)
    exact = overflow > _OVERFLOW_SHARE_OF_DELTA * delta
    if exact and accountant == "rdp":
        raise ValueError(
            f"the Poisson batch cap truncates too often (overflow probability {overflow:.3g} "
            f"> 1% of delta): raise max_batch_size or use the pld accountant"
        )
    acc = _accountant(accountant, relation)
    acc.compose(dp_event(entries, exact_truncation=exact))
    with _quiet_absl():  # RDP drops orders it cannot evaluate: still an upper bound
        return float(acc.get_epsilon(delta if exact else delta - overflow))


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


class PrivacyLedger:
    """Every DP step spent, as run-length-encoded `GaussianSteps` entries; JSON-serialisable."""

    def __init__(self, entries: Sequence[GaussianSteps] = ()):
        self.entries: list[GaussianSteps] = list(entries)

    def record(self, entry: GaussianSteps, count: int | None = None) -> None:
        count = entry.count if count is None else count
        if self.entries and self.entries[-1].same_mechanism(entry):
            last = self.entries[-1]
            self.entries[-1] = last.with_count(last.count + count)
        else:
            self.entries.append(entry.with_count(count))

    @property
    def steps(self) -> int:
        return sum(e.count for e in self.entries)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        return compute_epsilon(self.entries, delta, accountant)

    def to_dict(self) -> dict:
        return {"entries": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> PrivacyLedger:
        return cls([GaussianSteps(**e) for e in d["entries"]])

    def __eq__(self, other) -> bool:
        return isinstance(other, PrivacyLedger) and self.entries == other.entries


class PrivacyBudget:
    """A target (epsilon, delta) and the ledger spent against it; refuses steps past the target.

    ``spend(entry)`` records one step before it runs, or raises `BudgetExceededError` if that
    step would exceed the target. The number of further steps allowed is computed once per run
    of identical steps (a binary search with the accountant), not at every step.
    """

    def __init__(
        self,
        target_epsilon: float,
        delta: float,
        accountant: str = "pld",
        ledger: PrivacyLedger | None = None,
    ):
        if not target_epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {target_epsilon!r}")
        _check_delta(delta)
        _check_accountant(accountant)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.ledger = ledger or PrivacyLedger()
        self._cache: dict = {}

    def _split(self, entry: GaussianSteps) -> tuple[list[GaussianSteps], int]:
        ents = self.ledger.entries
        if ents and ents[-1].same_mechanism(entry):
            return ents[:-1], ents[-1].count
        return list(ents), 0

    def remaining(self, entry: GaussianSteps) -> int:
        """How many more steps of ``entry``'s mechanism fit in the budget (no target: 2**62)."""
        if math.isinf(self.target_epsilon):
            return 1 << 62
        prefix, done = self._split(entry)
        key = (tuple(prefix), entry.with_count(0))
        if key not in self._cache:
            self._cache[key] = calibrate_steps(
                entry.noise_multiplier,
                self.target_epsilon,
                self.delta,
                entry.sampling_rate,
                self.accountant,
                prefix=prefix,
                sampling=entry.sampling,
                dataset_size=entry.dataset_size,
                max_batch_size=entry.max_batch_size,
            )
        return max(0, self._cache[key] - done)

    def spend(self, entry: GaussianSteps) -> None:
        if self.remaining(entry) < 1:
            raise BudgetExceededError(
                f"one more step would exceed the target epsilon {self.target_epsilon} at delta "
                f"{self.delta} (spent {self.ledger.steps} steps)"
            )
        self.ledger.record(entry, 1)

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.delta, self.accountant)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpft.privacy.accounting",
        description="Epsilon of Poisson-subsampled Gaussian DP-SGD, or the noise for a target.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("epsilon", "print epsilon"), ("sigma", "print noise multiplier")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--sampling-rate", type=float, required=True, help="Poisson rate q")
        s.add_argument("--steps", type=int, required=True)
        s.add_argument("--delta", type=float, required=True)
        s.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
        if name == "epsilon":
            s.add_argument("--noise-multiplier", type=float, required=True)
        else:
            s.add_argument("--epsilon", type=float, required=True)
    return p


def _validate(args) -> None:
    if not 0 < args.sampling_rate <= 1:
        raise ValueError(f"--sampling-rate must be in (0, 1], got {args.sampling_rate}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must be in (0, 1), got {args.delta}")
    if args.command == "epsilon" and not args.noise_multiplier >= 0:
        raise ValueError(f"--noise-multiplier must be >= 0, got {args.noise_multiplier}")
    if args.command == "sigma" and not args.epsilon > 0:
        raise ValueError(f"--epsilon must be > 0, got {args.epsilon}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _validate(args)
        if args.command == "epsilon":
            entry = GaussianSteps(args.noise_multiplier, args.sampling_rate, args.steps)
            eps = compute_epsilon(entry, args.delta, args.accountant)
            if math.isinf(eps):
                print("inf  (noise multiplier 0: no privacy)")
            else:
                print(f"{eps:.6g}")
        else:
            sigma = calibrate_noise_multiplier(
                args.epsilon, args.delta, args.sampling_rate, args.steps, args.accountant
            )
            print(f"{sigma:.6g}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
