"""FedAvg / FedSGD rounds: clients vectorized with ``jax.vmap`` inside one jit, host sampling.

A round ``r``:
1. the host samples clients by Poisson sampling at rate ``q_c`` (a pure function of
   ``(seed, r)``), padded to ``plan.slots`` static client slots with a client mask, and gathers
   each sampled client's ``K`` local batches as ``[slots, K, B, ...]`` arrays with example masks
   (local Poisson sampling at rate ``q_local``, a pure function of ``(seed, r, client, k)``);
2. inside one jit, ``jax.vmap`` over slots (or over groups of ``client_group`` slots, the groups
   one after another with ``lax.map``) runs ``lax.scan`` over the ``K`` local steps of the
   SAME step function as centralized training (`dpft.train.step.make_train_step`), from the
   global parameters, with the client's own keys; its update is ``local - global``;
3. the server aggregates (weighted mean, or at client level the DP core's clipped noisy sum /
   expected clients, `dpft.privacy.clients.private_mean`) and applies the server optimizer to
   the negative aggregate.

Keys: every key of a run comes from its root ``keys.root_key(seed)`` (both words of a 64-bit
secret in secure mode) through `dpft.privacy.keys.derive`, one purpose per stream:
``derive(root, "client", r, c)`` for client ``c`` in round ``r`` (`client_key`),
``derive(root, "server", r)`` for the server noise (`server_noise_key`), and under a client key
``derive(ck, "noise")`` for its local privatizer and ``derive(ck, "examples", k)`` for the
per-example loss of local step ``k`` (`local_keys`).

Padded client slots have all example masks 0 and client mask 0: they contribute exactly zero.
Trainable/frozen parameters come from `dpft.train.step.partition`, so head tuning and full
tuning are the same code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from dpft.federated import server as srv
from dpft.federated.plan import (
    DP_LEVELS,
    FedConfig,
    FedPlan,
    RoundInputs,
    adaptive_clip,
    make_plan,
    round_entry,
    round_inputs,
)
from dpft.privacy import clients as dp_clients
from dpft.privacy import clipping, keys
from dpft.privacy.noise import PrivatizerState, gaussian_privatizer, noise_std
from dpft.train.step import TrainState, make_train_step

__all__ = [
    "DP_LEVELS",
    "FedConfig",
    "FedPlan",
    "RoundInputs",
    "adaptive_clip",
    "client_key",
    "local_keys",
    "make_local_update",
    "make_plan",
    "make_round",
    "round_entry",
    "round_inputs",
    "server_noise_key",
]


# ------------------------------------------------------------------------------------------
# Client side
# ------------------------------------------------------------------------------------------


class ClientScale(NamedTuple):
    scale: jax.Array  # float32: 1 / (q_local * n_client), the client's public expected batch


def _scale_by_client() -> optax.GradientTransformation:
    """Divides the noisy sum by the client's expected local batch (held in the state)."""

    def init(params):
        del params
        return ClientScale(jnp.ones([], jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u: u * state.scale, updates), state

    return optax.GradientTransformation(init, update)


def _local_tx(config: FedConfig, plan: FedPlan, sensitivity: float) -> optax.GradientTransformation:
    if config.algorithm == "fedsgd":
        base = optax.sgd(1.0)
    elif config.local_optimizer == "sgd":
        base = optax.sgd(config.local_lr, momentum=config.local_momentum)
    elif config.local_optimizer == "adam":
        base = optax.adam(config.local_lr)
    else:
        raise ValueError(f"local_optimizer must be sgd or adam, got {config.local_optimizer!r}")
    if config.dp == "example":
        priv = gaussian_privatizer(plan.noise_multiplier, sensitivity, 0)
    else:
        priv = optax.identity()
    return optax.chain(priv, _scale_by_client(), base)


def _root(seed) -> jax.Array:
    """The root key of a seed given as an int (``keys.root_key``) or already as a key."""
    if isinstance(seed, (int, np.integer)):
        return keys.root_key(int(seed))
    return jnp.asarray(seed)


def client_key(seed, round_: jax.Array | int, client_id: jax.Array | int) -> jax.Array:
    """``derive(root, "client", round_, client_id)``: the key of a client in a round.

    ``seed`` is the run's seed (an int in [0, 2**64)) or its root key ``keys.root_key(seed)``.

    Privacy:
        Distinct (round, client) pairs get independent keys, disjoint from every other purpose
        under the root, so local noise is independent across clients, rounds and (see
        `local_keys`) local steps. ``secure_noise`` makes the root a 64-bit secret.
    """
    return keys.derive(_root(seed), "client", round_, client_id)


def server_noise_key(seed, round_: jax.Array | int) -> jax.Array:
    """``derive(root, "server", round_)``: the client-level noise key of a round.

    Privacy:
        One fresh key per round, disjoint from the client keys, split per leaf by
        `gaussian_noise`: the server noise is independent across rounds and elements and of
        the clients' local noise.
    """
    return keys.derive(_root(seed), "server", round_)


def local_keys(key: jax.Array, local_steps: int) -> tuple[jax.Array, jax.Array]:
    """``(derive(key, "noise"), [derive(key, "examples", k) for k < local_steps])`` of a client.

    The first is the root of the client's local privatizer (step ``t`` draws from
    ``derive(., "step", t)``), the others the per-example loss keys of its local steps.

    Privacy:
        The privatizer's keys and the loss keys come from disjoint purposes under the client
        key, so the local DP noise is independent of the (data-dependent) loss randomness.
    """
    steps = jax.vmap(lambda k: keys.derive(key, "examples", k))(jnp.arange(local_steps))
    return keys.derive(key, "noise"), steps


def make_local_update(
    loss_fn: Callable,
    config: FedConfig,
    plan: FedPlan,
    clipper: clipping.Clipper | None = None,
    norm_strategy: clipping.NormStrategy | None = None,
) -> Callable:
    """``local_update(params, frozen, batch, mask, inv_expected, key) -> (update, metrics)``.

    One client: ``K`` steps of `make_train_step` (``lax.scan``) on ``batch`` [K, B, ...] with
    ``mask`` [K, B], starting from ``params``; returns ``local - params`` (float32). The
    privatizer key of the local DP chain and the per-step example keys are `local_keys` of
    ``key``. ``clipper`` defaults to ``FlatClip(example_clip)`` at example
    level (no clipping otherwise); a custom one must define ``sensitivity(None)`` (a bound
    `PerLayerClip`, `FlatClip`, `AutoClip`, `GlobalClip`): the local noise is scaled by it.
    ``norm_strategy`` computes the per-example norms and the clipped sum as in centralized
    training (None: `clipping.VmapNorms`; `dpft.privacy.ghost.GhostNorms`: ghost norms).

    Privacy:
        With ``config.dp == 'example'`` every local step is DP-SGD: per-example gradients
        clipped to ``example_clip`` (sum sensitivity C, add/remove-one example of this client),
        Gaussian noise of std ``z * C`` from the client's own key (independent across clients,
        rounds and steps), divided by the client's expected batch ``q_local * n_client`` (its
        dataset size is treated as public, as N is in centralized DP-SGD). Otherwise the local
        update is NOT private by itself.
    """
    if clipper is None:
        clip = config.example_clip if config.dp == "example" else math.inf
        clipper = clipping.FlatClip(clip)
    sensitivity = float(clipper.sensitivity(None)) if config.dp == "example" else 1.0
    tx = _local_tx(config, plan, sensitivity)
    step = make_train_step(
        loss_fn, clipper, tx, microbatch_size=config.microbatch_size, norm_strategy=norm_strategy
    )
    k = plan.local_steps

    def local_update(params, frozen, batch, mask, inv_expected, key):
        noise_key, rngs = local_keys(key, k)
        first, *rest = tx.init(params)
        if isinstance(first, PrivatizerState):
            first = PrivatizerState(noise_key, jnp.zeros([], jnp.int32))
        opt_state = (first, ClientScale(jnp.asarray(inv_expected, jnp.float32)), *rest[1:])
        state = TrainState(jnp.zeros([], jnp.int32), params, opt_state, frozen)

        def body(s, xs):
            b, m, r = xs
            return step(s, {**b, "mask": m}, r)

        state, metrics = jax.lax.scan(body, state, (batch, mask, rngs))
        update = jax.tree_util.tree_map(
            lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), state.params, params
        )
        return update, jax.tree_util.tree_map(jnp.mean, metrics)

    return local_update


