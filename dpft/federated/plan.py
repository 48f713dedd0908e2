"""Federated run settings, the resolved static plan, and host-side sampling of a round.

`FedConfig` holds what a user chooses; `make_plan` validates it against the client sizes and
resolves the static shapes (client slots, local batch) and the noise multiplier (calibrated to a
target epsilon when negative). `round_inputs` draws a round's clients and local batches on the
host as static-shape arrays, a pure function of ``(seed, round)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from dpft.privacy import accounting, adaptive, keys, sampling
from dpft.privacy import clients as dp_clients
from dpft.privacy.accounting import GaussianSteps
from dpft.privacy.noise import noise_std

__all__ = [
    "DP_LEVELS",
    "FedConfig",
    "FedPlan",
    "RoundInputs",
    "adaptive_clip",
    "check_delta",
    "make_plan",
    "round_entry",
    "round_inputs",
]

DP_LEVELS = ("none", "example", "client")


@dataclasses.dataclass(frozen=True)
class FedConfig:
    """Federated run settings.

    ``algorithm``: 'fedavg' (K local steps of the local optimizer) or 'fedsgd' (one local SGD
    step with learning rate 1, so a client's update is minus its normalized clipped gradient
    sum, and ``server_lr`` is the effective learning rate). ``weighting``: 'examples' (client
    dataset sizes, FedAvg's default) or 'uniform'; client-level DP requires 'uniform' (each
    clipped update counts once, divided by the expected number of clients). ``dp``: 'none',
    'example' (local DP-SGD, per-example clip ``example_clip``) or 'client' (DP-FedAvg, client
    clip ``client_clip``). ``noise_multiplier < 0`` calibrates it to ``target_epsilon``.
    ``client_group``: clients vectorized together (``jax.vmap``); groups of that many run one
    after another inside the same jit (``lax.map``), which bounds memory by the group and, on
    CPU, avoids slow batched convolutions; None runs every client slot in one vmap. Results do
    not depend on it (up to float rounding). ``secure_noise``: client sampling, local batches,
    client keys and server noise come from a 64-bit secret of OS entropy
    (`dpft.privacy.keys.run_seed`) instead of ``seed``; `dpft.federated.runner.run` saves it
    with its checkpoints and reuses it on resume. ``adaptive_quantile`` > 0 (client level only):
    the client clip norm starts at ``client_clip`` and tracks that quantile of the client update
    norms (adaptive quantile clipping, `dpft.privacy.adaptive`), with geometric step
    ``adaptive_lr`` and count noise std ``adaptive_count_noise`` (< 0: expected clients / 20),
    see `adaptive_clip`.

    Privacy:
        'example' protects each example of each client (add/remove-one example within a
        client's dataset, per-example sensitivity ``example_clip`` per local step); 'client'
        protects each client's whole dataset (add/remove-one client, update sensitivity
        ``client_clip`` per round). 'none' is not private.
    """

    rounds: int = 10
    client_rate: float = 1.0
    max_clients: int | None = None
    algorithm: str = "fedavg"
    local_steps: int = 1
    local_rate: float = 1.0
    local_batch: int | None = None
    local_optimizer: str = "sgd"
    local_lr: float = 0.1
    local_momentum: float | None = None
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    weighting: str | None = None
    dp: str = "none"
    noise_multiplier: float = 0.0
    example_clip: float = 1.0
    client_clip: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "pld"
    seed: int = 0
    microbatch_size: int | None = None
    client_group: int | None = None
    secure_noise: bool = False
    adaptive_quantile: float = 0.0  # 0: a fixed client_clip
    adaptive_lr: float = 0.2
    adaptive_count_noise: float = -1.0  # < 0: expected clients per round / 20


@dataclasses.dataclass(frozen=True)
class FedPlan:
    """Static shapes and calibrated noise of a run (derived from the config and client sizes)."""

    client_sizes: tuple[int, ...]
    slots: int  # static client slots per round
    local_steps: int  # K
    local_batch: int  # static local batch B
    noise_multiplier: float
    weighting: str

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)


def check_delta(config: FedConfig, client_sizes: Sequence[int], name: str = "delta") -> None:
    """Refuses ``config.delta >= 1/N`` (one line naming ``name``); nothing to check without DP.

    Privacy:
        N is the number of privacy units: examples (the sum of the client sizes) at example
        level, clients at client level, matching each level's add/remove-one neighbouring.
    """
    if config.dp == "none":
        return
    units = len(client_sizes) if config.dp == "client" else int(sum(client_sizes))
    accounting.check_delta(config.delta, units, name)


def make_plan(config: FedConfig, client_sizes: Sequence[int], slot_multiple: int = 1) -> FedPlan:
    """Validates ``config`` and resolves slots, local batch, weighting and noise multiplier.

    ``slot_multiple`` rounds the static client slots up to a multiple (the number of devices
    the client axis is sharded over); extra slots are padding and never hold a client.

    Privacy:
        With ``noise_multiplier < 0`` the multiplier is calibrated so that the run's epsilon at
        its level (`dpft.privacy.clients`) is <= ``target_epsilon`` at ``delta``, and
        ``delta >= 1/N`` is refused (`check_delta`). Client dataset sizes are treated as public
        (they set weights and local normalization).
    """
    sizes = tuple(int(n) for n in client_sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError("every client needs at least one example")
    if config.dp not in DP_LEVELS:
        raise ValueError(f"dp must be one of {DP_LEVELS}, got {config.dp!r}")
    if config.algorithm not in ("fedavg", "fedsgd"):
        raise ValueError(f"algorithm must be fedavg or fedsgd, got {config.algorithm!r}")
    if config.client_group is not None and int(config.client_group) < 1:
        raise ValueError(f"client_group must be >= 1 (or None: all), got {config.client_group}")
    check_delta(config, sizes)
    m, q_c, q_l = len(sizes), config.client_rate, config.local_rate
    if not (0 < q_c <= 1 and 0 < q_l <= 1):
        raise ValueError("client_rate and local_rate must be in (0, 1]")
    slots = config.max_clients or (m if q_c == 1 else sampling.poisson_batch_cap(m, q_c))
    slots = min(int(slots), m)
    if q_c == 1 and slots < m:
        raise ValueError("client_rate=1 needs max_clients >= num_clients (no truncation)")
    slots = -(-slots // int(slot_multiple)) * int(slot_multiple)
    k = 1 if config.algorithm == "fedsgd" else int(config.local_steps)
    max_n = max(sizes)
    b = config.local_batch or (max_n if q_l == 1 else sampling.poisson_batch_cap(max_n, q_l))
    if q_l == 1 and b < max_n:
        raise ValueError(f"local_rate=1 needs local_batch >= the largest client ({max_n})")
    weighting = config.weighting or ("uniform" if config.dp == "client" else "examples")
    if weighting not in ("examples", "uniform"):
        raise ValueError(f"weighting must be examples or uniform, got {weighting!r}")
    if config.dp == "client" and weighting != "uniform":
        raise ValueError("client-level DP needs uniform weighting (bounded per-client weight)")
    z = float(config.noise_multiplier) if config.dp != "none" else 0.0
    if z < 0:
        kw = (
            {"num_clients": m, "max_clients": slots}
            if config.dp == "client"
            else {"max_client_size": max_n, "local_batch": b}
        )
        z = dp_clients.calibrate(
            config.dp,
            config.target_epsilon,
            config.delta,
            config.rounds,
            client_rate=q_c,
            local_rate=q_l,
            local_steps=k,
            accountant=config.accountant,
            **kw,
        )
    if config.dp == "client":
        noise_std(z, config.client_clip)  # checks a finite clip when z > 0
    return FedPlan(sizes, slots, k, int(b), z, weighting)


def adaptive_clip(
    config: FedConfig, plan: FedPlan, name: str = "adaptive_count_noise"
) -> dict | None:
    """The ``adaptive_clip`` settings of `dpft.federated.driver.make_round` (None when off).

    ``{"target_quantile", "learning_rate", "count_noise"}`` with the count noise resolved
    (``adaptive_count_noise < 0``: ``adaptive.default_count_noise(client_rate * num_clients)``).
    Refuses (one line, naming ``name`` for the count noise) a level other than 'client', a
    quantile outside (0, 1], a negative or non-finite learning rate, and a count noise std
    ``sigma_b <= z / 2`` for the plan's noise multiplier z.

    Privacy:
        The clipped sum and the centred count of a round are one Gaussian mechanism with the
        plan's multiplier z (`dpft.privacy.adaptive.split_noise_multiplier`): `round_entry` is
        unchanged. ``sigma_b`` is a public function of the public expected number of clients.
    """
    gamma = float(config.adaptive_quantile)
    if gamma == 0:
        return None
    if config.dp != "client":
        raise ValueError(
            f"adaptive clipping needs client-level DP (dp='client'), got dp={config.dp!r}"
        )
    if not 0 < gamma <= 1:
        raise ValueError(f"adaptive_quantile must be in (0, 1] (0 = off), got {gamma}")
    eta = float(config.adaptive_lr)
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"adaptive_lr must be finite and >= 0, got {config.adaptive_lr!r}")
    sigma_b = float(config.adaptive_count_noise)
    if sigma_b < 0:
        sigma_b = adaptive.default_count_noise(config.client_rate * plan.num_clients)
    if not math.isfinite(sigma_b):
        raise ValueError(f"{name} must be finite, got {config.adaptive_count_noise!r}")
    try:
        adaptive.split_noise_multiplier(plan.noise_multiplier, sigma_b)
    except ValueError:
        raise ValueError(
            f"{name}={config.adaptive_count_noise:g} gives count noise std sigma_b={sigma_b:g}, "
            f"which must exceed noise_multiplier/2 = {plan.noise_multiplier / 2:g}"
        ) from None
    return {"target_quantile": gamma, "learning_rate": eta, "count_noise": sigma_b}


def round_entry(config: FedConfig, plan: FedPlan) -> GaussianSteps | None:
    """Ledger entry of ONE round at the run's DP level (None without DP).

    Privacy:
        'client': one subsampled Gaussian step at rate q_c (add/remove-one client); 'example':
        K local steps at rate q_local (add/remove-one example), see `dpft.privacy.clients`.
    """
    if config.dp == "client":
        return dp_clients.client_level_entry(
            plan.noise_multiplier, config.client_rate, 1, plan.num_clients, plan.slots
        )
    if config.dp == "example":
        return dp_clients.example_level_entry(
            plan.noise_multiplier,
            config.local_rate,
            1,
            plan.local_steps,
            max(plan.client_sizes),
            plan.local_batch,
        )
    return None


class RoundInputs(NamedTuple):
    batch: dict  # arrays [slots, K, B, ...]
    mask: np.ndarray  # float32 [slots, K, B]
    client_mask: np.ndarray  # float32 [slots]
    client_ids: np.ndarray  # int32 [slots] (padding slots: 0)
    weights: np.ndarray  # float32 [slots]
    inv_expected: np.ndarray  # float32 [slots]
    seed: np.ndarray | None = None  # uint32 [2]: the run's seed as a key, keys.root_key(seed),
    # an input so that runs with different seeds share one compiled round (None: the round
    # function's config.seed)


def round_inputs(
    config: FedConfig,
    plan: FedPlan,
    dataset: dict[str, np.ndarray],
    clients: Sequence[np.ndarray],
    round_: int,
    seed: int | None = None,
) -> RoundInputs:
    """Host-side sampling and gathering of round ``round_`` (pure function of seed and round).

    ``seed`` is the run's seed in [0, 2**64) (default ``config.seed``; in secure mode the
    runner's secret): it seeds client sampling and local batches here, and is handed to the
    round function as ``keys.root_key(seed)``, the root of the client keys and server noise.

    Privacy:
        Client sampling is Poisson at rate ``q_c`` and local batches Poisson at rate
        ``q_local`` (truncated to the static caps), as assumed by the accountants. The sampled
        ids and batches are private and must not be logged.
    """
    s, k, b = plan.slots, plan.local_steps, plan.local_batch
    seed = int(config.seed if seed is None else seed)
    root = np.asarray(keys.root_key(seed), np.uint32)  # checks 0 <= seed < 2**64
    if config.client_rate == 1 and s == plan.num_clients:
        ids, cmask = np.arange(s), np.ones(s, bool)
    else:
        draw = sampling.PoissonSampler(plan.num_clients, config.client_rate, seed, s)
        ids, cmask = draw.batch_at(round_)
    local = np.zeros((s, k, b), np.int64)
    emask = np.zeros((s, k, b), bool)
    weights = np.zeros(s, np.float32)
    inv = np.ones(s, np.float32)
    for slot in np.flatnonzero(cmask):
        cid, n = int(ids[slot]), plan.client_sizes[int(ids[slot])]
        weights[slot] = n if plan.weighting == "examples" else 1.0
        inv[slot] = 1.0 / (config.local_rate * n)
        for j in range(k):
            if config.local_rate == 1:
                local[slot, j, :n], emask[slot, j, :n] = np.arange(n), True
                continue
            rng = np.random.default_rng([seed, 1, round_, cid, j])
            m = min(int(rng.binomial(n, config.local_rate)), b)
            local[slot, j, :m] = np.sort(rng.choice(n, size=m, replace=False))
            emask[slot, j, :m] = True
    glob = np.zeros((s, k, b), np.int64)
    for slot in np.flatnonzero(cmask):
        glob[slot] = np.asarray(clients[int(ids[slot])])[local[slot]]
    batch = {name: np.asarray(v)[glob] for name, v in dataset.items()}
    return RoundInputs(
        batch,
        emask.astype(np.float32),
        cmask.astype(np.float32),
        np.where(cmask, ids, 0).astype(np.int32),
        weights,
        inv,
        root,
    )
