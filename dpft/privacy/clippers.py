"""Clipping rules: how per-example group norms become per-example scale factors.

A rule (`Clipper`) assigns each parameter leaf to a group and maps the groups' norms to scale
factors: flat L2 (`FlatClip`), per-layer (`PerLayerClip`), automatic (`AutoClip`) and global
(`GlobalClip`) clipping. `dpft.privacy.clipping.clipped_grad` applies a rule to per-example
gradients and states the sensitivity of the clipped sum; each rule's ``sensitivity`` bounds one
clipped example.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = [
    "AutoClip",
    "Clipper",
    "FlatClip",
    "GlobalClip",
    "PerLayerClip",
    "leaf_paths",
]


def leaf_paths(tree: PyTree) -> list[str]:
    """'/'-joined key paths of a pytree's leaves, in `jax.tree_util.tree_leaves` order."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for k in path:
            for attr in ("key", "name", "idx"):
                if hasattr(k, attr):
                    parts.append(str(getattr(k, attr)))
                    break
            else:
                parts.append(str(k))
        out.append("/".join(parts))
    return out


def _check_positive(name: str, value: float) -> None:
    if not (value > 0):  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value!r}")


# --------------------------------------------------------------------------------------------
# Clipping rules
# --------------------------------------------------------------------------------------------


class Clipper(Protocol):
    """A clipping rule: how per-example group norms become per-example scale factors.

    ``leaf_groups(params)`` assigns each leaf (in ``tree_leaves`` order) to one of
    ``num_groups(params)`` groups; a clipped example is ``g_group * factor[group]``.
    ``sensitivity(params)`` bounds the L2 norm of any one clipped example, so the SUM over a
    batch changes by at most that much when one example is added or removed.
    """

    def leaf_groups(self, params: PyTree) -> list[int]: ...

    def num_groups(self, params: PyTree) -> int: ...

    def factors(self, group_norms: jax.Array) -> jax.Array: ...

    def sensitivity(self, params: PyTree) -> float: ...


class _SingleGroup:
    def leaf_groups(self, params):
        return [0] * len(jax.tree_util.tree_leaves(params))

    def num_groups(self, params):
        return 1


@dataclasses.dataclass(frozen=True)
class FlatClip(_SingleGroup):
    """Flat L2 clipping (Abadi et al. 2016): ``g * min(1, C / ||g||)``.

    ``clip_norm=inf`` disables clipping (useful for exactness checks; not private).

    Privacy:
        Each clipped example has L2 norm <= C, so the clipped SUM has L2 sensitivity C under
        add/remove-one neighbouring, and 2C under replace-one.
    """

    clip_norm: float

    def __post_init__(self):
        _check_positive("clip_norm", self.clip_norm)

    def factors(self, group_norms):
        return jnp.minimum(1.0, self.clip_norm / group_norms)

    def sensitivity(self, params=None):
        return float(self.clip_norm)


@dataclasses.dataclass(frozen=True)
class AutoClip(_SingleGroup):
    """Automatic (normalized) clipping, AUTO-S of Bu et al. 2023: ``R * g / (||g|| + gamma)``.

    The clip norm disappears as a hyperparameter: ``R`` (default 1) only rescales the update,
    which a learning rate absorbs. ``gamma > 0`` keeps small gradients from being blown up.

    Reference: Bu, Wang, Zha, Karypis, "Automatic clipping: differentially private deep learning
    made easier and stronger", NeurIPS 2023.

    Privacy:
        ``||R g / (||g|| + gamma)|| < R``, so the clipped SUM has L2 sensitivity R (1 by default)
        under add/remove-one neighbouring, and 2R under replace-one.
    """

    gamma: float = 0.01
    scale: float = 1.0

    def __post_init__(self):
        _check_positive("gamma", self.gamma)
        _check_positive("scale", self.scale)

    def factors(self, group_norms):
        return self.scale / (group_norms + self.gamma)

    def sensitivity(self, params=None):
        return float(self.scale)


