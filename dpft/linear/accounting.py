"""The accounting of the feature methods: `dpft.privacy.releases`, re-exported here.

Full-batch Gaussian compositions in Gaussian DP, calibrated and checked with PLD; see
`dpft.privacy.releases` for the statement.
"""

from dpft.privacy.releases import (
    PLD_DISCRETIZATION,
    Release,
    calibrate_gaussian_composition,
    dp_event,
    epsilon_of,
    gdp_delta,
    gdp_epsilon,
    gdp_mu,
    plan_releases,
)

__all__ = [
    "PLD_DISCRETIZATION",
    "Release",
    "calibrate_gaussian_composition",
    "dp_event",
    "epsilon_of",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu",
    "plan_releases",
]
