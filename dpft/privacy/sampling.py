"""Batch samplers on the host (numpy): Poisson sampling padded to a static size, and shuffling.

Each sampler is a pure function of ``(seed, step)``: the batch of step ``t`` is drawn from a
generator seeded with ``[seed, t]``. Its whole state is the next step number, so saving and
restoring it continues exactly the same sequence, and resuming a run is exact.

Both return `IndexBatch(indices, mask)`: ``indices`` has a static length (padding rows point at
index 0 and have mask 0), so the jitted step never sees a new shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
from scipy import stats

__all__ = [
    "CyclicPoissonSampler",
    "IndexBatch",
    "PoissonSampler",
    "ShuffleSampler",
    "overflow_probability",
    "partition_members",
    "poisson_batch_cap",
]

DEFAULT_OVERFLOW_PROBABILITY = 1e-12


class IndexBatch(NamedTuple):
    indices: np.ndarray  # int64 [max_batch_size]
    mask: np.ndarray  # bool [max_batch_size]; True for sampled examples

    @property
    def size(self) -> int:
        return int(self.mask.sum())


def _check_dataset(num_examples: int) -> None:
    if not (isinstance(num_examples, int | np.integer) and num_examples > 0):
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")


def _check_rate(sampling_rate: float) -> None:
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")


def overflow_probability(num_examples: int, sampling_rate: float, max_batch_size: int) -> float:
    """P[Binomial(num_examples, sampling_rate) > max_batch_size]: one step's truncation chance."""
    return float(stats.binom.sf(max_batch_size, num_examples, sampling_rate))


def poisson_batch_cap(
    num_examples: int,
    sampling_rate: float,
    overflow_prob: float = DEFAULT_OVERFLOW_PROBABILITY,
) -> int:
    """Smallest static batch size whose per-step overflow probability is <= ``overflow_prob``."""
    _check_dataset(num_examples)
    _check_rate(sampling_rate)
    cap = int(stats.binom.isf(overflow_prob, num_examples, sampling_rate))
    while cap < num_examples and overflow_probability(num_examples, sampling_rate, cap) > (
        overflow_prob
    ):
        cap += 1
    return max(1, min(cap, num_examples))


def checked_cap(cap: int | None, population: int, rate: float, name="max_batch_size") -> int:
    """The padded batch ``cap`` of a Poisson sample of ``population`` at ``rate``:
    `poisson_batch_cap` when None, else refused unless a positive int.

    Privacy:
        The cap is public (a function of the population, the rate and the public overflow
        target); the accountant must be given the same cap (truncation).
    """
    if cap is None:
        cap = poisson_batch_cap(population, rate)
    if not (isinstance(cap, int | np.integer) and cap > 0):
        raise ValueError(f"{name} must be a positive int, got {cap!r}")
    return int(cap)


def truncated_poisson(rng: np.random.Generator, population: int, rate: float, cap: int):
    """The sorted members of ``range(population)`` drawn by Poisson sampling at ``rate``; if
    more than ``cap`` are drawn, a uniformly random ``cap`` of them.

    Conditioned on its size, a Poisson sample is a uniform subset, and so is a truncated one:
    the size is drawn first (binomial, capped), then the subset.

    Privacy:
        The sampling of the Poisson-subsampled Gaussian mechanism under add/remove-one
        neighbouring, truncated at ``cap`` as the accountant's entry says; the returned indices
        are private and must not be logged.
    """
    n = min(int(rng.binomial(population, rate)), cap)
    return np.sort(rng.choice(population, size=n, replace=False))


def _padded(chosen: np.ndarray, cap: int) -> IndexBatch:
    indices = np.zeros(cap, np.int64)
    indices[: len(chosen)] = chosen
    mask = np.zeros(cap, bool)
    mask[: len(chosen)] = True
    return IndexBatch(indices, mask)


