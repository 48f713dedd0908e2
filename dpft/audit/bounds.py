"""Statistical side of the one-run audit: from (guesses, correct guesses) to a lower bound on eps.

Reference: Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023
(arXiv:2305.08846): their main theorem for (eps, delta)-DP and the p-value procedure on it.

Setting. ``m`` canaries are each included in the training set independently with probability
1/2 (secret bits ``S_i`` in {-1, +1}). After one training run the auditor guesses the bit of
``r`` of them (abstaining on the rest); ``v`` guesses are correct. If the training run is
(eps, delta)-DP, the number of correct guesses ``W`` satisfies, for every ``v``,

    P[W >= v] <= P[Bin(r, p) >= v] + 2 m delta * max_{i = 1..v} P[v - i <= Bin(r, p) < v] / i

where Bin = Binomial and ``p = e^eps / (1 + e^eps)``, the accuracy of eps-randomised
response. For delta = 0 this is stochastic dominance by Binomial(r, p). The right-hand side is
a p-value for the null hypothesis "the run is (eps, delta)-DP"; the audit reports the largest
eps it rejects at level beta. That eps is a lower bound on the true epsilon with confidence
1 - beta.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = [
    "GuessBound",
    "best_lower_bound",
    "default_guess_grid",
    "epsilon_lower_bound",
    "guess_counts",
    "p_value",
]


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[W >= v] under (epsilon, delta)-DP (Steinke et al., main theorem).

    Args:
      m: number of canaries (each included independently with probability 1/2).
      r: number of guesses made (abstentions excluded).
      v: number of correct guesses.
      epsilon, delta: the null hypothesis' DP guarantee.

    Reasoning:
        Under pure eps-DP every guess, even conditioned on all the other bits and guesses, is
        correct with probability at most ``p = e^eps / (1 + e^eps)``, so W is stochastically
        dominated by Binomial(r, p): the first term. delta > 0 lets each of the m canaries
        "fail" with total mass delta on each side; the paper shows the failure can shift at most
        ``2 m delta`` of mass and only by moving probability from below v to >= v, which costs at
        most ``max_i P[v - i <= Binomial(r, p) < v] / i`` per unit of shifted mass.
    """
    _check_counts(m, r, v)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    # cum[i-1] = P[v - i <= Binomial(r, p) < v] for i = 1..v
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)
    cum = np.cumsum(below)
    alpha = float(np.max(cum / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float = 0.0, beta: float = 0.05, tol: float = 1e-6
) -> float:
    """Largest eps whose (eps, delta)-DP null hypothesis is rejected at level ``beta``.

    Returns 0 when even eps = 0 is not rejected. ``p_value`` is non-decreasing in eps, so
    bisection applies: the invariant is ``p_value(lo) < beta <= p_value(hi)``.

    Reasoning:
        If the run were (eps, delta)-DP for some eps <= returned value, seeing >= v correct
        guesses would have had probability < beta. So, with confidence 1 - beta (over the
        canary bits and the run's randomness), the true epsilon at this delta is at least the
        returned value. Choosing (r, v) after looking at the scores needs a union bound: see
        `best_lower_bound`.
    """
    _check_counts(m, r, v)
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # a perfect guesser with a huge r: report a finite, very large bound
            return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(scores: np.ndarray, secrets: np.ndarray, k: int) -> tuple[int, int]:
    """Guess "in" for the k highest scores and "out" for the k lowest; return (r, v).

    ``secrets`` holds the true bits (+1 included, -1 excluded). Ties are broken by position
    (stable sort), which does not depend on the secrets.
    """
    scores = np.asarray(scores, np.float64)
    secrets = np.asarray(secrets)
    m = scores.shape[0]
    if secrets.shape != (m,):
        raise ValueError(f"secrets must have shape ({m},), got {secrets.shape}")
    if not (isinstance(k, int | np.integer) and 0 <= 2 * k <= m):
        raise ValueError(f"k must be an int with 0 <= 2k <= m={m}, got {k!r}")
    order = np.argsort(scores, kind="stable")
    low, high = order[:k], order[m - k :]
    v = int(np.sum(secrets[high] > 0) + np.sum(secrets[low] < 0))
    return 2 * int(k), v


def default_guess_grid(m: int) -> list[int]:
    """k+ = k- values to try: roughly geometric from 5 up to m/2 (at most ~12 values)."""
    grid = {int(round(x)) for x in np.geomspace(5, max(5, m // 2), num=12)}
    return sorted(k for k in grid if 0 < 2 * k <= m)


@dataclasses.dataclass(frozen=True)
class GuessBound:
    """The best bound over a grid of guess counts, and how it was obtained."""

    epsilon: float  # lower bound on epsilon, confidence 1 - beta overall
    k: int  # k+ = k-: guesses per side for the best bound
    r: int  # guesses made (2k)
    v: int  # correct guesses
    m: int  # canaries
    beta: float  # overall confidence parameter
    grid: tuple[int, ...]  # the k values tried


def best_lower_bound(
    scores: np.ndarray,
    secrets: np.ndarray,
    delta: float = 0.0,
    beta: float = 0.05,
    grid: Sequence[int] | None = None,
) -> GuessBound:
    """Max over ``k`` in ``grid`` of the bound for "top k in, bottom k out" guesses.

    Reasoning:
        Picking the best k after seeing which guesses were right is a data-dependent choice.
        Each k's test is run at level ``beta / len(grid)``; by a union bound, the probability
        that ANY of them rejects a true null is <= beta, so the maximum is still a valid lower
        bound with confidence 1 - beta.
    """
    secrets = np.asarray(secrets)
    m = secrets.shape[0]
    ks = list(grid) if grid is not None else default_guess_grid(m)
    if not ks:
        raise ValueError(f"no valid k for m={m}")
    level = beta / len(ks)
    best = None
    for k in ks:
        r, v = guess_counts(scores, secrets, int(k))
        eps = epsilon_lower_bound(m, r, v, delta, level)
        if best is None or eps > best.epsilon:
            best = GuessBound(eps, int(k), r, v, m, beta, tuple(int(x) for x in ks))
    return best
