"""Feature-based DP methods for a linear head on frozen features X [N, d], labels y [N] in [0, K).

Every method is a fixed composition of Gaussian mechanisms on full-batch sums, calibrated to a
target (epsilon, delta) under add/remove-one neighbouring with dp-accounting's PLD accountant.
The mechanisms live in the DP core: the clipped sums and their noise in `dpft.privacy.rows`, the
accounting in `dpft.privacy.releases` (re-exported as `dpft.linear.accounting`); the modules here
hold the solvers and optimisers, which only post-process the noisy sums:

* `dp_gd`: full-batch DP gradient descent (SGD or Adam) from zero (Mehta et al. 2022);
* `dp_least_squares`: noisy X^T X and X^T Y, PSD projection, ridge solve (Sheffet 2017;
  Mehta et al. 2023);
* `dp_newton`: Newton-type steps for multinomial logistic regression with a shared, noisy
  d x d curvature bound (Boehning 1992);
* `dp_fc`: DP gradient descent preconditioned by a noisy feature covariance (Mehta et al. 2023).

Every method takes X as an array [N, d] or as a reader of sharded features on disk
(`dpft.train.feature_store.FeatureShards`, see `dpft.linear.data`): each clipped sum is then
accumulated shard by shard (`dpft.privacy.streaming`) and noised once, as in memory.

`least_squares` and `logistic_regression` are the non-private references. (The DP least-squares
code lives in the module `ridge`, so that the name `least_squares` here is the function.)
"""

from dpft.linear.common import LinearParams, accuracy, logits, predict
from dpft.linear.fc import dp_fc
from dpft.linear.gd import dp_gd
from dpft.linear.newton import dp_newton, logistic_regression
from dpft.linear.ridge import dp_least_squares, dp_sufficient_stats, least_squares
from dpft.privacy.releases import (
    Release,
    calibrate_gaussian_composition,
    epsilon_of,
    gdp_epsilon,
    gdp_mu,
)

__all__ = [
    "LinearParams",
    "Release",
    "accuracy",
    "calibrate_gaussian_composition",
    "dp_fc",
    "dp_gd",
    "dp_least_squares",
    "dp_newton",
    "dp_sufficient_stats",
    "epsilon_of",
    "gdp_epsilon",
    "gdp_mu",
    "least_squares",
    "logistic_regression",
    "logits",
    "predict",
]
