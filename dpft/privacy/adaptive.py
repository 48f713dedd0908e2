"""Adaptive quantile clipping: a clip norm that tracks a quantile of the update norms.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially private learning with adaptive clipping"
(NeurIPS 2021). At step ``t`` with clip norm ``C_t`` the unit of privacy (an example, or a
client in federated learning) contributes its clipped update and the CENTRED indicator
``1[||g_i|| <= C_t] - 1/2``. The released pair is

* the clipped sum ``sum_i clip(g_i, C_t) + N(0, (z_delta C_t)^2 I)`` and
* the centred count ``sum_i (1[||g_i|| <= C_t] - 1/2) + N(0, sigma_b^2)``,

and the noisy unclipped fraction ``b_t = 1/2 + centred_count / B`` (``B`` the PUBLIC expected
count: expected batch, or expected clients per round) drives the geometric update
``C_{t+1} = C_t exp(-eta (b_t - gamma))``, which moves ``C`` towards the ``gamma`` quantile of
the norms. ``C_{t+1}`` is post-processing of the step's released values.

Composition of the two releases (`split_noise_multiplier`): under add/remove-one, the clipped
sum has L2 sensitivity ``C_t`` and the centred count sensitivity ``1/2``. Scaling the count by
``z_delta C_t / sigma_b`` gives both coordinates the same noise std ``z_delta C_t``, and the
scaled vector ``(sum, count * z_delta C_t / sigma_b)`` has L2 sensitivity
``C_t sqrt(1 + (z_delta / (2 sigma_b))^2)``. The pair is therefore ONE Gaussian mechanism
with noise multiplier ``z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2)``. Given the user's ``z``
(calibrated to (epsilon, delta) as for DP-SGD), the gradient noise uses
``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, defined only for ``sigma_b > z / 2``, and the
accountant keeps ``z``. Under replace-one both sensitivities double (the centred indicator moves
between -1/2 and 1/2), so the same ``z`` holds there too. With the uncentred count
(sensitivity 1) the multiplier would be ``(z_delta^-2 + sigma_b^-2)^(-1/2)``; this module
always releases the centred one.

The count noise of step ``t`` is drawn from `count_key` (``derive(derive(key, "noise", 2),
"step", t)`` under the privatizer's key), a domain disjoint from the gradient noise
(``derive(key, "step", t)`` then ``"leaf"``, `dpft.privacy.noise.step_key`) and from the
correlated privatizer's root (``derive(key, "noise", 1)``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpft.privacy import keys
from dpft.privacy.clippers import _SingleGroup
from dpft.privacy.noise import gaussian_noise, step_key

__all__ = [
    "AdaptiveClipState",
    "AdaptivePrivatizerState",
    "FlatClipAt",
    "adaptive_privatizer",
    "centred_unclipped_count",
    "count_key",
    "default_count_noise",
    "find_state",
    "geometric_update",
    "init_state",
    "joint_noise_multiplier",
    "noisy_unclipped_fraction",
    "split_noise_multiplier",
    "update_state",
]

PyTree = Any
COUNT_SENSITIVITY = 0.5  # of the centred count under add/remove-one
_COUNT_ROOT = 2  # derive(key, "noise", 2): the count noise's root (1 is the correlated noise's)


class AdaptiveClipState(NamedTuple):
    """The adaptive clip norm: a pytree of arrays, usable inside jit and checkpointed.

    ``clip_norm`` is the clip norm of the NEXT step, ``step`` the number of updates made and
    ``fraction`` the last noisy unclipped fraction (NaN before the first update).
    """

    clip_norm: jax.Array  # float32
    step: jax.Array  # int32
    fraction: jax.Array  # float32


def init_state(initial_clip_norm: float) -> AdaptiveClipState:
    """The state before the first step: ``C_0 = initial_clip_norm`` (finite, > 0)."""
    c = float(initial_clip_norm)
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(f"the initial clip norm must be finite and > 0, got {initial_clip_norm!r}")
    return AdaptiveClipState(
        jnp.asarray(c, jnp.float32), jnp.zeros([], jnp.int32), jnp.asarray(jnp.nan, jnp.float32)
    )


def default_count_noise(expected_count: float) -> float:
    """``sigma_b = expected_count / 20``, the setting suggested by Andrew et al.

    Privacy:
        A public function of the public expected count (expected batch or expected clients).
    """
    if not expected_count > 0:
        raise ValueError(f"expected_count must be > 0, got {expected_count!r}")
    return float(expected_count) / 20.0


def joint_noise_multiplier(grad_noise_multiplier: float, count_noise: float) -> float:
    """``z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2)``: the multiplier of the joint release.

    Privacy:
        The clipped sum (sensitivity ``C``, noise std ``z_delta C``) released with the centred
        unclipped count (sensitivity 1/2, noise std ``sigma_b``) is one Gaussian mechanism with
        noise multiplier ``z`` under add/remove-one and under replace-one (module docstring).
        ``z_delta = 0`` (no gradient noise) gives 0.
    """
    zd, sb = float(grad_noise_multiplier), float(count_noise)
    if zd < 0 or sb < 0:
        raise ValueError(f"noise multipliers must be >= 0, got {zd!r} and {sb!r}")
    if zd == 0 or sb == 0:
        return 0.0
    return (zd**-2 + (sb / COUNT_SENSITIVITY) ** -2) ** -0.5


def split_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``: the gradient noise leaving a total of ``z``.

    ``z = 0`` (a run without noise) gives 0. Raises ValueError when ``sigma_b <= z / 2``
    (the count alone would spend more than the total budget: ``z_delta`` is undefined).

    Privacy:
        `joint_noise_multiplier` of the result and ``count_noise`` is ``noise_multiplier``: the
        accountant's mechanism with multiplier ``z`` covers both releases of a step.
    """
    z, sb = float(noise_multiplier), float(count_noise)
    if not z >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if z == 0:
        return 0.0
    if not math.isfinite(z):
        raise ValueError(f"noise_multiplier must be finite, got {noise_multiplier!r}")
    rest = z**-2 - (sb / COUNT_SENSITIVITY) ** -2 if sb > 0 else -1.0
    if not rest > 0:
        raise ValueError(
            f"adaptive clipping: count noise sigma_b={sb:g} must exceed noise_multiplier/2 = "
            f"{z / 2:g} (the gradient noise multiplier z_delta is undefined otherwise)"
        )
    return rest**-0.5


