"""Re-initialisation of flax parameters to match another framework's defaults.

PyTorch initialises ``nn.Linear`` and ``nn.Conv2d`` weights with ``kaiming_uniform_(a=sqrt(5))``
and biases uniformly, both on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` where ``fan_in`` is the
number of inputs of one output unit (in_features, or in_channels * kh * kw). Flax's defaults are
LeCun-normal kernels (std ``1/sqrt(fan_in)``, about 1.7x larger) and zero biases. Reproducing a
PyTorch recipe (the Opacus MNIST example, say) is more faithful with PyTorch's initialisation,
since under DP-SGD the scale of the initial weights interacts with the clip norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

INITS = ("default", "torch")


def torch_default_init(params: Mapping[str, Any], key: jax.Array) -> dict[str, Any]:
    """``params`` with every module holding a ``kernel`` re-drawn like PyTorch's defaults.

    A module is a mapping with a ``kernel`` leaf (Dense ``[in, out]``, Conv ``[kh, kw, in, out]``);
    its fan-in is the product of all kernel dimensions but the last. Its kernel and bias (if any)
    are drawn i.i.d. uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``. Other leaves (norm scales
    and offsets) are kept. Keys are derived from ``key`` and the module's path, so the result does
    not depend on dict order.
    """

    def visit(node, path):
        if not isinstance(node, Mapping):
            return node
        out = {k: visit(v, (*path, k)) for k, v in node.items()}
        kernel = node.get("kernel")
        if kernel is not None and not isinstance(kernel, Mapping):
            fan_in = int(np.prod(kernel.shape[:-1]))
            bound = 1.0 / np.sqrt(max(fan_in, 1))
            mkey = key
            for part in path:
                mkey = jax.random.fold_in(mkey, _stable_hash(part))
            kkey, bkey = jax.random.split(mkey)
            out["kernel"] = jax.random.uniform(
                kkey, kernel.shape, kernel.dtype, minval=-bound, maxval=bound
            )
            if "bias" in node:
                bias = node["bias"]
                out["bias"] = jax.random.uniform(
                    bkey, bias.shape, bias.dtype, minval=-bound, maxval=bound
                )
        return out

    return visit(params, ())


def reinit(variables: Mapping[str, Any], kind: str, key: jax.Array) -> dict[str, Any]:
    """``variables`` with their ``params`` collection re-initialised per ``kind`` (see `INITS`)."""
    if kind == "default":
        return dict(variables)
    if kind == "torch":
        return {**variables, "params": torch_default_init(variables["params"], key)}
    raise ValueError(f"config.model.init must be one of {'|'.join(INITS)}, got {kind!r}")


def _stable_hash(name: str) -> int:
    h = 2166136261
    for b in str(name).encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


__all__ = ["INITS", "reinit", "torch_default_init"]
