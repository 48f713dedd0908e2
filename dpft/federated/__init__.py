"""Federated DP training: FedAvg / FedSGD with example-level or client-level (DP-FedAvg) privacy.

Modules: `partition` (seeded client splits), `driver` (config, plan, keys, vectorized rounds),
`server` (non-private weighted mean, server optimizer), `accounting` (epsilon at each level,
named from the DP core), `runner` (rounds with checkpoints, resume, secure seeds and eval
callbacks), `phases` (fine-tuning modes, LP-FT included, over the runner; used by `experiment`). The
DP mechanisms over clients (update clipping, the noisy client-level mean) and the accounting of
both levels are in the DP core, `dpft.privacy.clients`.
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
