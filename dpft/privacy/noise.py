"""The Gaussian privatizer: an optax transform that adds calibrated noise to a clipped sum.

A DP optimizer is ``optax.chain(gaussian_privatizer(...), normalize_by_expected_batch(...),
base_optimizer)``. The privatizer sees the SUM of clipped per-example gradients of one logical
batch (whatever microbatching produced it) and adds noise exactly once to it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpft.privacy import keys

__all__ = [
    "PrivatizerState",
    "gaussian_noise",
    "gaussian_privatizer",
    "noise_std",
    "step_key",
]


def noise_std(noise_multiplier: float, l2_sensitivity: float) -> float:
    """Standard deviation ``noise_multiplier * l2_sensitivity``; 0 when the multiplier is 0.

    Privacy:
        The Gaussian mechanism with this std on a query of L2 sensitivity ``l2_sensitivity`` is
        the mechanism whose privacy the accountant computes from ``noise_multiplier``.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not l2_sensitivity > 0:
        raise ValueError(f"l2_sensitivity must be > 0, got {l2_sensitivity!r}")
    if noise_multiplier == 0:
        return 0.0
    std = float(noise_multiplier) * float(l2_sensitivity)
    if not np.isfinite(std):
        raise ValueError(
            "noise std is infinite: a finite l2_sensitivity (clip norm) is required when "
            f"noise_multiplier={noise_multiplier} > 0"
        )
    return std


def gaussian_noise(key: jax.Array, tree: Any, std: float) -> Any:
    """Independent N(0, std^2) float32 noise shaped like ``tree``: one key per leaf.

    Leaf j draws from ``keys.derive(key, "leaf", j)``.

    Privacy:
        Added to a query of L2 sensitivity S (under add/remove-one or replace-one
        neighbouring), this is the Gaussian mechanism with noise multiplier ``std / S`` under that
        relation. Every coordinate of every leaf gets an independent draw: leaves get distinct
        keys of the "leaf" purpose under ``key``, so no two coordinates share one. ``key`` must
        be fresh per release.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    noise = [
        std * jax.random.normal(keys.derive(key, "leaf", j), jnp.shape(x), jnp.float32)
        for j, x in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, noise)


def step_key(key: jax.Array, step) -> jax.Array:
    """The privatizer's key of logical batch ``step``: ``keys.derive(key, "step", step)``.

    Privacy:
        One key per step in the "step" domain of the privatizer's key, so the noise of
        distinct steps is independent and never shares a key with another purpose.
    """
    return keys.derive(key, "step", step)


class PrivatizerState(NamedTuple):
    """Key and step counter of the privatizer (checkpointed with the optimizer state)."""

    key: jax.Array  # raw uint32[2] key data, so that the state is a plain array pytree
    count: jax.Array  # int32: logical batches privatized so far


def gaussian_privatizer(
    noise_multiplier: float, l2_sensitivity: float, key: jax.Array | int
) -> optax.GradientTransformation:
    """Adds N(0, (noise_multiplier * l2_sensitivity)^2) noise to each update, once per call.

    ``update`` must be called once per LOGICAL batch with the sum of clipped per-example
    gradients. The noise for step ``t`` uses ``keys.derive(key, "step", t)``, then one key of
    the "leaf" purpose per leaf (`gaussian_noise`), so it is
    independent across steps, leaves and elements, and is the same on every device of a
    data-parallel run (the step's noise is drawn once for the logical batch, never per device).
    The result is float32 whatever the update dtype (mixed precision keeps the noise exact).

    Args:
      noise_multiplier: sigma, the ratio of noise std to sensitivity used by the accountant.
      l2_sensitivity: the clipped sum's L2 sensitivity (``clipper.sensitivity(params)``).
      key: a PRNG key or an int seed. For a secure run, seed it from OS entropy.

    Privacy:
        If the input has L2 sensitivity ``l2_sensitivity`` under a neighbouring relation, each
        output is one Gaussian mechanism with noise multiplier ``noise_multiplier`` under that
        same relation; the accountant composes them over steps.
    """
    std = noise_std(noise_multiplier, l2_sensitivity)
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)

    def init_fn(params):
        del params
        return PrivatizerState(key=jnp.asarray(key, jnp.uint32), count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        noise = gaussian_noise(step_key(state.key, state.count), updates, std)
        noisy = jax.tree_util.tree_map(lambda u, n: u.astype(jnp.float32) + n, updates, noise)
        return noisy, PrivatizerState(key=state.key, count=state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)
