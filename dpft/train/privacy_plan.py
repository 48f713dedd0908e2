"""The privacy plan of a run: the clipper and its norm strategy, the sampling rate, steps and
noise multiplier (calibrated to the target), the noise (independent or banded matrix
factorization), and the sampler and budget they imply.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from dpft.privacy import accounting, clipping, correlated, ledger, sampling

log = logging.getLogger("dpft")


def build_clipper(dp) -> clipping.Clipper:
    kind = dp.clipping
    if kind == "flat":
        return clipping.FlatClip(dp.clip_norm)
    if kind == "per_layer":
        return clipping.PerLayerClip(dp.clip_norm)
    if kind == "auto":
        return clipping.AutoClip(gamma=dp.auto_gamma, scale=dp.clip_norm)
    if kind == "global":
        return clipping.GlobalClip(dp.clip_norm, threshold=dp.global_threshold or None)
    raise ValueError(f"config.dp.clipping must be flat|per_layer|auto|global, got {kind!r}")


def build_norm_strategy(dp) -> clipping.NormStrategy | None:
    """``config.dp.norms``: how per-example gradient norms are computed (None = `VmapNorms`).

    ``'ghost'`` (the default) uses ghost / mixed ghost norms and the book-keeping sum for flax
    Dense/Conv layers (`dpft.privacy.ghost.GhostNorms`, exact per-example gradients for the
    other parameters), the faster choice in ``make bench`` for every workload; it is tested
    equal to ``'vmap'`` for every model family of `dpft.models` (``tests/test_ghost.py``).
    ``'vmap'`` materialises per-example gradients (`clipping.VmapNorms`, any model; with
    ``model.conv='im2col'`` it was the faster of the two for ResNet-20). Both give the same
    clipped sum up to float rounding.
    """
    kind = dp.get("norms", "ghost")
    if kind == "vmap":
        return None
    if kind == "ghost":
        from dpft.privacy.ghost import GhostNorms

        return GhostNorms()
    raise ValueError(f"config.dp.norms must be vmap|ghost, got {kind!r}")


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    num_examples: int
    sampling_rate: float
    expected_batch_size: float
    max_batch_size: int
    steps: int
    noise_multiplier: float
    target_epsilon: float
    delta: float
    accountant: str
    # config.dp.noise='banded_mf' (docs/correlated_noise.md): the band (1, c_1, .., c_{b-1}),
    # the largest cyclic partition and the public seed of the partition assignment
    noise: str = "independent"
    coefs: tuple = (1.0,)
    partition_size: int = 0
    partition_seed: int = 0

    def entry(self) -> accounting.GaussianSteps:
        """The ledger entry of one step (banded_mf: of one participation round)."""
        if self.noise == "banded_mf":
            return correlated.banded_entry(
                self.noise_multiplier,
                self.coefs,
                self.sampling_rate,
                1,
                dataset_size=self.partition_size,
                max_batch_size=self.max_batch_size,
            )
        return accounting.GaussianSteps(
            self.noise_multiplier,
            self.sampling_rate,
            1,
            dataset_size=self.num_examples,
            max_batch_size=self.max_batch_size,
        )


def plan_privacy(config, num_examples: int, batch_multiple: int = 1) -> PrivacyPlan:
    """Sampling rate, steps and noise multiplier (calibrated to the target when not given).

    The padded batch (the Poisson cap, unless ``config.train.max_batch_size`` sets it) is the
    smallest whose truncation charge ``eta + e^eps eta'`` is at most 1% of delta
    (`accounting.overflow_probability_for`; never above 1e-12 per step), rounded up to a
    multiple of ``batch_multiple`` (the number of data-parallel devices); accounting uses the
    rounded cap.
    """
    dp, tr = config.dp, config.train
    build_norm_strategy(dp)  # refuse an unknown config.dp.norms before any file is written
    if not dp.clip_norm > 0:
        raise ValueError(f"config.dp.clip_norm must be > 0 (inf: no clipping), got {dp.clip_norm}")
    if not dp.epsilon > 0:
        raise ValueError(f"config.dp.epsilon must be > 0, got {dp.epsilon}")
    accounting.check_delta(dp.delta, num_examples)
    if not 0 < tr.batch_size <= num_examples:
        raise ValueError(
            f"config.train.batch_size must be in [1, {num_examples}], got {tr.batch_size}"
        )
    q = tr.batch_size / num_examples
    steps = tr.steps or math.ceil(tr.epochs * num_examples / tr.batch_size)
    if steps <= 0:
        raise ValueError("config.train.steps or config.train.epochs must be > 0")
    if check_noise(config) == "banded_mf":
        return _plan_banded(config, num_examples, steps, batch_multiple)
    if not tr.max_batch_size:  # a cap whose truncation charge is <= 1% of delta
        p = accounting.overflow_probability_for(dp.epsilon, dp.delta, steps)
        p = min(p, sampling.DEFAULT_OVERFLOW_PROBABILITY)
    cap = tr.max_batch_size or sampling.poisson_batch_cap(num_examples, q, p)
    cap = -(-cap // batch_multiple) * batch_multiple
    entry_kw = {"dataset_size": num_examples, "max_batch_size": cap}
    if dp.noise_multiplier >= 0:
        sigma = float(dp.noise_multiplier)
    elif math.isinf(dp.epsilon):
        raise ValueError("config.dp.noise_multiplier < 0 (calibrate) needs a finite dp.epsilon")
    else:
        sigma = accounting.calibrate_noise_multiplier(
            dp.epsilon, dp.delta, q, steps, dp.accountant, **entry_kw
        )
    return PrivacyPlan(
        num_examples, q, q * num_examples, cap, steps, sigma, dp.epsilon, dp.delta, dp.accountant
    )


def check_noise(config) -> str:
    """``config.dp.noise`` ('independent' | 'banded_mf') after checking ``config.dp.band``.

    banded_mf (correlated noise, `dpft.privacy.correlated`) runs in the centralized trainer on
    in-memory data in one phase; other combinations get a one-line ValueError.
    """
    dp = config.dp
    kind, band = dp.get("noise", "independent"), dp.get("band", 1)
    if kind not in correlated.NOISES:
        raise ValueError(f"config.dp.noise must be {'|'.join(correlated.NOISES)}, got {kind!r}")
    if not (isinstance(band, int) and band >= 1):
        raise ValueError(f"config.dp.band must be an int >= 1, got {band!r}")
    if kind == "independent":
        if band != 1:
            raise ValueError(f"config.dp.band={band} needs config.dp.noise='banded_mf'")
        return kind
    unsupported = {
        "config.federated": "federated" in config,
        "config.linear": "linear" in config,
        "config.data.pipeline='grain'": config.data.get("pipeline", "memory") == "grain",
        "config.parallel.fsdp": bool(config.get("parallel", {}).get("fsdp", False)),
        "config.finetune.mode='lp_ft'": config.get("finetune", {}).get("mode", "") == "lp_ft",
    }
    for what, used in unsupported.items():
        if used:
            raise ValueError(f"config.dp.noise='banded_mf' is not supported with {what}")
    return kind


def _plan_banded(config, num_examples: int, steps: int, batch_multiple: int) -> PrivacyPlan:
    """`plan_privacy` for banded_mf: b cyclic partitions, rate q = b B / N within each.

    The expected batch stays ``B = config.train.batch_size`` and the epochs those of the config;
    each example can take part in ``ceil(steps / b)`` steps (`correlated.banded_entry`).
    """
    dp, tr = config.dp, config.train
    band = int(dp.band)
    q = band * tr.batch_size / num_examples
    if q > 1:
        raise ValueError(
            f"config.dp.band={band} needs band * batch_size <= N={num_examples} (rate "
            f"{q:.3g} > 1 within a partition): lower config.dp.band or config.train.batch_size"
        )
    if band > steps:
        raise ValueError(f"config.dp.band={band} exceeds the {steps} steps of the run")
    coefs = tuple(float(x) for x in correlated.optimal_banded_coefs(steps, band))
    parts = sampling.partition_members(num_examples, band, config.seed)
    size = max(len(p) for p in parts)
    rounds = correlated.participations(steps, band)
    if not tr.max_batch_size:  # a cap whose truncation charge is <= 1% of delta
        p = accounting.overflow_probability_for(dp.epsilon, dp.delta, rounds)
        p = min(p, sampling.DEFAULT_OVERFLOW_PROBABILITY)
    cap = tr.max_batch_size or sampling.poisson_batch_cap(size, q, p)
    cap = -(-cap // batch_multiple) * batch_multiple
    if dp.noise_multiplier >= 0:
        sigma = float(dp.noise_multiplier)
    elif math.isinf(dp.epsilon):
        raise ValueError("config.dp.noise_multiplier < 0 (calibrate) needs a finite dp.epsilon")
    else:
        sigma = correlated.calibrate_banded_noise_multiplier(
            dp.epsilon,
            dp.delta,
            q,
            steps,
            coefs,
            dp.accountant,
            dataset_size=size,
            max_batch_size=cap,
        )
    return PrivacyPlan(
        num_examples,
        q,
        float(tr.batch_size),
        cap,
        steps,
        sigma,
        dp.epsilon,
        dp.delta,
        dp.accountant,
        noise="banded_mf",
        coefs=coefs,
        partition_size=size,
        partition_seed=int(config.seed),
    )


def build_sampler(plan: PrivacyPlan, seed: int):
    """The run's sampler: Poisson, or cyclic Poisson over ``len(plan.coefs)`` partitions."""
    if plan.noise == "banded_mf":
        return sampling.CyclicPoissonSampler(
            plan.num_examples,
            plan.sampling_rate,
            len(plan.coefs),
            seed,
            assignment_seed=plan.partition_seed,
            max_batch_size=plan.max_batch_size,
        )
    return sampling.PoissonSampler(plan.num_examples, plan.sampling_rate, seed, plan.max_batch_size)


def build_budget(plan: PrivacyPlan) -> ledger.PrivacyBudget:
    """The run's budget: per step, or per participation round (banded_mf)."""
    if plan.noise == "banded_mf":
        return correlated.BandedBudget(
            plan.target_epsilon, plan.delta, plan.accountant, len(plan.coefs)
        )
    return ledger.PrivacyBudget(plan.target_epsilon, plan.delta, plan.accountant)
