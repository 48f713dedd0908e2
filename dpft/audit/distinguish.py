"""Two-dataset audit over many runs: can an observer tell D from D' = D + {target}?

The one-run audit (`mechanism`) guesses the membership of many canaries in ONE run. It cannot
see a bug whose leak is a *count*, such as dividing the noisy sum by the realised batch size:
the count says how many canaries were sampled, not which. The classic audit (Jagielski,
Ullman & Oprea 2020; Nasr et al. 2021) catches it: run the mechanism R times on a dataset D
and R times on its neighbour D' (D plus one target example, add/remove neighbouring), look at
what a user would publish (the final parameters), and test which dataset produced each run.

Any test with false-positive rate a = P_D[S] and true-positive rate b = P_D'[S] on a set S of
outputs must satisfy, under (eps, delta)-DP, ``b <= e^eps a + delta`` and ``a <= e^eps b +
delta``. So ``eps >= log((b - delta) / a)`` (and symmetrically). With Clopper-Pearson bounds
on a and b this is a lower bound on eps that holds with confidence 1 - beta.

Selection. The statistic, the threshold and the side are chosen on the first half of the runs
and the bound is computed on the second half only, so the choice costs no union bound.
Statistics of the final parameters ``w_T``, fixed before any run:

* ``target``: the target's coordinate, ``-w_T[target] / lr`` (large when the target was in);
* ``scale``: ``-log std(w_T[free])``, the noise level of coordinates no example touches. A
  correct mechanism's noise does not depend on the data; dividing by the realised batch size
  makes it shrink with every extra example, so it counts them.

White-box model, dpft's real DP-SGD (`mechanism.build_mechanism`): D holds ``num_real`` real
examples with random gradients of norm about C, the target is a dirac gradient of norm
``canary_scale * C``. Runs are vectorised with ``jax.vmap`` (one noise key per run).

Shuffled fixed-size batches (``sampling='shuffle'``) are accounted under replace-one, so the
neighbours are D = real + {-target} and D' = real + {target}: the same size N, and the clipped
sum moves by 2C. Each run draws a fresh permutation per epoch (``jax.random.permutation``,
batches of ``round(q N)`` as in `ShuffleSampler`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dpft.audit.broken import unhalved_shuffle_epsilon
from dpft.audit.config import WhiteBoxSetup
from dpft.audit.mechanism import build_mechanism, calibrate
from dpft.privacy import keys
from dpft.privacy.accounting import calibrate_noise_multiplier
from dpft.privacy.noise import PrivatizerState
from dpft.train.step import TrainState

__all__ = [
    "STATISTICS",
    "DistinguishConfig",
    "DistinguishResult",
    "clopper_pearson",
    "run_distinguishing_audit",
    "threshold_bound",
]

STATISTICS = ("target", "scale")
# Controls of `mechanism.BROKEN` this audit runs (ghost norms and truncation: one-run only).
SUPPORTED = ("none", "noise", "clip", "realized_batch", "shuffle_sigma")


@dataclasses.dataclass(frozen=True)
class DistinguishConfig(WhiteBoxSetup):
    """Settings of a two-dataset audit.

    Attributes:
      epsilon, delta: the claimed guarantee; sigma is calibrated to it with dpft's accountant.
      runs: R, training runs on EACH of D and D' (half select the test, half bound it).
      steps: T, DP-SGD steps per run.
      sampling_rate: Poisson rate q (1.0 means full batch), or for ``sampling='shuffle'`` the
        batch fraction: batches of ``round(q N)``, N = num_real + 1.
      sampling: 'poisson' (D' = D + {target}) or 'shuffle' (replace-one: D = real +
        {-target}, D' = real + {target}).
      num_real: the real examples (|D| for Poisson). A tiny D makes a count leak large (the
        realised-batch bug).
      broken: 'none' or one of `SUPPORTED` ('shuffle_sigma' needs sampling='shuffle').
      beta: 1 - confidence of the lower bound.
      real_dim, free_dim, clip_norm, canary_scale, learning_rate, seed: the white-box model
        and the run (`WhiteBoxSetup`).
    """

    runs: int = 2000

    def __post_init__(self):
        self.check_shared()
        if not (isinstance(self.runs, int) and self.runs >= 20):
            raise ValueError(f"runs must be an int >= 20, got {self.runs!r}")
        if self.broken not in SUPPORTED:
            raise ValueError(
                f"the two-dataset audit runs broken in {SUPPORTED}, got {self.broken!r} "
                "(use the one-run audit)"
            )
        if self.free_dim < 2:
            raise ValueError(f"free_dim must be >= 2, got {self.free_dim!r}")

    @property
    def batch_size(self) -> int:
        """Shuffled batches: round(q N) of the N = num_real + 1 examples."""
        return max(1, int(round(self.sampling_rate * (self.num_real + 1))))

    @property
    def expected_batch_size(self) -> float:
        """A public normaliser, the same for D and D': q * (|D| + 1/2), or the shuffle batch."""
        if self.shuffle:
            return float(self.batch_size)
        return self.sampling_rate * (self.num_real + 0.5)


@dataclasses.dataclass(frozen=True)
class DistinguishResult:
    """Outcome of `run_distinguishing_audit`."""

    config: DistinguishConfig
    claimed_epsilon: float
    noise_multiplier: float
    lower_bound: float  # eps lower bound, confidence 1 - beta
    statistic: str  # chosen on the selection half
    false_positive: int  # on the evaluation half: runs on D the test called D'
    true_positive: int  # runs on D' the test called D'
    evaluation_runs: int  # runs per dataset in the evaluation half


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds (lower, upper) for a binomial rate, each at level alpha."""
    if not (0 <= k <= n and n > 0):
        raise ValueError(f"need 0 <= k <= n, n > 0; got k={k}, n={n}")
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def threshold_bound(pos: int, neg: int, n: int, delta: float, alpha: float) -> float:
    """eps lower bound from a test that fires on ``pos`` of n D'-runs and ``neg`` of n D-runs.

    Reasoning:
        (eps, delta)-DP gives ``P_D'[S] <= e^eps P_D[S] + delta``. With probability
        >= 1 - 2 alpha, ``P_D'[S] >= lower(pos)`` and ``P_D[S] <= upper(neg)``, hence
        ``eps >= log((lower(pos) - delta) / upper(neg))``. Swap the arguments for the other
        direction.
    """
    b_lo, _ = clopper_pearson(pos, n, alpha)
    _, a_hi = clopper_pearson(neg, n, alpha)
    if b_lo - delta <= 0:
        return 0.0
    return max(0.0, math.log((b_lo - delta) / a_hi))


def _cp_lower(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    k = np.asarray(k, np.float64)
    out = stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1)
    return np.where(k == 0, 0.0, out)


def _cp_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    k = np.asarray(k, np.float64)
    out = stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1))
    return np.where(k == n, 1.0, out)


def _bounds(pos: np.ndarray, neg: np.ndarray, n: int, delta: float, alpha: float) -> np.ndarray:
    """Vectorised `threshold_bound`."""
    num = _cp_lower(pos, n, alpha) - delta
    den = _cp_upper(neg, n, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.log(np.where(num > 0, num, 1.0) / den)
    return np.where(num > 0, np.maximum(eps, 0.0), 0.0)


def _fires(s: np.ndarray, t, side: str):
    """How many of ``s`` fall in S = {s > t} or {s <= t} (``t`` scalar or array)."""
    s = np.sort(s)
    below = np.searchsorted(s, t, side="right")  # count of s <= t
    return s.size - below if side == ">" else below


def _best_test(stats_d: dict, stats_dp: dict, delta: float, alpha: float, num: int = 256):
    """On the selection half: the (statistic, threshold, side, swap) with the largest bound.

    Candidates: sets S = {s > t} or {s <= t} for ``num`` thresholds t at quantiles of the pooled
    statistic, each read as "S says D'" (swap False) or "S says D" (swap True).
    """
    best, best_eps = None, -1.0
    for name in STATISTICS:
        s_d, s_dp = stats_d[name], stats_dp[name]
        n = s_d.size
        pooled = np.sort(np.concatenate([s_d, s_dp]))
        ts = np.unique(pooled[np.linspace(0, pooled.size - 1, num).astype(int)])
        for side in (">", "<="):
            a, b = _fires(s_d, ts, side), _fires(s_dp, ts, side)
            for swap in (False, True):
                pos, neg = (a, b) if swap else (b, a)
                eps = _bounds(pos, neg, n, delta, alpha)
                i = int(np.argmax(eps))
                if eps[i] > best_eps:
                    best, best_eps = (name, float(ts[i]), side, swap), float(eps[i])
    return best


def _statistics(w: np.ndarray, cfg: DistinguishConfig, target: int) -> dict:
    free = w[:, cfg.real_dim + 1 :]
    return {
        "target": -w[:, target] / cfg.learning_rate,
        "scale": -np.log(np.maximum(free.std(axis=1), 1e-30)),
    }


def _with_key(opt_state, key_data: jax.Array):
    """Replaces the privatizer's key inside an optimizer state (one noise stream per run)."""

    def swap(x):
        return x._replace(key=key_data) if isinstance(x, PrivatizerState) else x

    return jax.tree_util.tree_map(swap, opt_state, is_leaf=lambda x: isinstance(x, PrivatizerState))


def _final_params(
    cfg: DistinguishConfig, sigma: float, data: np.ndarray, n: int, key
) -> np.ndarray:
    """Final parameters of ``cfg.runs`` independent runs on the first ``n`` rows of ``data``.

    Run ``r`` uses ``keys.derive(key, "audit", r)``; under it "noise" keys the privatizer,
    "examples" the per-step example keys and "audit" the step's (or epoch's) sampling.
    """
    init, step = build_mechanism(
        cfg.broken, sigma, cfg.clip_norm, cfg.learning_rate, cfg.expected_batch_size, key
    )
    d = data.shape[1]
    g = jnp.asarray(data)
    rows = data.shape[0]
    present = jnp.asarray(np.arange(rows) < n, jnp.float32)
    q, b = cfg.sampling_rate, cfg.batch_size
    per_epoch = max(1, n // b)

    def mask_at(run_key, t):
        if cfg.shuffle:  # epoch's permutation; batch i of it (the remainder is dropped)
            epoch, i = divmod(t, per_epoch)
            perm = jax.random.permutation(keys.derive(run_key, "audit", epoch), n)
            chosen = jax.lax.dynamic_slice(perm, (i * b,), (b,))
            return jnp.zeros(rows, jnp.float32).at[chosen].set(1.0)
        if q < 1:
            coin = jax.random.bernoulli(keys.derive(run_key, "audit", t), q, present.shape)
            return present * coin.astype(jnp.float32)
        return present

    def one_run(run_key):
        params = {"w": jnp.zeros((d,), jnp.float32)}
        opt = _with_key(init(params), keys.derive(run_key, "noise"))
        state = TrainState(jnp.zeros([], jnp.int32), params, opt, {})
        for t in range(cfg.steps):
            batch = {"g": g, "mask": mask_at(run_key, t)}
            state, _ = step(state, batch, keys.derive(run_key, "examples", t))
        return state.params["w"]

    run_keys = jax.vmap(lambda r: keys.derive(key, "audit", r))(jnp.arange(cfg.runs))
    return np.asarray(jax.jit(jax.vmap(one_run))(run_keys), np.float64)


def _noise_multiplier(cfg: DistinguishConfig) -> float:
    """sigma calibrated to the claim by dpft's accountant (or the broken shuffle accounting)."""
    if not cfg.shuffle:
        q = cfg.sampling_rate
        acct = {"sampling": "full"} if q == 1 else {"sampling": "poisson"}
        return calibrate_noise_multiplier(cfg.epsilon, cfg.delta, q, cfg.steps, **acct)
    n, b = cfg.num_real + 1, cfg.batch_size
    if cfg.broken == "shuffle_sigma":
        return calibrate(
            lambda s: unhalved_shuffle_epsilon(s, n, b, cfg.steps, cfg.delta), cfg.epsilon
        )
    acct = {"sampling": "shuffle", "dataset_size": n, "max_batch_size": b}
    return calibrate_noise_multiplier(cfg.epsilon, cfg.delta, b / n, cfg.steps, **acct)


def run_distinguishing_audit(cfg: DistinguishConfig) -> DistinguishResult:
    """Trains R runs on D and R on D', then bounds epsilon from the best held-out test.

    Reasoning:
        If the implementation is (claimed eps, delta)-DP, every fixed test on the evaluation
        half satisfies the DP inequality, and the test is fixed (by the selection half) before
        the evaluation half is looked at; so with probability >= 1 - beta the returned bound is
        <= the claimed epsilon. A bound above the claim is statistical evidence of a bug.
    """
    rng = np.random.default_rng([cfg.seed, 0xD15C])
    c = cfg.clip_norm
    sigma = _noise_multiplier(cfg)

    d = cfg.real_dim + 1 + cfg.free_dim
    target = cfg.real_dim
    data = np.zeros((cfg.num_real + 1, d), np.float32)
    real = rng.normal(size=(cfg.num_real, cfg.real_dim))
    real *= c * rng.uniform(0.5, 2.0, size=(cfg.num_real, 1))
    real /= np.maximum(np.linalg.norm(real, axis=1, keepdims=True), 1e-12)
    data[: cfg.num_real, : cfg.real_dim] = real
    data[cfg.num_real, target] = cfg.canary_scale * c  # the target: D' = D + this row
    if cfg.shuffle:  # replace-one: D holds -target in the same row
        data_d, n_d = data.copy(), cfg.num_real + 1
        data_d[cfg.num_real, target] = -cfg.canary_scale * c
    else:
        data_d, n_d = data, cfg.num_real

    root = keys.derive(keys.root_key(cfg.seed), "audit")
    w_d = _final_params(cfg, sigma, data_d, n_d, keys.derive(root, "audit", 0))
    w_dp = _final_params(cfg, sigma, data, cfg.num_real + 1, keys.derive(root, "audit", 1))
    s_d, s_dp = _statistics(w_d, cfg, target), _statistics(w_dp, cfg, target)

    half = cfg.runs // 2
    alpha = cfg.beta / 2  # one half for each Clopper-Pearson bound
    sel_d = {k: v[:half] for k, v in s_d.items()}
    sel_dp = {k: v[:half] for k, v in s_dp.items()}
    name, t, side, swap = _best_test(sel_d, sel_dp, cfg.delta, alpha)
    ev_d, ev_dp = s_d[name][half:], s_dp[name][half:]
    n = ev_d.size
    a, b = int(_fires(ev_d, t, side)), int(_fires(ev_dp, t, side))
    pos, neg = (a, b) if swap else (b, a)
    eps = threshold_bound(pos, neg, n, cfg.delta, alpha)
    return DistinguishResult(cfg, cfg.epsilon, float(sigma), eps, name, neg, pos, n)
