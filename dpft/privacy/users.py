"""User-level DP: sampling of users, one clipping unit per user, accounting over users.

A dataset of N examples belongs to U users (``user_ids[i]`` is the user of example i). Under
user-level DP the neighbouring datasets differ by ALL the examples of one user, however many
that user holds. The mechanism (the user-level DP-SGD of jax_privacy and of Xu et al. 2023,
"Learning to generate image embeddings with user-level differential privacy"):

1. `UserPoissonSampler`: each user joins a step independently with probability ``q``; each
   sampled user brings ``k = examples_per_user`` of its examples (a uniformly random subset of
   them when it holds more than k, all of them otherwise);
2. `per_user_loss`: the k examples of a user are ONE clipping unit whose loss is the weighted
   mean of its examples' losses, so the unit's gradient is the mean of its examples' gradients
   and the clipper bounds the user's whole contribution;
3. `user_steps`: the steps are accounted as the Poisson-subsampled Gaussian with the user rate
   ``q`` over a dataset of U users.

A batch is a `UserBatch`: ``indices [max_users, k]`` into the examples and a boolean ``mask
[max_users, k]`` (True for the sampled examples of a sampled user). Gathering the arrays at
``indices`` gives ``[max_users, k, ...]`` stacks; `split_user_mask` turns the gathered float mask
into a user mask ``[max_users]`` (the rows the clipper sums) and per-example ``weight``\\ s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpft.privacy import accounting
from dpft.privacy.sampling import _check_rate, _PoissonUnits, checked_cap

__all__ = [
    "UNITS",
    "UserBatch",
    "UserPoissonSampler",
    "per_user_loss",
    "split_user_mask",
    "synthetic_user_ids",
    "user_members",
    "user_steps",
]

UNITS = ("example", "user")


class UserBatch(NamedTuple):
    indices: np.ndarray  # int64 [max_users, k]; padding slots point at example 0
    mask: np.ndarray  # bool [max_users, k]; True for the sampled examples of a sampled user

    @property
    def user_mask(self) -> np.ndarray:
        """bool [max_users]: True for the rows of sampled users."""
        return self.mask.any(axis=-1)

    @property
    def size(self) -> int:
        """The number of sampled users."""
        return int(self.user_mask.sum())


def synthetic_user_ids(num_examples: int, num_users: int, seed: int) -> np.ndarray:
    """A public, data-independent assignment of ``num_examples`` examples to ``num_users`` users.

    The examples in the order of a permutation drawn from ``[seed, num_users, 3]`` are dealt to
    users ``0, 1, ..., U-1, 0, 1, ...``: every user holds ``floor(N / U)`` or ``ceil(N / U)``
    examples.

    Privacy:
        The assignment is independent of the data (a function of N, U and the seed only), so
        it can be public; user-level DP (add/remove-one-user neighbouring) then protects each
        group of examples it forms.
    """
    if not (isinstance(num_users, int | np.integer) and 1 <= num_users <= num_examples):
        raise ValueError(
            f"config.dp.num_users must be an int in [1, {num_examples}] (the training examples), "
            f"got {num_users!r}"
        )
    perm = np.random.default_rng([int(seed), int(num_users), 3]).permutation(num_examples)
    ids = np.empty(num_examples, np.int64)
    ids[perm] = np.arange(num_examples) % num_users
    return ids


def user_members(user_ids: np.ndarray) -> list[np.ndarray]:
    """The sorted example indices of each distinct user of ``user_ids`` (in sorted id order).

    Privacy:
        The users are the units of add/remove-one-user neighbouring: a user's examples are
        sampled, and clipped, together. The grouping is treated as public.
    """
    ids = np.asarray(user_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"user ids must be a non-empty 1-D array, got shape {ids.shape}")
    _, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(inverse.max() + 2))
    return [order[bounds[u] : bounds[u + 1]].astype(np.int64) for u in range(len(bounds) - 1)]


@dataclasses.dataclass
class UserPoissonSampler(_PoissonUnits):
    """Poisson sampling of users, ``examples_per_user`` (k) examples of each sampled user.

    Each of the U users of ``user_ids`` joins a step independently with probability
    ``sampling_rate``; the sampled users are padded to ``max_users`` rows, and a draw of more
    users than that keeps a uniformly random subset of ``max_users`` of them (truncated Poisson
    sampling, as `dpft.privacy.sampling.PoissonSampler`; by default the cap is set so that this
    happens with probability <= 1e-12 per step). A sampled user's row holds a uniformly random
    subset of k of its examples when it has more, all of them otherwise, padded with masked
    slots. The batch of step t is drawn from a generator seeded with ``[seed, t]``: a pure
    function of (seed, step), so saving and restoring the state resumes exactly.

    Privacy:
        Under add/remove-one-USER neighbouring (all the examples of one user), with one
        clipping unit per user (`per_user_loss`) and noise calibrated for the user rate, this
        is the sampling of the Poisson-subsampled Gaussian mechanism over a dataset of U users
        with batch cap ``max_users`` (`user_steps`). The sampled indices are private; the user
        assignment is treated as public.
    """

    user_ids: np.ndarray
    sampling_rate: float
    examples_per_user: int
    seed: int
    max_users: int | None = None

    def __post_init__(self):
        self.user_ids = np.asarray(self.user_ids)
        _check_rate(self.sampling_rate)
        k = self.examples_per_user
        if not (isinstance(k, int | np.integer) and k >= 1):
            raise ValueError(f"config.dp.examples_per_user must be an int >= 1, got {k!r}")
        self.members = user_members(self.user_ids)
        self.sizes = np.asarray([len(m) for m in self.members], np.int64)
        self.max_users = checked_cap(
            self.max_users, self.num_users, self.sampling_rate, "max_users"
        )

    @property
    def num_examples(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_users(self) -> int:
        return len(self.members)

    @property
    def max_batch_size(self) -> int:
        """The padded batch size in USERS (rows of the step)."""
        return int(self.max_users)

    @property
    def population(self) -> int:
        """Users are the units: ``expected_batch_size`` and ``overflow_prob`` count users."""
        return self.num_users

    def batch_at(self, step: int) -> UserBatch:
        rng, chosen = self.draw(step)
        k = int(self.examples_per_user)
        indices = np.zeros((self.max_batch_size, k), np.int64)
        mask = np.zeros((self.max_batch_size, k), bool)
        for row, u in enumerate(chosen):
            own = self.members[u]
            if len(own) > k:  # a uniformly random subset of k of its examples
                own = np.sort(own[rng.choice(len(own), size=k, replace=False)])
            indices[row, : len(own)] = own
            mask[row, : len(own)] = True
        return UserBatch(indices, mask)


def split_user_mask(batch: dict) -> dict:
    """A gathered user batch (``mask`` float ``[B, k]``) -> ``mask [B]`` and ``weight [B, k]``.

    ``mask`` becomes 1 for the rows of sampled users (the clipping units summed) and the old
    per-slot mask becomes the examples' ``weight`` inside their unit (`per_user_loss`).

    Privacy:
        A padding row (no sampled user) gets mask 0 and contributes exactly zero to the clipped
        sum, so the sum keeps the per-user sensitivity under add/remove-one-user neighbouring.
    """
    weight = jnp.asarray(batch["mask"], jnp.float32)
    if weight.ndim != 2:
        raise ValueError(f"a user batch's mask must be [users, k], got shape {weight.shape}")
    rest = {k: v for k, v in batch.items() if k != "mask"}
    return {**rest, "weight": weight, "mask": (weight.sum(-1) > 0).astype(jnp.float32)}


def per_user_loss(stacked_loss: Callable) -> Callable:
    """One user's k examples as ONE clipping unit: the weighted mean of their losses.

    ``stacked_loss(params, frozen, examples, rng) -> (losses [k], aux)`` computes the losses of
    a ``[k, ...]`` stack of examples in one model call (``aux`` values ``[k]``); the returned
    ``loss(params, frozen, user, rng) -> (scalar, aux)`` takes a user's stack with its
    ``weight [k]`` (1 for its sampled examples, 0 for padding) and returns
    ``sum_j w_j loss_j / max(sum_j w_j, 1)``, so the unit's gradient is the mean of its sampled
    examples' gradients; ``aux`` values are weighted means too. Because the model runs once on
    the stack, ghost norms (`dpft.privacy.ghost.GhostNorms`) see the k examples as the rows of
    one unit, as they see augmentation views.

    Privacy:
        Every example of a user lies inside that user's loss, hence inside its clipping unit:
        the clipped sum over users has the clipper's sensitivity (C for flat clipping) under
        add/remove-one-user neighbouring, whatever the number of examples the user holds.
        Padding slots have weight 0 and contribute exactly nothing to the gradient.
    """

    def loss(params, frozen, user, rng) -> tuple[jax.Array, Any]:
        weight = jnp.asarray(user["weight"], jnp.float32)
        examples = {k: v for k, v in user.items() if k != "weight"}
        losses, aux = stacked_loss(params, frozen, examples, rng)
        total = jnp.maximum(jnp.sum(weight), 1.0)
        real = weight > 0

        def mean(x):
            return jnp.sum(jnp.where(real, weight * x.astype(jnp.float32), 0.0)) / total

        return mean(losses), jax.tree_util.tree_map(mean, aux)

    return loss


def user_steps(
    noise_multiplier: float,
    user_rate: float,
    count: int,
    *,
    num_users: int,
    max_users: int,
) -> accounting.GaussianSteps:
    """The ledger entry of ``count`` user-level steps: the Poisson-subsampled Gaussian over users.

    Privacy:
        Each step adds Gaussian noise of std ``noise_multiplier * C`` to a sum of per-user
        clipped gradients (sensitivity C under add/remove-one user, `per_user_loss`) of a
        Poisson sample of users at rate ``user_rate``, truncated at ``max_users`` rows: the
        entry accounts exactly that, over a dataset of ``num_users`` users.
    """
    return accounting.GaussianSteps(
        noise_multiplier, user_rate, count, dataset_size=num_users, max_batch_size=max_users
    )
