"""DP mechanisms over clients: client-update clipping, the noisy client-level mean, and the
ledger entries of federated training at the example level and at the client level.

Client updates arrive stacked over a static number of client slots (leading axis S) with a
client mask; padded slots (mask 0) contribute exactly zero, like padded examples in a batch.
Sums over slots are ``jnp.sum`` reductions (no contractions).

Accounting: both levels reduce to ledger entries of `dpft.privacy.accounting.GaussianSteps`,
so epsilon is computed by the same dp-accounting code (PLD by default) as centralized DP-SGD.

Example level (each client runs DP-SGD on its own data):
    An example lives in exactly one client. In a round where its client participates, that
    client runs ``K`` local DP-SGD steps, each a Poisson-subsampled (rate ``q_local``) Gaussian
    mechanism on the client's data; rounds where the client is not sampled do not touch it.
    The bound charged here is ``rounds * K`` subsampled Gaussian steps at rate ``q_local``,
    i.e. as if the client were sampled in every round. This ignores the extra amplification
    from client sampling, which is conservative and valid: not participating only removes
    steps from the composition (and which rounds a client joins is independent of its data).
    It protects every example of every client under add/remove-one example within a client's
    dataset, against an adversary who sees every client's update in every round.

Client level (DP-FedAvg, McMahan et al. 2018):
    Each round is one Poisson-subsampled (rate ``q_c`` over clients) Gaussian mechanism on the
    sum of client updates clipped to L2 norm ``S``: ``rounds`` steps at rate ``q_c``. It
    protects a client's whole dataset under add/remove-one client, against an adversary who
    sees the global model after every round.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from dpft.privacy import adaptive
from dpft.privacy.accounting import GaussianSteps, calibrate_noise_multiplier, compute_epsilon
from dpft.privacy.noise import gaussian_noise

PyTree = Any

__all__ = [
    "calibrate",
    "clip_client_updates",
    "client_level_entry",
    "client_level_epsilon",
    "client_level_sum",
    "example_level_entry",
    "example_level_epsilon",
    "adaptive_private_mean",
    "private_mean",
    "update_norms",
]


# ------------------------------------------------------------------------------------------
# Mechanisms
# ------------------------------------------------------------------------------------------


def _pow2_scale(x: jax.Array, e: jax.Array) -> jax.Array:
    """``x * 2**e`` for |e| <= ~300 as two multiplications by normal powers of two."""
    half = e // 2
    return x * jnp.ldexp(jnp.float32(1.0), half) * jnp.ldexp(jnp.float32(1.0), e - half)


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


def update_norms(updates: PyTree) -> tuple[jax.Array, jax.Array]:
    """``(norms [S], finite [S])``: each slot's overflow-safe L2 norm and whether it is finite.

    Privacy:
        Not a DP mechanism: the norms and flags of raw client updates are private and must not
        be released (they have no bounded sensitivity).
    """
    norms, finite, _, _ = jax.vmap(_flat_norm)(updates)
    return norms, finite


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

    The noise is `gaussian_noise` drawn once per round from ``noise_key`` (independent per
    element), and the division is by the PUBLIC expected number of clients
    ``q_c * num_clients``, never by the realized count. Returns ``(mean, norms, ok)``; ``norms``
    and ``ok`` are the raw updates' (private, for debugging only).

    Privacy:
        One Gaussian mechanism per round with multiplier ``noise_std / clip_norm`` on a sum of
        sensitivity ``clip_norm`` (add/remove-one client); the division is post-processing.
        ``noise_key`` must be fresh per round.
    """
    clipped, norms, ok = clip_client_updates(updates, client_mask, clip_norm)
    total = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), clipped)
    noise = gaussian_noise(noise_key, total, noise_std)
    mean = jax.tree_util.tree_map(lambda s, n: (s + n) / expected_clients, total, noise)
    return mean, norms, ok


def adaptive_private_mean(
    updates: PyTree,
    client_mask: jax.Array,
    clip: adaptive.AdaptiveClipState,
    *,
    noise_multiplier: float,
    count_noise: float,
    noise_key: jax.Array,
    expected_clients: float,
    target_quantile: float,
    learning_rate: float,
) -> tuple[PyTree, adaptive.AdaptiveClipState, jax.Array, jax.Array]:
    """`private_mean` at the adaptive clip norm ``clip.clip_norm``, and the next clip norm.

    The updates are clipped at ``C = clip.clip_norm`` (a traced value), the sum gets
    ``N(0, (z_delta C)^2)`` per element from ``noise_key`` (``z_delta =
    adaptive.split_noise_multiplier(noise_multiplier, count_noise)``) and is divided by the
    PUBLIC ``expected_clients``; the centred count of clients whose update norm is <= C (a
    non-finite update counts as clipped) gets ``N(0, count_noise^2)`` from
    ``adaptive.count_key(noise_key, clip.step)`` and updates C (`adaptive.update_state`).
    Returns ``(mean, next clip state, norms, ok)``; ``norms`` and ``ok`` are private.

    Privacy:
        The clipped sum has sensitivity C and the centred count 1/2 under add/remove-one
        client; together one Gaussian mechanism per round with multiplier ``noise_multiplier``
        (`adaptive.split_noise_multiplier`), i.e. the same `client_level_entry` as
        `private_mean` at that multiplier. The next clip norm is post-processing.
        ``noise_key`` must be fresh per round.
    """
    zd = adaptive.split_noise_multiplier(noise_multiplier, count_noise)
    c = clip.clip_norm
    clipped, norms, ok = clip_client_updates(updates, client_mask, c)
    total = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), clipped)
    noise = gaussian_noise(noise_key, total, zd * c)
    mean = jax.tree_util.tree_map(lambda s, n: (s + n) / expected_clients, total, noise)
    centred = adaptive.centred_unclipped_count(jnp.where(ok > 0, norms, jnp.inf), client_mask, c)
    nxt = adaptive.update_state(
        clip,
        noise_key,
        centred,
        target_quantile=target_quantile,
        learning_rate=learning_rate,
        count_noise=count_noise,
        expected_count=expected_clients,
    )
    return mean, nxt, norms, ok


