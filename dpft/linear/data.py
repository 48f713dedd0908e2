"""The training rows of a feature method: an in-memory X, or a sharded reader read shard by shard.

Every method of `dpft.linear` takes ``X`` either as an array [N, d] or as a reader of sharded
features (`dpft.train.feature_store.FeatureShards`, or anything with ``iter_shards()`` yielding
``(x [rows, d], y [rows])`` and ``num_rows`` / ``dim``), and ``y`` as labels [N] (with a reader,
``y=None`` takes the labels stored in the shards). `rows_of` wraps either in an object whose
methods make the noisy releases the methods need:

* `InMemory` calls `dpft.privacy.rows` on the whole X (clipped and augmented rows are computed
  once and reused across steps);
* `Streamed` calls `dpft.privacy.streaming`, which accumulates each clipped sum over the shards
  (and the processes) and adds the noise once to the total: with the same key it releases what
  `InMemory` releases, up to float32 rounding of the summation order.

Inputs are checked as in `dpft.linear.common.check_data`; a streamed shard is checked as it is
read, before anything computed from it is released.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpft.linear.common import check_data
from dpft.privacy import rows, streaming

__all__ = ["InMemory", "Streamed", "is_sharded", "rows_of"]


def is_sharded(X) -> bool:
    """True for a reader of sharded features (it has ``iter_shards``)."""
    return hasattr(X, "iter_shards")


class InMemory:
    """The rows as one array; releases through `dpft.privacy.rows`."""

    def __init__(self, X, y, num_classes: int):
        self.X, self.y = check_data(X, y, num_classes)
        self.n, self.dim = int(self.X.shape[0]), int(self.X.shape[1])
        self._aug: dict = {}

    def augmented(self, feature_clip=None) -> jax.Array:
        """``[x, 1]`` of the rows (each x clipped to ``feature_clip`` first unless None)."""
        if feature_clip not in self._aug:
            X = self.X if feature_clip is None else self.clipped(feature_clip)
            self._aug[feature_clip] = rows.augment(X)
        return self._aug[feature_clip]

    def clipped(self, feature_clip) -> jax.Array:
        key = ("clip", feature_clip)
        if key not in self._aug:
            self._aug[key] = rows.clip_rows(self.X, feature_clip)
        return self._aug[key]

    def head_grad(self, WB, clip_norm, std, key, feature_clip=None) -> jax.Array:
        Xa = self.augmented(feature_clip)
        return rows.noisy_head_grad_sum(WB, Xa, self.y, clip_norm, std, key)

    def gram(self, feature_clip, std, key, append_one=False) -> jax.Array:
        return rows.noisy_gram_sum(self.X, feature_clip, std, key, append_one=append_one)

    def xty(self, targets: Callable, feature_clip, std, key) -> jax.Array:
        return rows.noisy_xty_sum(self.X, targets(self.y), feature_clip, std, key)

    def curvature(self, WB, feature_clip, std, key, adaptive=True) -> jax.Array:
        return rows.noisy_curvature_sum(
            WB, self.clipped(feature_clip), feature_clip, std, key, adaptive
        )


@jax.jit
def _finite(X: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(X))


class Streamed:
    """The rows of a sharded reader; releases through `dpft.privacy.streaming`."""

    def __init__(self, reader, y, num_classes: int):
        if not (isinstance(num_classes, int | np.integer) and num_classes >= 2):
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.reader, self.num_classes = reader, int(num_classes)
        self.n, self.dim = int(reader.num_rows), int(reader.dim)
        self.y = None
        if y is not None:
            y = np.asarray(y)
            if y.shape != (len(reader),):
                raise ValueError(f"need y [{len(reader)}] for {reader}, got shape {y.shape}")
            self.y = y
        if self.n < 1 or self.dim < 1:
            raise ValueError(f"{reader}: no rows")

    def blocks(self, feature_clip=None, targets: Callable | None = None):
        """``(x, y)`` per shard, checked (finite features, integer labels in [0, K)); with
        ``feature_clip`` the rows are clipped to it, with ``targets`` the labels become target
        rows."""
        start = 0
        for i, (x, y) in enumerate(self.reader.iter_shards()):
            if self.y is not None:
                y = self.y[start : start + len(x)]
            start += len(x)
            where = f"shard {i} of {self.reader}"
            if x.ndim != 2 or x.shape[1] != self.dim or np.shape(y) != (len(x),):
                raise ValueError(f"{where}: need x [rows, {self.dim}] and y [rows]")
            if not np.issubdtype(np.asarray(y).dtype, np.integer):
                raise ValueError(f"labels must be integers ({where})")
            if len(y) and (np.min(y) < 0 or np.max(y) >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}) ({where})")
            x = jnp.asarray(x, jnp.float32)
            if not bool(_finite(x)):
                raise ValueError(f"features must be finite ({where})")
            if feature_clip is not None:
                x = rows.clip_rows(x, feature_clip)
            y = jnp.asarray(np.asarray(y, np.int32))
            yield x, (y if targets is None else targets(y))

    def head_grad(self, WB, clip_norm, std, key, feature_clip=None) -> jax.Array:
        return streaming.noisy_streamed_head_grad_sum(
            WB, self.blocks(), clip_norm, std, key, feature_clip=feature_clip
        )

    def gram(self, feature_clip, std, key, append_one=False) -> jax.Array:
        return streaming.noisy_streamed_gram_sum(
            self.blocks(), self.dim, feature_clip, std, key, append_one=append_one
        )

    def xty(self, targets: Callable, feature_clip, std, key) -> jax.Array:
        k = int(np.shape(targets(jnp.zeros(1, jnp.int32)))[1])
        return streaming.noisy_streamed_xty_sum(
            self.blocks(targets=targets), self.dim, k, feature_clip, std, key
        )

    def curvature(self, WB, feature_clip, std, key, adaptive=True) -> jax.Array:
        # the rows clipped first, then clipped (idempotently) again inside: as `InMemory`
        return streaming.noisy_streamed_curvature_sum(
            WB, self.blocks(feature_clip), feature_clip, std, key, adaptive
        )


def rows_of(X, y, num_classes: int) -> InMemory | Streamed:
    """The rows ``X`` (array or sharded reader) with labels ``y``, checked."""
    if is_sharded(X):
        return Streamed(X, y, num_classes)
    return InMemory(X, y, num_classes)
