"""Privacy accounting of federated runs at the example and the client level.

The ledger entries, epsilons and calibration live in the DP core, `dpft.privacy.clients`
(its module docstring explains both levels); this module names them for federated callers.
"""

from dpft.privacy.clients import (
    calibrate,
    client_level_entry,
    client_level_epsilon,
    example_level_entry,
    example_level_epsilon,
)

__all__ = [
    "calibrate",
    "client_level_entry",
    "client_level_epsilon",
    "example_level_entry",
    "example_level_epsilon",
]
