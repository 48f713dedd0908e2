"""Full-batch DP gradient descent on a linear softmax head, from zero initialisation.

Reference: Mehta, Thakurta, Kurakin & Cutkosky 2022, "Large scale transfer learning for
differentially private image classification" (arXiv:2205.02973): on frozen features, a single
full-batch DP step from a zero-initialised linear head already works well, and a first Adam step
is (up to its epsilon) a sign step on the noisy gradient.

The noisy clipped gradient sums are released by the DP core
(`dpft.privacy.rows.noisy_head_grad_sum`: per-example gradients in closed form, clipped, summed
at full precision, plus Gaussian noise); this module holds the optimiser, which only
post-processes them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpft.linear.common import LinearParams, check_bound, check_delta, check_key
from dpft.linear.data import rows_of
from dpft.privacy import keys, releases, rows

__all__ = ["clipped_grad_sum", "dp_gd"]

# The clipped gradient sum of the linear head (re-exported from the DP core).
clipped_grad_sum = rows.clipped_head_grad_sum

UPDATES = ("sgd", "adam")


@functools.partial(jax.jit, static_argnames="update")
def _step(WB, m, v, t, noisy_sum, hp: dict, update: str):
    """One full-batch step t (from 1) from the step's noisy gradient sum (post-processing)."""
    g = noisy_sum / hp["n"] + hp["weight_decay"] * WB
    if update == "sgd":
        return WB - hp["lr"] * g, m, v
    b1, b2 = hp["b1"], hp["b2"]
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return WB - hp["lr"] * m_hat / (jnp.sqrt(v_hat) + hp["adam_eps"]), m, v


def dp_gd(
    X,
    y,
    num_classes: int,
    *,
    epsilon: float,
    delta: float,
    clip_norm: float,
    steps: int = 1,
    learning_rate: float,
    update: str = "sgd",
    weight_decay: float = 0.0,
    key: jax.Array,
    normalizer: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
) -> tuple[LinearParams, dict]:
    """Full-batch DP gradient descent (SGD or Adam updates) on softmax cross-entropy, from zero.

    Each step t: ``g_t = (clipped_grad_sum(theta_t) + N(0, (sigma * clip_norm)^2 I)) / normalizer
    + weight_decay * theta_t`` over theta = [W; b], then ``theta -= learning_rate * g_t`` (sgd) or
    an Adam update with bias-corrected moments of the noisy g_t (adam; its first step is
    ``-learning_rate * g / (|g| + adam_eps)``, about a sign step). The weight decay is an L2 term
    in the gradient, data-independent.

    Args:
      X, y, num_classes: features [N, d], labels [N] in [0, num_classes); X may be a reader of
        sharded features (`dpft.linear.data`: each sum is accumulated shard by shard, the noise
        added once) and y then None (the shards' labels).
      epsilon, delta: target (epsilon, delta); epsilon = inf means no noise.
      clip_norm: per-example gradient clip (Frobenius norm over [W; b]); may be inf when
        epsilon = inf.
      steps: number of full-batch steps (the budget is split evenly over them).
      learning_rate, update, weight_decay, betas, adam_eps: the optimiser.
      key: a JAX PRNG key; step t (from 1) draws its noise from
        ``keys.derive(key, "release", t - 1)`` (release t - 1 of ``info["releases"]``).
      normalizer: the public dataset size used to average the noisy sum (default ``len(X)``).

    Returns:
      (LinearParams, info) with info["epsilon"] (PLD epsilon actually spent), "delta",
      "noise_multiplier" (sigma per step), "noise_std" (on the sum), "releases", ...

    Privacy:
        Clipped: each example's gradient w.r.t. [W; b], to Frobenius norm ``clip_norm``.
        Released: ``steps`` noisy clipped sums, each of L2 sensitivity ``clip_norm`` under
        add/remove-one neighbouring, with N(0, (sigma clip_norm)^2) noise drawn independently for
        every element of W and b at every step. Full batch: no subsampling amplification; the
        composition of the ``steps`` Gaussian mechanisms is accounted with PLD (see
        `dpft.privacy.releases`). Dividing by ``normalizer`` treats the dataset size as public
        (as dp-accounting's full-batch Gaussian event does); everything after the noisy sums,
        including Adam and weight decay, is post-processing.

    Long for this docstring: the code is the argument checks, the release plan and one
    loop of releases and updates.

    References:
        Mehta et al. 2022, "Large scale transfer learning for differentially private image
        classification" (arXiv:2205.02973); Kingma & Ba 2015, "Adam" (ICLR).
    """
    data = rows_of(X, y, num_classes)
    delta = check_delta(delta, data.n)
    key = check_key(key)
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    clip_norm = check_bound("clip_norm", clip_norm)
    n = float(data.n if normalizer is None else normalizer)
    if not n > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer!r}")

    plan, info = releases.plan_releases(
        epsilon, delta, [f"grad_step_{t}" for t in range(steps)], [clip_norm] * steps, [1] * steps
    )
    std = plan[0].noise_std
    hp = dict(
        clip_norm=clip_norm,
        std=std,
        n=n,
        weight_decay=float(weight_decay),
        lr=float(learning_rate),
        b1=float(betas[0]),
        b2=float(betas[1]),
        adam_eps=float(adam_eps),
    )
    WB = np.zeros((data.dim + 1, num_classes), np.float32)
    m = v = WB
    for t in range(1, steps + 1):
        release = keys.derive(key, "release", t - 1)
        noisy_sum = data.head_grad(WB, clip_norm, std, release)
        WB, m, v = _step(WB, m, v, t, noisy_sum, hp, update)
    info.update(
        noise_multiplier=plan[0].noise_multiplier,
        noise_std=std,
        clip_norm=clip_norm,
        steps=steps,
        normalizer=n,
        update=update,
    )
    return LinearParams.from_stacked(WB), info
