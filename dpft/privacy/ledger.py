"""The ledger of a run's DP steps and the budget that refuses a step past the target.

`PrivacyLedger` records every step as run-length-encoded `GaussianSteps` entries (checkpointed
with the run, JSON-serialisable); `PrivacyBudget` checks each step against a target
(epsilon, delta) before it runs. Both account with `dpft.privacy.accounting`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dpft.privacy.accounting import (
    GaussianSteps,
    _check_accountant,
    _check_delta,
    calibrate_steps,
    compute_epsilon,
)

__all__ = ["BudgetExceededError", "PrivacyBudget", "PrivacyLedger"]


class BudgetExceededError(RuntimeError):
    """Raised when a step would take epsilon past the run's target."""


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
