"""Accounting of hyperparameter tuning: private selection with a random number of repetitions.

Papernot & Steinke (2022, "Hyperparameter tuning with Renyi differential privacy", ICLR) run a
base mechanism Q (pick a candidate, train it, score it) K times, K drawn from a distribution
chosen in advance and independently of the data, and release only the best of the K outputs
(by the score). With K random the total cost is a small multiple of Q's, not K times it:

* ``poisson`` (mean mu): K ~ Poisson(mu) (K = 0 releases nothing), Theorem 6;
* ``tnb`` (eta, gamma): the truncated negative binomial, P(K = k) proportional to
  ``C(k + eta - 1, k) (1 - gamma)^k`` for k >= 1, Theorem 2; ``eta = 1`` is the geometric
  distribution (``geometric``, mean 1/gamma) and ``eta = 0`` the logarithmic one
  (``logarithmic``).

`Repetitions` holds the distribution; `draw_repetitions` draws K from the OS CSPRNG (through
`dpft.privacy.keys.draw_secret`), or from a given ``random.Random`` for tests; `draw_index`
draws a candidate. `total_epsilon` accounts a base `DpEvent` repeated that way,
`ledger_total_epsilon` the ledger entries of one DP-SGD run (with its batch-cap truncation
charge) and `release_total_epsilon` the Gaussian releases of one feature-method run.

RDP only: dp-accounting evaluates ``RepeatAndSelectDpEvent`` with its RDP accountant alone (its
PLD accountant has no rule for it), so the base mechanism is accounted by its RDP curve and the
total is an RDP-based upper bound, larger than a PLD figure of the base run would suggest. The
guarantee covers the released best output only: K itself and the outputs of the other runs are
not part of it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import secrets
from collections.abc import Sequence

import dp_accounting as dpa
from dp_accounting import dp_event as dp_event_lib
from dp_accounting import rdp

from dpft.privacy import keys
from dpft.privacy.accounting import (
    _OVERFLOW_SHARE_OF_DELTA,
    GaussianSteps,
    _charged_epsilon,
    _check_delta,
    _quiet_absl,
    dp_event,
    neighboring_of,
)
from dpft.privacy.releases import dp_event as releases_dp_event

__all__ = [
    "DISTRIBUTIONS",
    "Repetitions",
    "draw_index",
    "draw_repetitions",
    "ledger_total_epsilon",
    "parse_repetitions",
    "release_rdp_epsilon",
    "release_total_epsilon",
    "repeated_event",
    "total_epsilon",
]

DISTRIBUTIONS = ("poisson", "tnb", "geometric", "logarithmic")
_MAX_K = 1 << 20  # the inverse-CDF search never goes further (far into any usable tail)


@dataclasses.dataclass(frozen=True)
class Repetitions:
    """The distribution of the number K of runs of the base mechanism.

    Attributes:
      distribution: ``poisson`` (parameter ``mu``), ``tnb`` (``eta`` > 0 and ``gamma``),
        ``geometric`` (``gamma``; tnb with eta = 1) or ``logarithmic`` (``gamma``; eta = 0).
      mu: the Poisson mean (>= 1: dp-accounting's bound needs it).
      eta: the truncated negative binomial's shape.
      gamma: its halting probability, in (0, 1]; gamma = 1 gives K = 1.
    """

    distribution: str
    mu: float | None = None
    eta: float | None = None
    gamma: float | None = None

    def __post_init__(self):
        d = self.distribution
        if d not in DISTRIBUTIONS:
            raise ValueError(f"repetitions must be one of {DISTRIBUTIONS}, got {d!r}")
        if d == "poisson":
            if self.mu is None or not (math.isfinite(self.mu) and self.mu >= 1):
                raise ValueError(f"poisson repetitions need a mean mu >= 1, got {self.mu!r}")
            return
        if self.gamma is None or not 0 < self.gamma <= 1:
            raise ValueError(f"{d} repetitions need gamma in (0, 1], got {self.gamma!r}")
        fixed = {"geometric": 1.0, "logarithmic": 0.0}.get(d)
        if fixed is not None:
            object.__setattr__(self, "eta", fixed)
        elif self.eta is None or not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"tnb repetitions need eta > 0, got {self.eta!r}")
        if self.eta == 0 and self.gamma == 1:
            raise ValueError("logarithmic repetitions need gamma < 1")

    @property
    def shape(self) -> float:
        """dp-accounting's ``shape``: inf for Poisson, else eta."""
        return math.inf if self.distribution == "poisson" else float(self.eta)

    @property
    def mean(self) -> float:
        """E[K]."""
        if self.distribution == "poisson":
            return float(self.mu)
        g, e = float(self.gamma), float(self.eta)
        if g == 1:
            return 1.0
        if e == 0:
            return (1 - 1 / g) / math.log(g)
        return e * (1 / g - 1) / (-math.expm1(e * math.log(g)))

    def log_pmf(self, k: int) -> float:
        """log P(K = k) (-inf outside the support)."""
        if self.distribution == "poisson":
            if k < 0:
                return -math.inf
            mu = float(self.mu)
            return k * math.log(mu) - mu - math.lgamma(k + 1)
        if k < 1:
            return -math.inf
        g, e = float(self.gamma), float(self.eta)
        if g == 1:
            return 0.0 if k == 1 else -math.inf
        if e == 0:
            return k * math.log1p(-g) - math.log(k) - math.log(-math.log(g))
        log_binom = math.lgamma(k + e) - math.lgamma(e) - math.lgamma(k + 1)
        log_norm = math.log(-math.expm1(e * math.log(g)))  # log(1 - gamma^eta)
        return log_binom + k * math.log1p(-g) + e * math.log(g) - log_norm

    def pmf(self, k: int) -> float:
        return math.exp(self.log_pmf(k))

    def to_dict(self) -> dict:
        out = {"distribution": self.distribution, "mean": self.mean}
        if self.distribution == "poisson":
            out["mu"] = self.mu
        else:
            out.update(eta=self.eta, gamma=self.gamma)
        return out


def parse_repetitions(text: str) -> Repetitions:
    """``poisson:MU``, ``tnb:ETA,GAMMA``, ``geometric:GAMMA`` or ``logarithmic:GAMMA``."""
    name, _, params = str(text).partition(":")
    try:
        values = [float(v) for v in params.split(",")] if params else []
    except ValueError:
        values = None
    want = {"poisson": 1, "tnb": 2, "geometric": 1, "logarithmic": 1}.get(name)
    if want is None or values is None or len(values) != want:
        raise ValueError(
            f"--repetitions must be poisson:MU, tnb:ETA,GAMMA, geometric:GAMMA or "
            f"logarithmic:GAMMA, got {text!r}"
        )
    if name == "poisson":
        return Repetitions("poisson", mu=values[0])
    if name == "tnb":
        return Repetitions("tnb", eta=values[0], gamma=values[1])
    return Repetitions(name, gamma=values[0])


def _secure_uniform() -> float:
    """A uniform float in [0, 1) with 53 random bits of `keys.draw_secret`."""
    return (keys.draw_secret() >> (keys.SECRET_BITS - 53)) * 2.0**-53


def draw_repetitions(repetitions: Repetitions, rng: random.Random | None = None) -> int:
    """K drawn from ``repetitions`` by inversion of its CDF.

    ``rng=None`` (what a tuning run uses) draws the uniform from the OS CSPRNG; a seeded
    ``random.Random`` makes the draw reproducible (tests only).

    Privacy:
        The bounds of `total_epsilon` hold when K is drawn from ``repetitions`` independently
        of the data and kept secret: K is not part of the released output. With ``rng=None`` K
        is unpredictable (OS randomness); the caller must persist it before the first run and
        reuse it on resume, since drawing again after seeing results would choose K
        adaptively.
    """
    u = _secure_uniform() if rng is None else rng.random()
    k = 0 if repetitions.distribution == "poisson" else 1
    cdf = 0.0
    while k < _MAX_K:
        cdf += repetitions.pmf(k)
        if u < cdf:
            return k
        k += 1
    return k


def draw_index(n: int, rng: random.Random | None = None) -> int:
    """A uniform index in [0, n): the candidate of one run (OS CSPRNG unless ``rng`` given).

    Privacy:
        Each run's candidate must be drawn independently of the data (and of the other runs'
        results) for the base mechanism to be a fixed random mechanism Q repeated K times.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"need at least one candidate, got {n!r}")
    return secrets.randbelow(n) if rng is None else rng.randrange(n)


def repeated_event(base: dpa.DpEvent, repetitions: Repetitions) -> dpa.DpEvent:
    """dp-accounting's event of ``base`` repeated K ~ ``repetitions`` times, best released.

    Privacy:
        Describes the mechanism of `total_epsilon`: K independent runs of the base (whose
        events carry its sensitivity and neighbouring relation), K drawn independently of the
        data, only the best output released. dp-accounting's RDP accountant evaluates it; its
        PLD accountant does not.
    """
    return dp_event_lib.RepeatAndSelectDpEvent(base, repetitions.mean, repetitions.shape)


def total_epsilon(
    base: dpa.DpEvent,
    repetitions: Repetitions,
    delta: float,
    neighboring: dpa.NeighboringRelation = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
) -> float:
    """Epsilon at ``delta`` of releasing the best of K runs of ``base`` (RDP upper bound).

    Privacy:
        For a base mechanism Q whose DpEvent is ``base`` under ``neighboring`` (its
        sensitivity and relation are those of the events inside it), running Q K times with
        K ~ ``repetitions`` drawn independently of the data, each run with fresh independent
        randomness, and releasing only the best output by a score that Q outputs, is
        (epsilon, delta)-DP with the returned epsilon (Papernot & Steinke 2022, Theorems 2
        and 6, via dp-accounting's RDP accountant on ``RepeatAndSelectDpEvent``). The base is
        accounted by its RDP curve (PLD has no rule for repeated selection), so the total is
        an RDP-based upper bound; inf if the base has none.
    """
    _check_delta(delta)
    acc = rdp.RdpAccountant(neighboring_relation=neighboring)
    acc.compose(repeated_event(base, repetitions))
    with _quiet_absl():  # RDP drops orders it cannot evaluate: still an upper bound
        return float(acc.get_epsilon(delta))


def ledger_total_epsilon(
    entries: Sequence[GaussianSteps], repetitions: Repetitions, delta: float
) -> float:
    """`total_epsilon` of a DP-SGD run given by its ledger entries, truncation charged.

    Privacy:
        The base is the composition of the entries' subsampled Gaussian steps (sensitivity C
        under add/remove-one for Poisson and full-batch entries, 2C under replace-one for
        shuffled ones; `GaussianSteps.event`). A capped Poisson batch makes each run within
        total variation eta of the uncapped run (eta' on a neighbour); coupling each of the K
        runs with its uncapped twin, the tuned release is within E[K] eta (E[K] eta') of the
        uncapped one, so epsilon is the smallest with
        ``delta_RDP(eps) + E[K] (eta + e^eps eta') <= delta``. A charge ``E[K] eta'`` above
        1% of delta is refused, as for one RDP-accounted run.
    """
    _check_delta(delta)
    entries = [e for e in entries if e.count]
    if not entries:
        raise ValueError("the base run has no DP steps to account")
    if any(e.noise_multiplier == 0 for e in entries):
        return math.inf
    relation = neighboring_of(entries)
    mean = repetitions.mean
    eta = mean * sum(e.overflow() for e in entries)
    eta_neighbour = mean * sum(e.overflow(extra_examples=1) for e in entries)
    if eta_neighbour == 0:
        return total_epsilon(dp_event(entries), repetitions, delta, relation)
    if eta_neighbour > _OVERFLOW_SHARE_OF_DELTA * delta:
        raise ValueError(
            f"the Poisson batch cap truncates too often for tuning (E[K] x overflow "
            f"probability {eta_neighbour:.3g} > 1% of delta): raise train.max_batch_size"
        )
    acc = rdp.RdpAccountant(neighboring_relation=relation)
    acc.compose(repeated_event(dp_event(entries), repetitions))
    with _quiet_absl():
        return _charged_epsilon(acc, delta, eta, eta_neighbour)


def release_total_epsilon(
    noise_multipliers: Sequence[float], repetitions: Repetitions, delta: float
) -> float:
    """`total_epsilon` of a feature-method run given by its releases' noise multipliers.

    Privacy:
        The base is the composition of full-batch Gaussian releases, release j of noise
        multiplier sigma_j (std / L2 sensitivity) under add/remove-one neighbouring
        (`dpft.privacy.releases.dp_event`); a release without noise makes epsilon inf.
    """
    _check_delta(delta)
    if not len(noise_multipliers):
        raise ValueError("the base run has no releases to account")
    if any(s == 0 for s in noise_multipliers):
        return math.inf
    return total_epsilon(releases_dp_event(noise_multipliers), repetitions, delta)


def release_rdp_epsilon(noise_multipliers: Sequence[float], delta: float) -> float:
    """RDP epsilon at ``delta`` of one feature-method run (the base of `release_total_epsilon`).

    Privacy:
        The composition of full-batch Gaussian releases of noise multipliers sigma_j (std / L2
        sensitivity) under add/remove-one neighbouring, accounted with dp-accounting's RDP
        accountant: the figure the tuning total is built on (PLD, which the runs report, is
        tighter for one run).
    """
    _check_delta(delta)
    if any(s == 0 for s in noise_multipliers):
        return math.inf
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(releases_dp_event(noise_multipliers))
    with _quiet_absl():
        return float(acc.get_epsilon(delta))