# ------------------------------------------------------------------------------------------
# A round
# ------------------------------------------------------------------------------------------


def make_round(
    loss_fn: Callable,
    config: FedConfig,
    plan: FedPlan,
    server_tx: optax.GradientTransformation,
    clipper: clipping.Clipper | None = None,
    *,
    jit: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    norm_strategy: clipping.NormStrategy | None = None,
    adaptive_clip: dict | None = None,
) -> Callable[[srv.ServerState, Any, RoundInputs], tuple[srv.ServerState, dict]]:
    """``round_fn(server_state, frozen, inputs) -> (server_state, metrics)``.

    One piece because the round is one compiled program: how the client slots are mapped
    (vmap, groups, devices), the per-client keys, the one aggregation (private mean, adaptive
    private mean or weighted mean) and the server update share its shapes and keys.

    ``adaptive_clip`` (client level only): ``{"target_quantile", "learning_rate",
    "count_noise"}`` of adaptive quantile clipping of the client updates
    (`dp_clients.adaptive_private_mean`); the clip norm is ``server_state.clip``
    (`dpft.privacy.adaptive.init_state(config.client_clip)` to start) and the metrics hold
    ``clip_norm`` (this round's) and ``unclipped_fraction`` (its noisy estimate), DP outputs.

    Clients run vectorized (``jax.vmap`` over slots of `make_local_update`) in one jit. With a
    ``mesh``, the client slots are split over its ``data_axis`` (``plan.slots`` must be a
    multiple of its size, see ``make_plan(slot_multiple=...)``): each device runs its own
    clients (``shard_map`` of the vmap), parameters are replicated, and the aggregation and the
    server noise run once on the gathered updates, with the same keys as on one device.
    ``clipper`` and ``norm_strategy`` go to `make_local_update`.

    Privacy:
        'client': each client's update is clipped to L2 norm ``client_clip`` (non-finite ones
        contribute zero), summed, N(0, (z S)^2) noise is added once per round with the round's
        key, and the sum is divided by ``q_c * num_clients``: one Gaussian mechanism of
        sensitivity S per round under add/remove-one client. With ``adaptive_clip``, S is the
        round's clip norm and the clipped sum and the noisy centred count together are one
        Gaussian mechanism with multiplier z (`dpft.privacy.adaptive`): the same round entry.
        'example': the local updates are DP-SGD outputs and the server is post-processing.
        Returned ``debug/`` metrics are not private.
    """
    if adaptive_clip is not None and config.dp != "client":
        raise ValueError("adaptive clipping of client updates needs client-level DP")
    local_update = make_local_update(loss_fn, config, plan, clipper, norm_strategy)
    z, s_clip = plan.noise_multiplier, config.client_clip
    std = noise_std(z, s_clip) if config.dp == "client" else 0.0
    expected = config.client_rate * plan.num_clients
    clients_fn = jax.vmap(local_update, in_axes=(None, None, 0, 0, 0, 0))
    group = config.client_group
    if group and group < plan.slots:  # groups of `group` clients vmapped, groups in sequence

        def clients_fn(params, frozen, batch, mask, inv_expected, ckeys):
            def one(x):
                return local_update(params, frozen, *x)

            return jax.lax.map(one, (batch, mask, inv_expected, ckeys), batch_size=group)

    if mesh is not None:
        if plan.slots % mesh.shape[data_axis]:
            raise ValueError(
                f"{plan.slots} client slots do not split over {mesh.shape[data_axis]} devices: "
                "build the plan with slot_multiple=<devices>"
            )
        rows = P(data_axis)
        clients_fn = jax.shard_map(
            clients_fn,
            mesh=mesh,
            in_specs=(P(), P(), rows, rows, rows, rows),
            out_specs=rows,
            check_vma=False,
        )

    def round_fn(state: srv.ServerState, frozen, inputs: RoundInputs):
        root = keys.root_key(config.seed) if inputs.seed is None else inputs.seed
        ckeys = jax.vmap(lambda c: client_key(root, state.round, c))(inputs.client_ids)
        updates, metrics = clients_fn(
            state.params, frozen, inputs.batch, inputs.mask, inputs.inv_expected, ckeys
        )
        cmask = inputs.client_mask
        clip = state.clip
        if adaptive_clip is not None:
            if clip is None:
                raise ValueError("adaptive clipping: the server state has no clip state")
            mean, clip, _, ok = dp_clients.adaptive_private_mean(
                updates,
                cmask,
                clip,
                noise_multiplier=z,
                noise_key=server_noise_key(root, state.round),
                expected_clients=expected,
                **adaptive_clip,
            )
        elif config.dp == "client":
            mean, _, ok = dp_clients.private_mean(
                updates,
                cmask,
                clip_norm=s_clip,
                noise_std=std,
                noise_key=server_noise_key(root, state.round),
                expected_clients=expected,
            )
        else:
            mean, ok = srv.weighted_mean(updates, cmask, inputs.weights)
        new_state = srv.server_apply(server_tx, state, mean)._replace(clip=clip)
        count = jnp.maximum(jnp.sum(cmask), 1.0)
        out = {k: jnp.sum(jnp.where(cmask > 0, v, 0.0)) / count for k, v in metrics.items()}
        if adaptive_clip is not None:
            out["clip_norm"] = state.clip.clip_norm
            out["unclipped_fraction"] = clip.fraction
        out["debug/clients"] = jnp.sum(cmask)
        out["debug/dropped_clients"] = jnp.sum(cmask) - jnp.sum(ok)
        return new_state, out

    return jax.jit(round_fn) if jit else round_fn
