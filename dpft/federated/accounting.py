"""Privacy accounting for federated training at the example level and at the client level.

Both levels reduce to ledger entries of `dpft.privacy.accounting.GaussianSteps`, so epsilon is
computed by the same dp-accounting code (PLD by default) as centralized DP-SGD.

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

from dpft.privacy.accounting import GaussianSteps, calibrate_noise_multiplier, compute_epsilon

__all__ = [
    "calibrate",
    "client_level_entry",
    "client_level_epsilon",
    "example_level_entry",
    "example_level_epsilon",
]


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
        (epsilon, delta)-DP under add/remove-one client for the sequence of global models.
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
        (epsilon, delta)-DP under add/remove-one example of any client, for everything the
        clients send to the server over all rounds.
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
        The returned z satisfies the corresponding ``*_level_epsilon(z, ...) <= target``.
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
