"""The audit's white-box model and training set: each example carries the gradient it should have.

With ``norms='vmap'`` the "model" is one parameter vector ``w`` of size
``d = real_dim + m + free_dim`` and the per-example loss is ``<w, example['g']>``, so each
example's gradient IS the vector it carries. With ``norms='ghost'`` it is a flax ``nn.Dense(d)``
layer applied to a 2-vector ``example['a']`` with loss ``<Dense(a), g>``: the kernel gradient is
``a g^T`` and the bias gradient is ``g``, and the per-example norms come from dpft's
`GhostNorms` (which intercepts the Dense call).

* real examples: random gradients in the first ``real_dim`` coordinates, norms around C (with
  ghost norms split between the kernel and the bias);
* canary ``i``: a dirac ``canary_scale * C * e_{real_dim + i}`` (clipped to exactly C); with
  ghost norms it sits in the bias only (``a = 0``);
* ``free_dim`` coordinates no example touches: they hold pure noise, which is what an auditor
  that sees the iterates can use to read the per-step noise scale.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from dpft.audit.config import AuditConfig

GHOST_INPUT_DIM = 2  # the Dense layer's input size (ghost norms pick the "ghost" form for it)


class _DenseModel(nn.Module):
    """One ``nn.Dense(features)`` layer: the audit model for ghost norms."""

    features: int

    @nn.compact
    def __call__(self, a):
        return nn.Dense(self.features, name="dense")(a)


def _loss(params, frozen, example, rng):
    """Linear per-example loss <w, g>: its gradient with respect to w is exactly g."""
    del frozen, rng
    return jnp.vdot(params["w"], example["g"]), {"correct": jnp.zeros((), jnp.float32)}


def _dense_loss(features: int):
    """Per-example loss ``<Dense(a), g>``: kernel gradient ``a g^T``, bias gradient ``g``."""
    model = _DenseModel(features)

    def loss(params, frozen, example, rng):
        del frozen, rng
        y = model.apply({"params": params}, example["a"])
        return jnp.vdot(y, example["g"]), {"correct": jnp.zeros((), jnp.float32)}

    return loss


def _model(norms: str, d: int):
    """(initial params, loss_fn, view) where ``view(params)`` is the scored d-vector."""
    if norms == "ghost":
        params = {
            "dense": {
                "kernel": jnp.zeros((GHOST_INPUT_DIM, d), jnp.float32),
                "bias": jnp.zeros((d,), jnp.float32),
            }
        }
        return params, _dense_loss(d), lambda p: p["dense"]["bias"]
    return {"w": jnp.zeros((d,), jnp.float32)}, _loss, lambda p: p["w"]


def _make_data(cfg: AuditConfig, rng: np.random.Generator):
    """Secret bits and the training set, padded to max_examples rows; returns (S, data, n).

    ``data`` holds ``g`` [rows, d] and, for ghost norms, the Dense inputs ``a`` [rows, 2].
    """
    m, c = cfg.canaries, cfg.clip_norm
    d = cfg.real_dim + m + cfg.free_dim
    secrets = rng.choice(np.array([-1, 1]), size=m)
    real = rng.normal(size=(cfg.num_real, cfg.real_dim))
    real *= (c * rng.uniform(0.5, 2.0, size=(cfg.num_real, 1))) / np.maximum(
        np.linalg.norm(real, axis=1, keepdims=True), 1e-12
    )
    g = np.zeros((cfg.max_examples, d), np.float32)
    a = np.zeros((cfg.max_examples, GHOST_INPUT_DIM), np.float32)
    if cfg.norms == "ghost":  # |a| = 1: the norm sqrt(|a|^2 + 1) |g| splits kernel and bias
        real /= math.sqrt(2.0)
        unit = rng.normal(size=(cfg.num_real, GHOST_INPUT_DIM))
        a[: cfg.num_real] = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    g[: cfg.num_real, : cfg.real_dim] = real
    if cfg.shuffle:  # swap design: slot i holds S_i times the canary
        rows = cfg.num_real + np.arange(m)
        g[rows, cfg.real_dim + np.arange(m)] = secrets * cfg.canary_scale * c
        n = cfg.max_examples
    else:  # add/remove design: canary i is in the training set iff S_i = +1
        included = np.flatnonzero(secrets > 0)
        rows = cfg.num_real + np.arange(included.size)
        g[rows, cfg.real_dim + included] = cfg.canary_scale * c
        n = cfg.num_real + included.size
    data = {"g": g}
    if cfg.norms == "ghost":
        data["a"] = a
    return secrets, data, n