def count_key(key: jax.Array, step) -> jax.Array:
    """The count noise key of step ``step``: ``derive(derive(key, "noise", 2), "step", step)``.

    Privacy:
        Disjoint from the gradient noise keys of the same privatizer key
        (``derive(key, "step", t)``, then ``"leaf"``) and from the correlated privatizer's root:
        the count noise is independent of the gradient noise and across steps.
    """
    return keys.derive(keys.derive(key, "noise", _COUNT_ROOT), "step", step)


def centred_unclipped_count(norms: jax.Array, mask: jax.Array, clip_norm) -> jax.Array:
    """``sum_i mask_i (1[norm_i <= C] - 1/2)`` over real rows (``mask > 0``); float32.

    A non-finite norm counts as clipped (its update contributes zero to the sum).

    Privacy:
        Each real row contributes -1/2 or 1/2 and a padding row 0, so the count has sensitivity
        1/2 under add/remove-one and 1 under replace-one.
    """
    real = mask > 0
    ind = jnp.where(jnp.isfinite(norms) & (norms <= clip_norm), 0.5, -0.5)
    return jnp.sum(jnp.where(real, ind, 0.0)).astype(jnp.float32)


def noisy_unclipped_fraction(
    key: jax.Array, centred_count, count_noise: float, expected_count: float
) -> jax.Array:
    """``b = 1/2 + (centred_count + N(0, sigma_b^2)) / expected_count``: float32 scalar.

    ``key`` is the step's `count_key`; ``expected_count`` is the PUBLIC expected batch (or
    expected number of clients), never the realised one.

    Privacy:
        The Gaussian mechanism with std ``sigma_b`` on a count of sensitivity 1/2, followed by
        post-processing with public constants; composed with the step's gradient release by
        `split_noise_multiplier`.
    """
    if not expected_count > 0:
        raise ValueError(f"expected_count must be > 0, got {expected_count!r}")
    noise = float(count_noise) * jax.random.normal(key, (), jnp.float32)
    return 0.5 + (jnp.asarray(centred_count, jnp.float32) + noise) / float(expected_count)


def geometric_update(clip_norm, fraction, target_quantile: float, learning_rate: float):
    """``C exp(-eta (b - gamma))``: shrinks C when more than ``gamma`` of the norms fit under it.

    Privacy:
        Post-processing of the noisy fraction ``b``: costs no privacy.
    """
    return clip_norm * jnp.exp(-float(learning_rate) * (fraction - float(target_quantile)))


def update_state(
    state: AdaptiveClipState,
    key: jax.Array,
    centred_count,
    *,
    target_quantile: float,
    learning_rate: float,
    count_noise: float,
    expected_count: float,
) -> AdaptiveClipState:
    """One step: the noisy fraction of ``state.step`` (key `count_key`) and the next C.

    Privacy:
        Releases the centred count of `centred_unclipped_count` (sensitivity 1/2) with noise
        std ``count_noise``; the new clip norm is post-processing of that release.
    """
    b = noisy_unclipped_fraction(
        count_key(key, state.step), centred_count, count_noise, expected_count
    )
    c = geometric_update(state.clip_norm, b, target_quantile, learning_rate)
    return AdaptiveClipState(c.astype(jnp.float32), state.step + 1, b)


