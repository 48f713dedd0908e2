"""Server side of a round: the non-private weighted mean and the server optimizer.

Client updates arrive stacked over a static number of client slots (leading axis S) with a
client mask; padded slots (mask 0) contribute exactly zero, like padded examples in a batch.
The client-level DP aggregate (clipping, noise) is `dpft.privacy.clients.private_mean`; what
this module does to its output is post-processing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpft.privacy import clients as dp_clients

PyTree = Any

__all__ = [
    "ServerState",
    "make_server_optimizer",
    "server_apply",
    "weighted_mean",
]


class ServerState(NamedTuple):
    round: jax.Array  # int32: rounds completed
    params: PyTree  # global trainable parameters (flat dict)
    opt_state: PyTree  # server optimizer state
    # adaptive client clipping (`dpft.privacy.adaptive.AdaptiveClipState`), None without it
    clip: Any = None


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
    _, finite = dp_clients.update_norms(updates)
    w = jnp.where((client_mask > 0) & finite, weights.astype(jnp.float32), 0.0)
    total = jnp.sum(w)
    norm_w = w / jnp.where(total > 0, total, 1.0)

    def mean(x):
        f = norm_w.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sum(jnp.where(f > 0, jnp.asarray(x, jnp.float32) * f, 0.0), axis=0)

    return jax.tree_util.tree_map(mean, updates), (w > 0).astype(jnp.float32)


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
    return ServerState(state.round + 1, params, opt_state, state.clip)
