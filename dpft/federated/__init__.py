"""Federated DP training: FedAvg / FedSGD with example-level or client-level (DP-FedAvg) privacy.

Modules: `partition` (seeded client splits), `driver` (config, plan, vectorized rounds),
`server` (client-update clipping, aggregation, server optimizer), `accounting` (epsilon at
each level), `runner` (rounds with checkpoints, resume and eval callbacks), `phases`
(fine-tuning modes, LP-FT included, over the runner; used by `cli`).
"""

from dpft.federated import accounting, partition
from dpft.federated.driver import FedConfig, FedPlan, make_plan, make_round, round_inputs
from dpft.federated.runner import RunResult, run
from dpft.federated.server import ServerState

__all__ = [
    "FedConfig",
    "FedPlan",
    "RunResult",
    "ServerState",
    "accounting",
    "make_plan",
    "make_round",
    "partition",
    "round_inputs",
    "run",
]
