"""DP-FC: DP gradient descent preconditioned by a privately released feature covariance.

Reference: Mehta, Krichene, Thakurta, Kurakin & Cutkosky 2023, "Differentially private image
classification from features" (TMLR, arXiv:2211.13403): a noisy feature covariance, released
once, carries the curvature of the linear head and makes a few noisy full-batch gradient steps
effective. Here the covariance is of augmented clipped features [x, 1] so that it also
preconditions the bias.

The releases (the noisy covariance sum and the noisy clipped gradient sums) are made by the DP
core (`dpft.privacy.rows.noisy_gram_sum`, `noisy_head_grad_sum`); the preconditioned updates
here are post-processing.
"""

from __future__ import annotations

import jax
import numpy as np

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

__all__ = ["dp_fc"]


@jax.jit
def _covariance(noisy_sum, n):
    """The noisy covariance sum, PSD-projected and normalised: (eigenvalues, V)."""
    lam, V = psd_eig(noisy_sum)
    return lam / n, V


@jax.jit
def _step(WB, noisy_grad_sum, lam, V, hp: dict):
    return WB - hp["lr"] * eig_solve(lam, V, hp["reg"], noisy_grad_sum / hp["n"])


def dp_fc(
    X,
    y,
    num_classes: int,
    *,
    epsilon: float,
    delta: float,
    feature_clip: float,
    clip_norm: float,
    steps: int,
    learning_rate: float,
    cov_fraction: float,
    reg: float,
    key: jax.Array,
    normalizer: float | None = None,
) -> tuple[LinearParams, dict]:
    """Preconditioned full-batch DP gradient descent on softmax cross-entropy, from zero.

    Releases ``C = (sum_i x~_i x~_i^T + E) / n`` once (x~ = [clip(x), 1], E symmetric Gaussian),
    projects it onto the PSD cone, then runs ``steps`` updates
    ``theta -= learning_rate * (C_+ + reg I)^{-1} (clipped_grad_sum(theta) + Z_t) / n`` on
    theta = [W; b] with Z_t i.i.d. Gaussian per element and per step. Release j of
    ``info["releases"]`` draws its noise from ``keys.derive(key, "release", j)``: j = 0 for the
    covariance, j = t + 1 for the gradient of step t.

    Args:
      X, y: features [N, d] and labels [N], or a reader of sharded features (`dpft.linear.data`)
        and None (the shards' labels): every sum is then accumulated shard by shard.
      feature_clip: L2 clip of each raw feature vector (before appending 1).
      clip_norm: per-example gradient clip (Frobenius norm over [W; b]).
      cov_fraction: share of the mu^2 budget for the covariance; the rest is split evenly over
        the gradient steps.
      reg: ridge added to the normalised covariance in the preconditioner (> 0).
      normalizer: public dataset size n (default ``len(X)``; treats N as public, as
        dp-accounting's full-batch event does).

    Privacy:
        Clipped: features to ``feature_clip``, per-example gradients (on the clipped augmented
        features) to ``clip_norm``. Released under add/remove-one, full batch (no amplification):
        the covariance sum, L2 sensitivity ``feature_clip^2 + 1`` (``||x~ x~^T||_F = ||x~||^2``;
        its upper triangle gets independent noise, then is mirrored), and ``steps`` gradient sums
        of L2 sensitivity ``clip_norm`` with independent noise per element of W and b and per
        step. The composition is calibrated to (epsilon, delta) with PLD
        (`dpft.privacy.releases`); the projection, the preconditioning and the updates are
        post-processing.

    Long for this docstring: the code is the argument checks, the release plan and one
    loop of releases and updates.

    References:
        Mehta et al. 2023, "Differentially private image classification from features"
        (arXiv:2211.13403).
    """
    data = rows_of(X, y, num_classes)
    delta = check_delta(delta, data.n)
    key = check_key(key)
    feature_clip = check_bound("feature_clip", feature_clip)
    clip_norm = check_bound("clip_norm", clip_norm)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0 < cov_fraction < 1 or not reg > 0:
        raise ValueError("need 0 < cov_fraction < 1 and reg > 0")
    n = float(data.n if normalizer is None else normalizer)

    plan, info = releases.plan_releases(
        epsilon,
        delta,
        ["covariance"] + [f"grad_step_{t}" for t in range(steps)],
        [feature_clip**2 + 1] + [clip_norm] * steps,
        [cov_fraction] + [(1 - cov_fraction) / steps] * steps,
    )
    # release 0: the covariance; release t + 1: the gradient of step t
    C = data.gram(feature_clip, plan[0].noise_std, keys.derive(key, "release", 0), append_one=True)
    lam, V = _covariance(C, n)
    g_std = plan[1].noise_std
    hp = dict(n=n, lr=float(learning_rate), reg=float(reg))
    WB = np.zeros((data.dim + 1, num_classes), np.float32)
    for t in range(steps):
        g_key = keys.derive(key, "release", t + 1)
        g = data.head_grad(WB, clip_norm, g_std, g_key, feature_clip=feature_clip)
        WB = _step(WB, g, lam, V, hp)
    info.update(
        cov_noise_multiplier=plan[0].noise_multiplier,
        grad_noise_multiplier=plan[1].noise_multiplier,
        feature_clip=feature_clip,
        clip_norm=clip_norm,
        steps=steps,
        normalizer=n,
    )
    return LinearParams.from_stacked(WB), info