# ------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------


def client_level_entry(
    noise_multiplier: float,
    client_rate: float,
    rounds: int,
    num_clients: int | None = None,
    max_clients: int | None = None,
) -> GaussianSteps:
    """Ledger entry of ``rounds`` DP-FedAvg rounds.

    With ``max_clients < num_clients`` (static client slots) the truncation of a round's Poisson
    draw is accounted as for truncated example batches (overflow charged to delta, or exact).

    Privacy:
        Neighbouring = add/remove one client (its whole dataset). Per round the clipped sum of
        client updates has L2 sensitivity S (the client clip), and the noise std is ``z * S``.
    """
    capped = max_clients is not None and num_clients is not None and max_clients < num_clients
    return GaussianSteps(
        noise_multiplier,
        client_rate,
        int(rounds),
        "full" if client_rate == 1 else "poisson",
        dataset_size=num_clients if capped else None,
        max_batch_size=max_clients if capped else None,
    )


def example_level_entry(
    noise_multiplier: float,
    local_rate: float,
    rounds: int,
    local_steps: int,
    max_client_size: int | None = None,
    local_batch: int | None = None,
) -> GaussianSteps:
    """Ledger entry of ``rounds`` rounds of ``local_steps`` local DP-SGD steps per client.

    ``max_client_size`` and ``local_batch`` (the static local batch cap) account for truncation
    of local Poisson batches; the largest client has the largest overflow probability, so
    using it covers every client.

    Privacy:
        Neighbouring = add/remove one example within one client's dataset. Each local step is a
        Poisson-subsampled Gaussian mechanism with sensitivity C (the per-example clip) and
        noise std ``z * C``; see the module docstring for why ``rounds * local_steps`` steps
        at rate ``local_rate`` (no client-sampling amplification) is a valid upper bound.
    """
    capped = (
        local_rate < 1
        and local_batch is not None
        and max_client_size is not None
        and local_batch < max_client_size
    )
    return GaussianSteps(
        noise_multiplier,
        local_rate,
        int(rounds) * int(local_steps),
        "full" if local_rate == 1 else "poisson",
        dataset_size=max_client_size if capped else None,
        max_batch_size=local_batch if capped else None,
    )


def client_level_epsilon(
    noise_multiplier: float,
    client_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "pld",
    **kwargs,
) -> float:
    """Client-level epsilon of DP-FedAvg (see `client_level_entry`; kwargs go there).

    Privacy:
        (epsilon, delta)-DP under add/remove-one client for the sequence of global models
        (per-round sensitivity: the client clip S).
    """
    entry = client_level_entry(noise_multiplier, client_rate, rounds, **kwargs)
    return compute_epsilon(entry, delta, accountant)


def example_level_epsilon(
    noise_multiplier: float,
    local_rate: float,
    rounds: int,
    local_steps: int,
    delta: float,
    accountant: str = "pld",
    **kwargs,
) -> float:
    """Example-level epsilon covering every example of every client (see the module docstring).

    Privacy:
        (epsilon, delta)-DP under add/remove-one example of any client (per-step sensitivity:
        the per-example clip C), for everything the clients send to the server over all rounds.
    """
    entry = example_level_entry(noise_multiplier, local_rate, rounds, local_steps, **kwargs)
    return compute_epsilon(entry, delta, accountant)


def calibrate(
    level: str,
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    client_rate: float = 1.0,
    local_rate: float = 1.0,
    local_steps: int = 1,
    accountant: str = "pld",
    **kwargs,
) -> float:
    """Smallest noise multiplier whose epsilon at ``level`` ('client' or 'example') <= target.

    ``kwargs`` are the truncation arguments of the matching ``*_entry`` function.

    Privacy:
        The returned z satisfies the corresponding ``*_level_epsilon(z, ...) <= target`` under
        that level's neighbouring relation (add/remove-one client, or add/remove-one example).
    """
    if not (target_epsilon and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"calibration needs a finite target_epsilon > 0, got {target_epsilon}")
    if level == "client":
        entry = client_level_entry(1.0, client_rate, rounds, **kwargs)
    elif level == "example":
        entry = example_level_entry(1.0, local_rate, rounds, local_steps, **kwargs)
    else:
        raise ValueError(f"level must be 'client' or 'example', got {level!r}")
    return calibrate_noise_multiplier(
        target_epsilon,
        delta,
        entry.sampling_rate,
        entry.count,
        accountant,
        sampling=entry.sampling,
        dataset_size=entry.dataset_size,
        max_batch_size=entry.max_batch_size,
    )
