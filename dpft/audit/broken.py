"""The audit's deliberately broken mechanisms (``--broken``, `mechanism.BROKEN`).

Each variant swaps one component of the correct mechanism, dpft untouched. `build_mechanism`
and the accounting in `mechanism` select the variant; this module holds the pieces that need
more than a changed argument: the unhalved shuffle accounting, `DropFromNorms` and the
realised-batch step. The variants:

* ``noise``: noise multiplier 0, while the claimed epsilon is kept;
* ``clip``: clipping off (``FlatClip(inf)``) while the noise is still calibrated to C, so a canary
  moves its coordinate by 100 C per step;
* ``realized_batch``: the noisy sum is divided by the realised batch size instead of the public
  expected one (a custom step: dp_chain's normaliser cannot see the batch);
* ``ghost_drop_bias``: `GhostNorms` whose squared norms omit the bias leaves
  (`DropFromNorms`): the bias gradients are scaled by the factor of the rest of the gradient,
  so a canary whose gradient is all bias goes unclipped;
* ``shuffle_sigma``: shuffled batches accounted with ``GaussianDpEvent(sigma)`` under
  replace-one (`unhalved_shuffle_event`), as if the sensitivity were C instead of 2C, so sigma
  is calibrated half as large as the accountant needs;
* ``truncation``: Poisson batches truncated at ``max_batch_size`` but accounted as untruncated
  Poisson (the cap is left out of the accounting).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import optax
from dp_accounting import rdp

from dpft.audit.models import _loss
from dpft.privacy.clipping import clipped_grad, leaf_paths
from dpft.privacy.ghost import GhostNorms
from dpft.privacy.noise import gaussian_privatizer
from dpft.train.step import TrainState

if TYPE_CHECKING:
    from dpft.audit.config import AuditConfig

__all__ = [
    "DropFromNorms",
    "unhalved_shuffle_epsilon",
    "unhalved_shuffle_event",
]


# ------------------------------------------------------------------------------------------
# Broken accounting of shuffled batches
# ------------------------------------------------------------------------------------------


def unhalved_shuffle_event(
    noise_multiplier: float, dataset_size: int, batch_size: int, steps: int
) -> dpa.DpEvent:
    """BROKEN accounting of shuffled batches: ``GaussianDpEvent(sigma)`` under replace-one.

    dp-accounting's multiplier is relative to the sensitivity; under replace-one the clipped
    sum moves by up to 2C while the noise std is ``sigma C``, so the right event has
    ``sigma / 2`` (what `GaussianSteps.event` records). This event claims sensitivity C.
    """
    gauss = dpa.GaussianDpEvent(noise_multiplier)
    if batch_size == dataset_size:
        one = gauss
    else:
        one = dpa.SampledWithoutReplacementDpEvent(dataset_size, batch_size, gauss)
    return dpa.SelfComposedDpEvent(one, steps)


def unhalved_shuffle_epsilon(
    noise_multiplier: float, dataset_size: int, batch_size: int, steps: int, delta: float
) -> float:
    """Epsilon of `unhalved_shuffle_event` (RDP, replace-one): the BROKEN shuffle claim."""
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(unhalved_shuffle_event(noise_multiplier, dataset_size, batch_size, steps))
    logger = logging.getLogger("absl")  # RDP logs each order it drops: still an upper bound
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return float(acc.get_epsilon(delta))
    finally:
        logger.setLevel(level)


def _unhalved_shuffle_epsilon(cfg: AuditConfig, sigma: float) -> float:
    return unhalved_shuffle_epsilon(sigma, cfg.max_examples, cfg.batch_size, cfg.steps, cfg.delta)


# ------------------------------------------------------------------------------------------
# Broken ghost norms
# ------------------------------------------------------------------------------------------


class _OmittingClipper:
    """A clipper whose factors ignore the squared norms of some leaves.

    Leaves whose path ends with ``suffix`` are moved to shadow groups ``G + g`` (``g`` their
    own group): the strategy still adds their squared norms there, but the factor of a shadow
    group is the factor computed from the real groups alone.
    """

    def __init__(self, clipper, params, suffix: str):
        self.base = clipper
        self.num = clipper.num_groups(params)
        groups = clipper.leaf_groups(params)
        paths = leaf_paths(params)
        self.groups = [
            g + self.num if p.endswith(suffix) else g for p, g in zip(paths, groups, strict=True)
        ]

    def leaf_groups(self, params):
        return self.groups

    def num_groups(self, params):
        return 2 * self.num

    def factors(self, group_norms):
        f = self.base.factors(group_norms[:, : self.num])
        return jnp.concatenate([f, f], axis=1)

    def sensitivity(self, params=None):
        return self.base.sensitivity(params)


@dataclasses.dataclass(frozen=True)
class DropFromNorms:
    """BROKEN norm strategy: ``base`` with the leaves named ``*suffix`` left out of the norms.

    The per-example clipping factor is computed from the squared norms of the other leaves
    only, and the left-out leaves are scaled by that same factor, as if `GhostNorms` forgot to
    add the bias term ``||sum_t g_i[t]||^2`` to an example's squared norm. An example whose
    gradient lies in the left-out leaves is not clipped at all.
    """

    base: object = dataclasses.field(default_factory=lambda: GhostNorms(allow_fallback=False))
    suffix: str = "bias"

    def __call__(self, loss_fn, clipper, params, examples, mask, keys):
        omitting = _OmittingClipper(clipper, params, self.suffix)
        return self.base(loss_fn, omitting, params, examples, mask, keys)


# ------------------------------------------------------------------------------------------
# Broken normaliser
# ------------------------------------------------------------------------------------------


def _realized_batch_step(clipper, sigma, sensitivity, lr, key, loss_fn=None, norm_strategy=None):
    """BROKEN step: like `make_train_step` + `dp_sgd`, but divides by the realised batch size.

    Returns ``(init, step)``. The noise is still calibrated for sensitivity C on the sum, but
    the normaliser ``1 / |B_t|`` is a function of the private batch: it leaks how many examples
    were sampled, and with it membership (the sum's sensitivity after division is no longer
    C / (qN) but depends on |B_t|).
    """
    priv = gaussian_privatizer(sigma, sensitivity, key)
    base = optax.sgd(lr)
    loss_fn = _loss if loss_fn is None else loss_fn

    def per_example(params, example, rng):
        return loss_fn(params, {}, example, rng)

    grad_fn = clipped_grad(per_example, clipper, norm_strategy=norm_strategy)

    def init(params):
        return (priv.init(params), base.init(params))

    def step(state: TrainState, batch: dict, rng):
        mask = batch["mask"]
        examples = {k: v for k, v in batch.items() if k != "mask"}
        out = grad_fn(state.params, examples, mask, rng)
        ps, bs = state.opt_state
        noisy, ps = priv.update(out.grad_sum, ps)
        realized = jnp.maximum(jnp.sum(mask), 1.0)  # the bug: a private normaliser
        noisy = jax.tree_util.tree_map(lambda u: u / realized, noisy)
        updates, bs = base.update(noisy, bs, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, (ps, bs), state.frozen), {}

    return init, step