@dataclasses.dataclass
class _StepSampler:
    """A sampler whose batch at each step is ``batch_at(step)``; its state is the next step
    (keyword-only, after a subclass's own fields, ``seed`` among them)."""

    step: int = dataclasses.field(default=0, kw_only=True)

    def batch_at(self, step: int) -> IndexBatch:
        raise NotImplementedError

    def next(self) -> IndexBatch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": int(self.step), "seed": int(self.seed)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != int(self.seed):
            raise ValueError(f"sampler seed mismatch: checkpoint {state['seed']} vs {self.seed}")
        self.step = int(state["step"])


class _PoissonUnits(_StepSampler):
    """A sampler that draws each of ``population`` units with probability ``sampling_rate``,
    truncated at ``max_batch_size`` (`truncated_poisson`), from a generator seeded with
    ``[seed, step]``."""

    sampling_rate: float
    max_batch_size: int

    @property
    def population(self) -> int:
        raise NotImplementedError

    @property
    def expected_batch_size(self) -> float:
        return self.population * self.sampling_rate

    @property
    def overflow_prob(self) -> float:
        return overflow_probability(self.population, self.sampling_rate, self.max_batch_size)

    def draw(self, step: int) -> tuple[np.random.Generator, np.ndarray]:
        """The step's generator and the sorted units it sampled."""
        rng = np.random.default_rng([self.seed, step])
        return rng, truncated_poisson(rng, self.population, self.sampling_rate, self.max_batch_size)


@dataclasses.dataclass
class PoissonSampler(_PoissonUnits):
    """Poisson sampling: each example joins a step's batch independently with probability q.

    The batch is padded to ``max_batch_size`` rows. If a draw exceeds the cap, a uniformly random
    subset of ``max_batch_size`` sampled examples is kept ("truncated Poisson sampling"). By
    default the cap is set so that this happens with probability <= 1e-12 per step
    (``overflow_prob`` reports it); the accountant either treats the truncation exactly (PLD's
    truncated-Poisson event) or charges the overflow probability to delta.

    Privacy:
        With noise calibrated by the accountant for sampling rate ``sampling_rate``, this is the
        sampling scheme of the Poisson-subsampled Gaussian mechanism under add/remove-one
        neighbouring. The sampled indices themselves are private and must not be logged.
    """

    num_examples: int
    sampling_rate: float
    seed: int
    max_batch_size: int | None = None

    def __post_init__(self):
        _check_dataset(self.num_examples)
        _check_rate(self.sampling_rate)
        self.max_batch_size = checked_cap(
            self.max_batch_size, self.num_examples, self.sampling_rate
        )

    @property
    def population(self) -> int:
        return self.num_examples

    def batch_at(self, step: int) -> IndexBatch:
        return _padded(self.draw(step)[1], self.max_batch_size)