@dataclasses.dataclass(frozen=True, eq=False)
class FlatClipAt(_SingleGroup):
    """Flat L2 clipping at a (possibly traced) clip norm: ``g * min(1, C / ||g||)``.

    `dpft.privacy.clippers.FlatClip` checks ``C > 0`` in Python, which a traced value cannot
    take; this rule is the same map for the adaptive clip norm, which is positive by
    construction (a positive initial value times exponentials).

    Privacy:
        Each clipped example has L2 norm <= C, so the clipped SUM has L2 sensitivity C (the
        current value) under add/remove-one neighbouring, and 2C under replace-one.
    """

    clip_norm: Any

    def factors(self, group_norms):
        return jnp.minimum(1.0, self.clip_norm / group_norms)

    def sensitivity(self, params=None):
        return self.clip_norm


class AdaptivePrivatizerState(NamedTuple):
    """Key, step counter and adaptive clip state of `adaptive_privatizer`."""

    key: jax.Array  # raw uint32[2]
    count: jax.Array  # int32: logical batches privatized so far
    clip: AdaptiveClipState


def find_state(opt_state: PyTree) -> AdaptivePrivatizerState | None:
    """The `AdaptivePrivatizerState` inside an optimizer state (e.g. a chain's), or None."""
    for x in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda s: isinstance(s, AdaptivePrivatizerState)
    ):
        if isinstance(x, AdaptivePrivatizerState):
            return x
    return None


def adaptive_privatizer(
    noise_multiplier: float,
    initial_clip_norm: float,
    key: jax.Array | int,
    *,
    target_quantile: float,
    learning_rate: float,
    count_noise: float,
    expected_count: float,
) -> optax.GradientTransformationExtraArgs:
    """The Gaussian privatizer of an adaptively clipped sum, and the clip norm's update.

    ``update(sum, state, params, centred_count=...)`` must be called once per logical batch
    with the sum clipped at ``state.clip.clip_norm`` (`FlatClipAt`) and the
    `centred_unclipped_count` at that same norm. It adds ``N(0, (z_delta C_t)^2)`` to each
    coordinate (``z_delta = split_noise_multiplier(noise_multiplier, count_noise)``; keys as
    `dpft.privacy.noise.gaussian_privatizer`: ``step_key(key, t)`` then one per leaf) and
    updates C from the noisy count (`update_state`, keys `count_key`).

    Args:
      noise_multiplier: ``z``, the TOTAL multiplier the accountant uses for each step.
      initial_clip_norm: ``C_0``.
      key: a PRNG key or an int seed.
      target_quantile: ``gamma`` in [0, 1].
      learning_rate: ``eta_C`` >= 0.
      count_noise: ``sigma_b``; must exceed ``noise_multiplier / 2`` when that is > 0.
      expected_count: the public expected batch size.

    Privacy:
        With the sum of sensitivity ``C_t`` (the clip norm held in the state for that step) and
        the centred count of sensitivity 1/2, each update is ONE Gaussian mechanism with noise
        multiplier ``noise_multiplier`` under add/remove-one (and replace-one): the accountant's
        `GaussianSteps` of DP-SGD with that multiplier is unchanged. The next clip norm is
        post-processing of the noisy count.
    """
    if not 0.0 <= float(target_quantile) <= 1.0:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
    if not float(learning_rate) >= 0:
        raise ValueError(f"the clip norm learning rate must be >= 0, got {learning_rate!r}")
    if not float(count_noise) >= 0:
        raise ValueError(f"count_noise must be >= 0, got {count_noise!r}")
    grad_multiplier = split_noise_multiplier(noise_multiplier, count_noise)
    clip0 = init_state(initial_clip_norm)
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    hyper = dict(
        target_quantile=float(target_quantile),
        learning_rate=float(learning_rate),
        count_noise=float(count_noise),
        expected_count=float(expected_count),
    )

    def init_fn(params):
        del params
        k = jnp.asarray(key, jnp.uint32)
        return AdaptivePrivatizerState(k, jnp.zeros([], jnp.int32), clip0)

    def update_fn(updates, state, params=None, *, centred_count=None, **extra):
        del params, extra
        if centred_count is None:
            raise ValueError(
                "adaptive clipping: the step must pass centred_count (the sum clipped at the "
                "current clip norm); this step path does not support adaptive clipping"
            )
        std = grad_multiplier * state.clip.clip_norm
        noise = gaussian_noise(step_key(state.key, state.count), updates, std)
        noisy = jax.tree_util.tree_map(lambda u, n: u.astype(jnp.float32) + n, updates, noise)
        clip = update_state(state.clip, state.key, centred_count, **hyper)
        return noisy, AdaptivePrivatizerState(state.key, state.count + 1, clip)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
