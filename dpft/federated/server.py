"""Server side of a round: client-update clipping, aggregation, noise and the server optimizer.

Client updates arrive stacked over a static number of client slots (leading axis S) with a
client mask; padded slots (mask 0) contribute exactly zero, like padded examples in a batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpft.privacy.noise import gaussian_noise

PyTree = Any

__all__ = [
    "ServerState",
    "clip_client_updates",
    "client_level_sum",
    "make_server_optimizer",
    "server_apply",
    "weighted_mean",
]


class ServerState(NamedTuple):
    round: jax.Array  # int32: rounds completed
    params: PyTree  # global trainable parameters (flat dict)
    opt_state: PyTree  # server optimizer state


def make_server_optimizer(
    name: str, learning_rate: float, momentum: float = 0.9
) -> optax.GradientTransformation:
    """'sgd' | 'momentum' | 'adam', applied to the NEGATIVE aggregated update as a gradient.

    Privacy:
        Post-processing of the (privatized) aggregate: costs no privacy.
    """
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"server optimizer must be sgd, momentum or adam, got {name!r}")


def _flat_norm(tree: PyTree) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Overflow-safe L2 norm of one client's whole update: ``(norm, finite, r, e)``.

    ``norm = r * 2**e`` with ``r`` of order 1, computed without overflow or flush-to-zero (the
    power of two is applied as two normal factors); ``norm`` itself may round to inf.
    """
    leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(tree)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    safe = [jnp.where(jnp.isfinite(x), x, 0.0) for x in leaves]
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in safe]))
    _, e = jnp.frexp(scale)
    e = jnp.where(scale > 0, e, 0)
    r = jnp.sqrt(sum(jnp.sum(jnp.square(_pow2_scale(x, -e))) for x in safe))
    return _pow2_scale(r, e), finite, r, e


def _pow2_scale(x: jax.Array, e: jax.Array) -> jax.Array:
    """``x * 2**e`` for |e| <= ~300 as two multiplications by normal powers of two."""
    half = e // 2
    return x * jnp.ldexp(jnp.float32(1.0), half) * jnp.ldexp(jnp.float32(1.0), e - half)


def clip_client_updates(
    updates: PyTree, client_mask: jax.Array, clip_norm: float
) -> tuple[PyTree, jax.Array, jax.Array]:
    """Scales each slot's update to L2 norm <= ``clip_norm`` (the whole update vector).

    Returns ``(clipped [S, ...], norms [S], ok [S])``: padded slots and slots whose update has a
    non-finite element are exactly zero (``ok`` is 0 for them). Norms are computed without
    overflow, so huge finite updates are scaled down, not dropped.

    Privacy:
        Every slot of the result has L2 norm <= clip_norm (up to float rounding), so the sum
        over slots has L2 sensitivity ``clip_norm`` under add/remove-one client, whatever the
        clients send (adversarial, huge or non-finite updates included).
    """
    norms, finite, r, e = jax.vmap(_flat_norm)(updates)
    ok = (client_mask > 0) & finite
    clip = ok & (norms > clip_norm)
    # Clipped: x * 2**-e * (clip_norm / r), where r = ||x * 2**-e|| is of order 1.
    ratio = jnp.where(clip, clip_norm / jnp.where(r > 0, r, 1.0), 1.0)

    def scale(x):
        shape = (-1,) + (1,) * (x.ndim - 1)
        x = jnp.where(ok.reshape(shape), jnp.asarray(x, jnp.float32), 0.0)
        scaled = _pow2_scale(x, -e.reshape(shape)) * ratio.reshape(shape)
        return jnp.where(clip.reshape(shape), scaled, x)

    return jax.tree_util.tree_map(scale, updates), norms, ok.astype(jnp.float32)


def client_level_sum(updates: PyTree, client_mask: jax.Array, clip_norm: float) -> PyTree:
    """Sum over slots of the clipped client updates: the DP-FedAvg query before noise.

    Privacy:
        L2 sensitivity ``clip_norm`` under add/remove-one client (see `clip_client_updates`).
    """
    clipped, _, _ = clip_client_updates(updates, client_mask, clip_norm)
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), clipped)


def weighted_mean(
    updates: PyTree, client_mask: jax.Array, weights: jax.Array
) -> tuple[PyTree, jax.Array]:
    """``sum_s w_s u_s / sum_s w_s`` over participating slots with finite updates.

    Returns the mean and the per-slot ``ok`` flags. Used without client-level DP (the realized
    weight total is then not a private quantity at that level).

    Privacy:
        Not a client-level DP aggregate. With example-level DP each ``u_s`` is already the
        output of a DP mechanism and this is post-processing (client sampling and the weights,
        the clients' dataset sizes, are treated as public).
    """
    _, finite, _, _ = jax.vmap(_flat_norm)(updates)
    w = jnp.where((client_mask > 0) & finite, weights.astype(jnp.float32), 0.0)
    total = jnp.sum(w)
    norm_w = w / jnp.where(total > 0, total, 1.0)

    def mean(x):
        f = norm_w.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sum(jnp.where(f > 0, jnp.asarray(x, jnp.float32) * f, 0.0), axis=0)

    return jax.tree_util.tree_map(mean, updates), (w > 0).astype(jnp.float32)


def private_mean(
    updates: PyTree,
    client_mask: jax.Array,
    *,
    clip_norm: float,
    noise_std: float,
    noise_key: jax.Array,
    expected_clients: float,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """DP-FedAvg aggregate: (clipped sum + N(0, noise_std^2)) / expected_clients.

    Noise is drawn once per round from ``noise_key`` (independent per element), and the
    division is by the PUBLIC expected number of clients ``q_c * num_clients``, never by the
    realized count. Returns (mean, norms, ok).

    Privacy:
        One Gaussian mechanism per round with multiplier ``noise_std / clip_norm`` on a sum of
        sensitivity ``clip_norm`` (add/remove-one client); the division is post-processing.
    """
    clipped, norms, ok = clip_client_updates(updates, client_mask, clip_norm)
    total = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), clipped)
    noise = gaussian_noise(noise_key, total, noise_std)
    mean = jax.tree_util.tree_map(lambda s, n: (s + n) / expected_clients, total, noise)
    return mean, norms, ok


def server_apply(
    tx: optax.GradientTransformation, state: ServerState, mean_update: PyTree
) -> ServerState:
    """Feeds ``-mean_update`` to the server optimizer as a gradient and steps the round.

    Privacy:
        Post-processing of the aggregate.
    """
    grads = jax.tree_util.tree_map(jnp.negative, mean_update)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = jax.tree_util.tree_map(lambda p, q: p.astype(q.dtype), params, state.params)
    return ServerState(state.round + 1, params, opt_state)
