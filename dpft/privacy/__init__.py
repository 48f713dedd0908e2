"""dpft's DP core: clipping, noise, sampling and accounting.

Flat and auditable: these modules import nothing else from dpft. Submodules load lazily, so
``python -m dpft.privacy.accounting`` runs without importing JAX's clipping code first.
"""

import importlib

_SUBMODULES = ("accounting", "clipping", "noise", "sampling")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
