"""The strategy of banded matrix-factorization noise (`dpft.privacy.correlated`).

``C`` is a b-banded lower-triangular Toeplitz matrix with coefficients ``c_0 = 1, c_1, ...,
c_{b-1}``; the mechanism releases ``C X + Z`` for the clipped gradient sums ``X``, that is adds
``C^{-1} Z`` to ``X``. `optimal_banded_coefs` picks the coefficients that minimise the total
squared error of the prefix sums (the workload of SGD's iterates), ``||c||^2 ||A C^{-1}||_F^2``
(the column norm ``||c||`` is the sensitivity factor), with scipy's L-BFGS-B in float64 on the
host: a one-off problem of ``b`` variables whose inverse can grow fast, so double precision
matters and no device is needed. ``C^{-1}`` is Toeplitz too, so the objective and its gradient
cost O(n b).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import optimize, signal

__all__ = [
    "apply_inverse",
    "band_matrix",
    "check_coefs",
    "column_norm",
    "inverse_coefs",
    "optimal_banded_coefs",
    "prefix_sum_error",
    "prefix_sum_error_grad",
]


def check_coefs(coefs: Sequence[float]) -> np.ndarray:
    """``coefs`` as a float64 vector ``(c_0, ..., c_{b-1})`` with ``c_0 = 1``, all finite."""
    c = np.asarray(coefs, np.float64)
    if c.ndim != 1 or c.size < 1:
        raise ValueError(f"banded coefficients must be a non-empty 1-D sequence, got {coefs!r}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"banded coefficients must be finite, got {coefs!r}")
    if c[0] != 1.0:
        raise ValueError(f"banded coefficients must start with c_0 = 1, got c_0 = {c[0]!r}")
    return c


def band_matrix(coefs: Sequence[float], n: int) -> np.ndarray:
    """The dense n x n lower-triangular Toeplitz matrix ``C[t, t-j] = c_j`` (``j < b``)."""
    c = check_coefs(coefs)
    out = np.zeros((n, n))
    for j, cj in enumerate(c[:n]):
        out += cj * np.eye(n, k=-j)
    return out


def inverse_coefs(coefs: Sequence[float], n: int) -> np.ndarray:
    """First column ``d_0 .. d_{n-1}`` of ``C^{-1}`` (lower-triangular Toeplitz too).

    ``d_0 = 1`` and ``d_k = -sum_{j=1}^{min(k, b-1)} c_j d_{k-j}``: the power series of
    ``1 / c(x)``, computed as the impulse response of the all-pole filter ``1 / c``.
    """
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return apply_inverse(coefs, impulse)


def apply_inverse(coefs: Sequence[float], z: np.ndarray) -> np.ndarray:
    """``C^{-1} z`` along axis 0 (numpy, float64): ``y_t = z_t - sum_{j>=1} c_j y_{t-j}``."""
    c = check_coefs(coefs)
    return signal.lfilter([1.0], c, np.asarray(z, np.float64), axis=0)


def column_norm(coefs: Sequence[float], n: int | None = None) -> float:
    """The largest column L2 norm of C over ``n`` steps: ``||(c_0 .. c_{min(b, n)-1})||_2``.

    Column t of C is ``(c_0, .., c_{b-1})`` placed at rows ``t .. t+b-1``, cut at row n; the
    first column is the longest, so its norm is the maximum (``n=None``: the full band).
    """
    c = check_coefs(coefs)
    if n is not None:
        c = c[: max(1, int(n))]
    return float(np.linalg.norm(c))


def _error_terms(c: np.ndarray, n: int):
    d = signal.lfilter([1.0], c, np.eye(1, n)[0])  # C^{-1} first column
    e = np.cumsum(d)  # (A C^{-1}) first column: A C^{-1} is lower-triangular Toeplitz too
    w = np.arange(n, 0, -1, dtype=np.float64)  # entry k of the first column appears n - k times
    return d, e, w


def prefix_sum_error(coefs: Sequence[float], n: int) -> float:
    """``||c||^2 ||A C^{-1}||_F^2``: total squared error of the n prefix sums per unit variance.

    With release noise of std ``sigma_acct * sensitivity`` (sensitivity ``||c|| * S``) the
    prefix sums of the noisy gradients have total squared error
    ``sigma_acct^2 S^2 * prefix_sum_error``. DP-SGD (``coefs = (1,)``) gives ``n (n+1) / 2``.
    """
    c = check_coefs(coefs)
    _, e, w = _error_terms(c, n)
    return float(np.dot(c, c) * np.dot(w, e * e))


def prefix_sum_error_grad(coefs: Sequence[float], n: int) -> np.ndarray:
    """Gradient of `prefix_sum_error` in ``c_0 .. c_{b-1}`` (exact, O(n b) plus one O(n^2)).

    With ``f = ||A C^{-1}||_F^2 = sum_k w_k e_k^2``, ``e = cumsum(d)``, ``d = C^{-1} delta_0``:
    ``dC / dc_j`` is the shift ``S_j`` and lower-triangular Toeplitz matrices commute, so
    ``dd / dc_j = -C^{-1} S_j C^{-1} delta_0 = -S_j u`` with ``u = C^{-1} d``. Then
    ``df / dc_j = -sum_m u_m G_{m+j}``, ``G_i = sum_{k >= i} 2 w_k e_k``.
    """
    c = check_coefs(coefs)
    d, e, w = _error_terms(c, n)
    f = float(np.dot(w, e * e))
    u = signal.lfilter([1.0], c, d)
    big_g = np.cumsum((2.0 * w * e)[::-1])[::-1]
    df = np.array([-np.dot(u[: n - j], big_g[j:]) if j < n else 0.0 for j in range(c.size)])
    return 2.0 * c * f + np.dot(c, c) * df


def _sqrt_coefs(band: int) -> np.ndarray:
    """The first ``band`` coefficients of ``(1 - x)^{-1/2}``: the Toeplitz square root of A."""
    k = np.arange(1, band)
    return np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])


def optimal_banded_coefs(n: int, band: int, maxiter: int = 500) -> np.ndarray:
    """Coefficients ``(1, c_1, .., c_{b-1})`` of a b-banded Toeplitz C minimising the error.

    Minimises `prefix_sum_error` (``||A C^{-1}||_F^2`` under the column-norm sensitivity, for
    the prefix-sum workload of ``n`` steps) with scipy's L-BFGS-B and the exact gradient,
    starting from the truncated square root of A (kept if the optimiser does not improve on
    it). ``band = 1`` returns ``(1,)``: C = I, DP-SGD.

    Privacy:
        The coefficients depend only on the public ``n`` and ``band``: choosing them costs no
        privacy. The sensitivity of ``C X`` per participation is ``column_norm(coefs)`` times
        the clipped sum's sensitivity under the same neighbouring relation (see `banded_entry`).
    """
    if not (isinstance(n, int | np.integer) and n >= 1):
        raise ValueError(f"steps must be a positive int, got {n!r}")
    if not (isinstance(band, int | np.integer) and 1 <= band <= n):
        raise ValueError(f"band must be an int in [1, steps={n}], got {band!r}")
    start = _sqrt_coefs(int(band))
    if band == 1:
        return start
    scale = n * (n + 1) / 2.0  # DP-SGD's error: the objective relative to it is O(1)

    def fun(tail):
        c = np.concatenate([[1.0], tail])
        with np.errstate(over="ignore", invalid="ignore"):
            val = prefix_sum_error(c, n) / scale
            grad = prefix_sum_error_grad(c, n)[1:] / scale
        if not (np.isfinite(val) and np.all(np.isfinite(grad))):
            return 1e300, np.zeros_like(tail)
        return val, grad

    res = optimize.minimize(
        fun, start[1:], jac=True, method="L-BFGS-B", options={"maxiter": maxiter}
    )
    best = np.concatenate([[1.0], res.x])
    if not prefix_sum_error(best, n) <= prefix_sum_error(start, n):
        return start
    return best
