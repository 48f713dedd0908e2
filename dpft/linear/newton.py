"""DP Newton steps for multinomial (softmax) logistic regression with a shared d x d curvature.

The objective is ``L(theta) = (1/n) sum_i CE(theta; x_i, y_i) + (reg / 2) ||theta||_F^2`` over the
stacked parameters theta = [W; b] [d + 1, K] on augmented clipped features ``x~ = [x, 1]`` (the
bias is regularised too). Its exact Hessian, ``(1/n) sum_i (diag(p_i) - p_i p_i^T) kron x~_i
x~_i^T + reg I``, is (d + 1) K square: too big for K = 1000, d = 4096. We replace each example's
K x K factor by a scalar multiple of the identity that dominates it:

* Boehning's bound (Boehning 1992, "Multinomial logistic regression algorithm", Ann. Inst. Stat.
  Math.): ``diag(p) - p p^T <= (1/2)(I - 1 1^T / K) <= (1/2) I`` for every p;
* an adaptive, per-iterate version: by Gershgorin's theorem, ``lambda_max(diag(p) - p p^T) <=
  max_k 2 p_k (1 - p_k) =: c(p) <= 1/2`` (row k has diagonal p_k (1 - p_k) and off-diagonal mass
  p_k (1 - p_k)), small once the model is confident.

Either way ``H = (1/n) sum_i c_i x~_i x~_i^T`` (a d + 1 square weighted feature covariance, shared
by all K classes) satisfies ``H kron I_K >= `` the data Hessian at the current iterate, and a step
solves ``(H + reg I) Delta = grad`` for all classes at once. With c_i = 1/2 this is a
majorise-minimise step that decreases L monotonically (Boehning 1992; Krishnapuram et al. 2005,
"Sparse multinomial logistic regression", IEEE TPAMI).

DP second-order methods with noisy gradient and Hessian releases: Avella-Medina, Bradshaw & Loh
2023, "Differentially private inference via noisy optimization" (Ann. Statist.); Ganesh et al.
2023, "Faster differentially private convex optimization via second-order methods" (NeurIPS).

The releases (noisy clipped gradient sums and noisy curvature sums) are made by the DP core
(`dpft.privacy.rows.noisy_head_grad_sum`, `noisy_curvature_sum`); the PSD projection, the solve
and the update here are post-processing.
"""

from __future__ import annotations

import jax
import numpy as np
from scipy import optimize

from dpft.linear.common import (
    LinearParams,
    check_bound,
    check_delta,
    check_key,
    eig_solve,
    psd_eig,
)
from dpft.linear.data import rows_of
from dpft.privacy import keys, releases

__all__ = ["dp_newton", "logistic_regression"]

HESSIANS = ("adaptive", "bohning")


@jax.jit
def _curvature(noisy_sum, n):
    """PSD projection of the noisy curvature sum, normalised: (eigenvalues, eigenvectors)."""
    lam, V = psd_eig(noisy_sum)
    return lam / n, V


@jax.jit
def _step(WB, lam, V, noisy_grad_sum, hp: dict):
    g = noisy_grad_sum / hp["n"] + hp["reg"] * WB
    return WB - hp["damping"] * eig_solve(lam, V, hp["reg"], g)


