"""dpft's DP core: every mechanism of dpft and its accounting.

Clipping of per-example gradients (`clipping`, `clippers`, `ghost`, `unfold`), of feature rows and
linear-head gradients (`rows`, shard by shard: `streaming`) and of client updates (`clients`),
with a clip norm that can track a quantile of the norms (`adaptive`); Gaussian noise (`noise`,
`rows`), also correlated across steps by a banded matrix factorization (`correlated`); keys and
secrets (`keys`); sampling (`sampling`), also of users clipped as units for user-level DP
(`users`); accounting of DP-SGD (`accounting`, `ledger`), of full-batch releases (`releases`),
of federated rounds (`clients`) and of hyperparameter tuning with a random number of runs
(`tuning`).

Flat and auditable: these modules import nothing else from dpft. Submodules load lazily, so
``python -m dpft.privacy.accounting`` runs without importing JAX's clipping code first.
"""

import importlib

_SUBMODULES = (
    "accounting",
    "accounting_cli",
    "adaptive",
    "banded_strategy",
    "clients",
    "clippers",
    "clipping",
    "correlated",
    "ghost",
    "keys",
    "ledger",
    "noise",
    "releases",
    "rows",
    "sampling",
    "streaming",
    "tuning",
    "unfold",
    "users",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
