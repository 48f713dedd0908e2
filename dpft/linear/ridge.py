"""DP least squares on features: noisy sufficient statistics X^T X and X^T Y, then a ridge solve.

References: Sheffet 2017, "Differentially private ordinary least squares" (ICML), which releases
noisy sufficient statistics; Mehta, Krichene, Thakurta, Kurakin & Cutkosky 2023, "Differentially
private image classification from features" (TMLR, arXiv:2211.13403), which applies DP least
squares to classification from frozen features with one-hot or +-1 targets.

The two releases (the clipped sums and their noise) are made by the DP core
(`dpft.privacy.rows.noisy_gram_sum`, `noisy_xty_sum`); the PSD projection and the ridge solve
here are post-processing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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

__all__ = [
    "dp_least_squares",
    "dp_sufficient_stats",
    "least_squares",
    "target_matrix",
    "target_norm",
]

TARGETS = ("onehot", "pm1")


def target_matrix(y: jax.Array, num_classes: int, targets: str = "onehot") -> jax.Array:
    """Regression targets [N, K]: one-hot rows, or +-1 rows (+1 at the label, -1 elsewhere)."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    Y = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    return Y if targets == "onehot" else 2 * Y - 1


def target_norm(num_classes: int, targets: str) -> float:
    """L2 norm of every target row: 1 for one-hot, sqrt(K) for +-1."""
    return 1.0 if targets == "onehot" else float(np.sqrt(num_classes))


def _check_ls(X, y, num_classes, delta, key, feature_clip, budget_split):
    data = rows_of(X, y, num_classes)
    check_delta(delta, data.n)
    if not 0 < budget_split < 1:
        raise ValueError(f"budget_split must be in (0, 1), got {budget_split!r}")
    return data, check_key(key), check_bound("feature_clip", feature_clip)


def dp_sufficient_stats(
    X,
    y,
    num_classes: int,
    *,
    epsilon: float,
    delta: float,
    feature_clip: float,
    targets: str = "onehot",
    key: jax.Array,
    budget_split: float = 0.5,
) -> tuple[jax.Array, jax.Array, dict]:
    """The two releases of `dp_least_squares`: noisy (G = X^T X + E [d, d], B = X^T Y + Z [d, K]).

    Anything computed from (G, B) is post-processing: e.g. solving for several ``reg`` values
    costs no extra privacy. G draws its noise from ``keys.derive(key, "release", 0)`` and B from
    ``keys.derive(key, "release", 1)``. ``X`` may be a reader of sharded features (with ``y``
    None: the shards' labels), whose sums are accumulated shard by shard. See
    `dp_least_squares` for the privacy statement.
    """
    data, key, feature_clip = _check_ls(X, y, num_classes, delta, key, feature_clip, budget_split)
    target_matrix(jnp.zeros(1, jnp.int32), num_classes, targets)  # checks ``targets``
    plan, info = releases.plan_releases(
        epsilon,
        delta,
        ["gram", "xty"],
        [feature_clip**2, feature_clip * target_norm(num_classes, targets)],
        [budget_split, 1 - budget_split],
    )
    G = data.gram(feature_clip, plan[0].noise_std, keys.derive(key, "release", 0))
    B = data.xty(
        lambda y: target_matrix(y, num_classes, targets),
        feature_clip,
        plan[1].noise_std,
        keys.derive(key, "release", 1),
    )
    info.update(feature_clip=feature_clip, targets=targets)
    return G, B, info


def dp_least_squares(
    X,
    y,
    num_classes: int,
    *,
    epsilon: float,
    delta: float,
    feature_clip: float,
    reg: float,
    targets: str = "onehot",
    key: jax.Array,
    budget_split: float = 0.5,
) -> tuple[LinearParams, dict]:
    """DP ridge regression of the targets on clipped features: weights [d, K], zero bias.

    Releases ``G = X^T X + E`` (E symmetric Gaussian) and ``B = X^T Y + Z`` on clipped features
    (`dp_sufficient_stats`), projects G onto the PSD cone (eigenvalues clipped at 0) and solves
    ``(G_+ + reg I) W = B``. ``budget_split`` is the share of the mu^2 budget spent on the Gram
    matrix (the rest on B). There is no bias term; append a constant feature to X to fit one
    (its clipping then counts).

    Privacy:
        Clipped: each feature vector, to L2 norm ``feature_clip``. Released, under add/remove-one
        neighbouring and full batch (no amplification): the Gram matrix (upper triangle, L2
        sensitivity ``feature_clip^2``) and X^T Y (L2 sensitivity ``feature_clip * ||y_row||``:
        ``feature_clip`` for one-hot, ``feature_clip * sqrt(K)`` for +-1 targets), each with
        independent Gaussian noise in every released element, including independent noise for
        every class column of X^T Y. The two Gaussian mechanisms compose to the target (epsilon,
        delta) with PLD (`dpft.privacy.releases`); the PSD projection and the solve are
        post-processing.

    References:
        Sheffet 2017, "Differentially private ordinary least squares" (ICML); Mehta et al. 2023,
        "Differentially private image classification from features" (arXiv:2211.13403).
    """
    if not reg > 0:
        raise ValueError(f"reg must be > 0, got {reg!r}")
    G, B, info = dp_sufficient_stats(
        X,
        y,
        num_classes,
        epsilon=epsilon,
        delta=delta,
        feature_clip=feature_clip,
        targets=targets,
        key=key,
        budget_split=budget_split,
    )
    lam, V = psd_eig(G)
    W = eig_solve(lam, V, float(reg), B)
    info.update(reg=float(reg))
    return LinearParams(W, jnp.zeros(num_classes, jnp.float32)), info


def least_squares(X, y, num_classes: int, reg: float, targets: str = "onehot") -> LinearParams:
    """Non-private ridge regression (float64 numpy): W = (X^T X + reg I)^{-1} X^T Y, zero bias."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(target_matrix(jnp.asarray(y), num_classes, targets), np.float64)
    W = np.linalg.solve(X.T @ X + reg * np.eye(X.shape[1]), X.T @ Y)
    return LinearParams(W, np.zeros(num_classes))