@dataclasses.dataclass
class ShuffleSampler(_StepSampler):
    """Fixed-size batches from a fresh permutation each epoch (the remainder is dropped).

    Offered so that users can compare with common practice. Accounting treats each step as
    sampling WITHOUT replacement of ``batch_size`` out of ``num_examples`` (replace-one
    neighbouring, RDP only). That is the usual convention, but it is not a proof for shuffled
    batches: Chua et al. (2024, "How private are DP-SGD implementations?") show that shuffling
    can leak more than that accounting says. Prefer `PoissonSampler` for reported results.

    Privacy:
        Under replace-one neighbouring the clipped sum has L2 sensitivity 2C, so a step with
        noise std ``sigma * C`` is accounted as ``GaussianDpEvent(sigma / 2)``
        (`dpft.privacy.accounting.GaussianSteps` with ``sampling='shuffle'``).
    """

    num_examples: int
    batch_size: int
    seed: int

    def __post_init__(self):
        _check_dataset(self.num_examples)
        if not (isinstance(self.batch_size, int) and 0 < self.batch_size <= self.num_examples):
            raise ValueError(
                f"batch_size must be an int in [1, num_examples={self.num_examples}], "
                f"got {self.batch_size!r}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    @property
    def expected_batch_size(self) -> float:
        return float(self.batch_size)

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.num_examples

    def batch_at(self, step: int) -> IndexBatch:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        idx = perm[i * self.batch_size : (i + 1) * self.batch_size].astype(np.int64)
        return IndexBatch(np.sort(idx), np.ones(self.batch_size, bool))


@dataclasses.dataclass
class CyclicPoissonSampler(_StepSampler):
    """Cyclic Poisson sampling over ``num_partitions`` fixed partitions (BandMF's sampler).

    Every example is assigned to one of b = ``num_partitions`` partitions, independently and
    uniformly at random from ``assignment_seed`` (a fixed, public assignment: keep it
    ``config.seed``, also in secure mode). Step t draws a Poisson sample of rate
    ``sampling_rate`` from partition ``t mod b``, padded to ``max_batch_size`` rows and
    truncated like `PoissonSampler` if it overflows (by default the cap is the one of the
    largest partition at overflow probability 1e-12). The draw of step t comes from a
    generator seeded with ``[seed, t]``, so the sampler is a pure function of (seed, step) and
    resumes exactly. ``num_partitions = 1`` samples like `PoissonSampler`.

    Privacy:
        Under add/remove-one neighbouring the partition of an example is independent of the
        data, and the example can be sampled only at steps ``k, k+b, k+2b, ...`` of its
        partition k: b-min-separated participation, at most ``ceil(n / b)`` of n steps, each
        with probability q independently. With a b-banded correlation matrix this is the
        sampling of `dpft.privacy.correlated.banded_entry`'s accounting. The sampled indices
        are private; the assignment is not.
    """

    num_examples: int
    sampling_rate: float
    num_partitions: int
    seed: int
    assignment_seed: int = 0
    max_batch_size: int | None = None

    def __post_init__(self):
        _check_dataset(self.num_examples)
        _check_rate(self.sampling_rate)
        b = self.num_partitions
        if not (isinstance(b, int | np.integer) and 1 <= b <= self.num_examples):
            raise ValueError(
                f"num_partitions must be an int in [1, num_examples={self.num_examples}], got {b!r}"
            )
        self.partitions = partition_members(self.num_examples, int(b), self.assignment_seed)
        self.max_batch_size = checked_cap(
            self.max_batch_size, self.max_partition_size, self.sampling_rate
        )

    @property
    def max_partition_size(self) -> int:
        return max(len(p) for p in self.partitions)

    @property
    def expected_batch_size(self) -> float:
        """The public expected batch size over a cycle: ``q N / b``."""
        return self.num_examples * self.sampling_rate / self.num_partitions

    @property
    def overflow_prob(self) -> float:
        return overflow_probability(
            self.max_partition_size, self.sampling_rate, self.max_batch_size
        )

    def batch_at(self, step: int) -> IndexBatch:
        members = self.partitions[step % self.num_partitions]
        rng = np.random.default_rng([self.seed, step])
        chosen = truncated_poisson(rng, len(members), self.sampling_rate, self.max_batch_size)
        return _padded(members[chosen], self.max_batch_size)  # members are sorted


def partition_members(
    num_examples: int, num_partitions: int, assignment_seed: int
) -> list[np.ndarray]:
    """The sorted example indices of each of the ``num_partitions`` cyclic partitions.

    Example i goes to partition ``a_i``, the a_i i.i.d. uniform on ``[0, num_partitions)``
    from a generator seeded with ``[assignment_seed, num_partitions, 1]`` (three words, so it
    never equals a step generator ``[seed, step]``).
    """
    _check_dataset(num_examples)
    rng = np.random.default_rng([int(assignment_seed), int(num_partitions), 1])
    assignment = rng.integers(0, num_partitions, size=num_examples)
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(num_partitions + 1))
    return [order[bounds[k] : bounds[k + 1]].astype(np.int64) for k in range(num_partitions)]


def expected_steps_per_epoch(sampling_rate: float) -> int:
    """Steps whose expected examples add up to one pass over the data: ceil(1 / q)."""
    _check_rate(sampling_rate)
    return math.ceil(1.0 / sampling_rate - 1e-9)