@dataclasses.dataclass(frozen=True)
class GlobalClip(_SingleGroup):
    """Global per-sample clipping (Bu et al.): ``g * (R / Z) * 1[||g|| <= Z]``.

    Every example whose gradient norm is at most the threshold ``Z`` is scaled by the SAME global
    factor ``R / Z`` (so the batch update keeps the direction of the plain gradient sum over
    those examples, which is what preserves the NTK's positive semi-definiteness in their
    analysis); an example above the threshold contributes zero. ``Z = R`` recovers "keep small
    gradients as they are, drop large ones".

    Reference: Bu, Wang, Zha, Karypis, "On the convergence and calibration of deep learning with
    differential privacy", TMLR 2023 (arXiv:2106.07830), Sec. 5.

    Privacy:
        A kept example has norm <= Z and is scaled by R/Z, so its norm is <= R; a dropped one is
        zero. The clipped SUM has L2 sensitivity R under add/remove-one neighbouring, and 2R
        under replace-one.
    """

    clip_norm: float
    threshold: float | None = None  # Z; defaults to clip_norm

    def __post_init__(self):
        _check_positive("clip_norm", self.clip_norm)
        if self.threshold is not None:
            _check_positive("threshold", self.threshold)

    @property
    def z(self) -> float:
        return self.clip_norm if self.threshold is None else self.threshold

    def factors(self, group_norms):
        keep = group_norms <= self.z
        return jnp.where(keep, self.clip_norm / self.z, 0.0)

    def sensitivity(self, params=None):
        return float(self.clip_norm)


@dataclasses.dataclass(frozen=True)
class PerLayerClip:
    """Per-layer (per-group) clipping: each group ``k`` is clipped to its own norm ``C_k``.

    Groups are given by ``group_fn(path) -> name`` over the '/'-joined leaf paths (default: every
    leaf is its own group). ``clip_norms`` is either one float for every group or a mapping from
    group name to norm; a mapping must name every group.

    Privacy:
        Each clipped example has L2 norm <= sqrt(sum_k C_k^2), which is the sensitivity of the
        clipped SUM under add/remove-one neighbouring (twice that under replace-one).
    """

    clip_norms: float | Mapping[str, float]
    group_fn: Callable[[str], str] | None = None

    def __post_init__(self):
        if isinstance(self.clip_norms, Mapping):
            for k, v in self.clip_norms.items():
                _check_positive(f"clip_norms[{k!r}]", v)
        else:
            _check_positive("clip_norms", self.clip_norms)

    def _names(self, params) -> list[str]:
        paths = leaf_paths(params)
        return [self.group_fn(p) if self.group_fn else p for p in paths]

    def _group_names(self, params) -> list[str]:
        return list(dict.fromkeys(self._names(params)))

    def leaf_groups(self, params):
        index = {n: i for i, n in enumerate(self._group_names(params))}
        return [index[n] for n in self._names(params)]

    def num_groups(self, params):
        return len(self._group_names(params))

    def norms_per_group(self, params) -> list[float]:
        names = self._group_names(params)
        if not isinstance(self.clip_norms, Mapping):
            return [float(self.clip_norms)] * len(names)
        missing = [n for n in names if n not in self.clip_norms]
        if missing:
            raise ValueError(f"clip_norms has no entry for parameter groups {missing}")
        return [float(self.clip_norms[n]) for n in names]

    def bind(self, params) -> _BoundPerLayer:
        return _BoundPerLayer(self, params)

    def factors(self, group_norms):  # pragma: no cover - needs params; see bind()
        raise TypeError("PerLayerClip needs the parameter structure: use clipper.bind(params)")

    def sensitivity(self, params):
        return math.sqrt(sum(c * c for c in self.norms_per_group(params)))


class _BoundPerLayer:
    """PerLayerClip with its group norms resolved against a parameter structure."""

    def __init__(self, spec: PerLayerClip, params):
        self.spec = spec
        self._groups = spec.leaf_groups(params)
        self._num = spec.num_groups(params)
        self._norms = spec.norms_per_group(params)

    def leaf_groups(self, params):
        return self._groups

    def num_groups(self, params):
        return self._num

    def factors(self, group_norms):
        c = jnp.asarray(self._norms, dtype=group_norms.dtype)
        return jnp.minimum(1.0, c / group_norms)

    def sensitivity(self, params=None):
        return math.sqrt(sum(c * c for c in self._norms))


def _bind(clipper, params):
    return clipper.bind(params) if isinstance(clipper, PerLayerClip) else clipper