def dp_newton(
    X,
    y,
    num_classes: int,
    *,
    epsilon: float,
    delta: float,
    feature_clip: float,
    steps: int,
    reg: float,
    key: jax.Array,
    damping: float = 1.0,
    hessian: str = "adaptive",
    hessian_share: float = 0.5,
    clip_norm: float | None = None,
    normalizer: float | None = None,
) -> tuple[LinearParams, dict]:
    """DP Newton-type steps for L2-regularised multinomial logistic regression, from zero.

    Each step t releases a noisy clipped gradient sum g_t and (``hessian='adaptive'``) a noisy
    curvature sum H_t (`dpft.privacy.rows.curvature_sum`); it projects H_t onto the PSD cone and
    updates ``theta -= damping * (H_t / n + reg I)^{-1} (g_t / n + reg theta)``. Release j of
    ``info["releases"]`` draws its noise from ``keys.derive(key, "release", j)``: j = t for the
    gradient of step t, j = steps + t for its curvature. With
    ``hessian='bohning'`` the curvature 1/2 sum_i x~_i x~_i^T does not depend on theta, so it is
    released once and reused (post-processing). ``hessian_share`` is the share of the mu^2 budget
    spent on curvature releases, split evenly over them; the gradients split the rest evenly.

    Args:
      X, y: features [N, d] and labels [N], or a reader of sharded features (`dpft.linear.data`)
        and None (the shards' labels): every sum is then accumulated shard by shard.
      feature_clip: L2 clip of each raw feature vector x (before appending the constant 1).
      clip_norm: per-example gradient clip; by default ``sqrt(2 (feature_clip^2 + 1))``, the
        largest possible norm ``||x~|| ||p - e_y||`` (so clipping never binds).
      normalizer: public dataset size n (default ``len(X)``; treats N as public).

    Privacy:
        Clipped: features to ``feature_clip`` (then augmented with 1), per-example gradients to
        ``clip_norm``. Released under add/remove-one, full batch (no amplification): ``steps``
        gradient sums of L2 sensitivity ``clip_norm`` and 1 (bohning) or ``steps`` (adaptive)
        curvature sums of L2 sensitivity ``(feature_clip^2 + 1) / 2`` (upper triangle, symmetric
        noise), each with independent Gaussian noise per element; the composition is calibrated
        to (epsilon, delta) with PLD (`dpft.privacy.releases`). The bound: one example's exact
        Hessian ``(diag(p) - p p^T) kron x~ x~^T`` has spectral norm <= ||x~||^2 / 2, and the
        matrix actually released for it, ``c x~ x~^T`` with c <= 1/2, has Frobenius norm
        <= (feature_clip^2 + 1) / 2. The PSD projection, the solve and the update are
        post-processing; a data-independent ``damping`` and ``reg`` cost nothing.

    Long for this docstring: the code is the argument checks, the release plan and one
    loop of releases and updates.

    References:
        Boehning 1992 (the bound); Avella-Medina, Bradshaw & Loh 2023 and Ganesh et al. 2023
        (DP Newton-type methods with noisy gradients and Hessians): see the module docstring.
    """
    data = rows_of(X, y, num_classes)
    delta = check_delta(delta, data.n)
    key = check_key(key)
    feature_clip = check_bound("feature_clip", feature_clip)
    if clip_norm is None:
        clip_norm = float(np.sqrt(2 * (feature_clip**2 + 1)))
    clip_norm = check_bound("clip_norm", clip_norm)
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not reg > 0 or not 0 < hessian_share < 1 or not damping > 0:
        raise ValueError("need reg > 0, 0 < hessian_share < 1 and damping > 0")
    n = float(data.n if normalizer is None else normalizer)

    n_hess = steps if hessian == "adaptive" else 1
    h_sens = (feature_clip**2 + 1) / 2
    plan, info = releases.plan_releases(
        epsilon,
        delta,
        [f"grad_{t}" for t in range(steps)] + [f"hessian_{t}" for t in range(n_hess)],
        [clip_norm] * steps + [h_sens] * n_hess,
        [(1 - hessian_share) / steps] * steps + [hessian_share / n_hess] * n_hess,
    )
    g_std, h_std = plan[0].noise_std, plan[-1].noise_std
    hp = dict(n=n, reg=float(reg), damping=float(damping))
    WB = np.zeros((data.dim + 1, num_classes), np.float32)
    adaptive = hessian == "adaptive"
    for t in range(steps):  # release t: gradient of step t; release steps + t: its curvature
        if t == 0 or adaptive:
            h_key = keys.derive(key, "release", steps + t)
            H = data.curvature(WB, feature_clip, h_std, h_key, adaptive)
            lam, V = _curvature(H, n)
        g_key = keys.derive(key, "release", t)
        g = data.head_grad(WB, clip_norm, g_std, g_key, feature_clip=feature_clip)
        WB = _step(WB, lam, V, g, hp)
    info.update(
        grad_noise_multiplier=plan[0].noise_multiplier,
        hessian_noise_multiplier=plan[-1].noise_multiplier,
        feature_clip=feature_clip,
        clip_norm=clip_norm,
        steps=steps,
        hessian=hessian,
        normalizer=n,
    )
    return LinearParams.from_stacked(WB), info


def _objective(theta: np.ndarray, Xa: np.ndarray, Y: np.ndarray, reg: float):
    WB = theta.reshape(Xa.shape[1], Y.shape[1])
    Z = Xa @ WB
    Z = Z - Z.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(Z).sum(axis=1))
    loss = np.mean(logsum - (Z * Y).sum(axis=1)) + 0.5 * reg * np.sum(WB * WB)
    P = np.exp(Z - logsum[:, None])
    grad = Xa.T @ (P - Y) / Xa.shape[0] + reg * WB
    return loss, grad.ravel()


def logistic_regression(X, y, num_classes: int, reg: float, steps: int = 500) -> LinearParams:
    """Non-private L2-regularised multinomial logistic regression (float64, scipy L-BFGS).

    Minimises ``mean_i CE + (reg / 2) (||W||^2 + ||b||^2)``, the objective of `dp_newton`;
    ``steps`` is the iteration cap.
    """
    Xa = np.concatenate([np.asarray(X, np.float64), np.ones((len(X), 1))], axis=1)
    Y = np.eye(num_classes)[np.asarray(y)]
    res = optimize.minimize(
        _objective,
        np.zeros(Xa.shape[1] * num_classes),
        args=(Xa, Y, reg),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": steps, "gtol": 1e-10, "ftol": 1e-15},
    )
    return LinearParams.from_stacked(res.x.reshape(Xa.shape[1], num_classes))
