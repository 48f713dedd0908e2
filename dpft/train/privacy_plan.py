"""The privacy plan of a run: the clipper and its norm strategy, the sampling rate, steps and
noise multiplier (calibrated to the target), the noise (independent or banded matrix
factorization), the privacy unit (an example, or a user with all its examples) and the sampler
and budget they imply.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from dpft.data import augment as augment_lib
from dpft.privacy import accounting, clipping, correlated, ledger, sampling, users

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
    # config.dp.unit='user' (docs/user_level.md): sampling_rate, expected_batch_size,
    # max_batch_size and steps count USERS; num_examples stays the number of examples
    unit: str = "example"
    num_users: int = 0
    examples_per_user: int = 0

    def unit_summary(self) -> dict:
        """What summary.json says of a user-level run's unit (nothing at the example level)."""
        if self.unit != "user":
            return {}
        k = self.examples_per_user
        return {"privacy_unit": "user", "num_users": self.num_users, "examples_per_user": k}

    def entry(self) -> accounting.GaussianSteps:
        """The ledger entry of one step (banded_mf: of one participation round)."""
        if self.unit == "user":
            return users.user_steps(
                self.noise_multiplier,
                self.sampling_rate,
                1,
                num_users=self.num_users,
                max_users=self.max_batch_size,
            )
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


def plan_privacy(
    config, num_examples: int, batch_multiple: int = 1, user_ids: np.ndarray | None = None
) -> PrivacyPlan:
    """Sampling rate, steps and noise multiplier (calibrated to the target when not given).

    The padded batch (the Poisson cap, unless ``config.train.max_batch_size`` sets it) is the
    smallest whose truncation charge ``eta + e^eps eta'`` is at most 1% of delta
    (`accounting.overflow_probability_for`; never above 1e-12 per step), rounded up to a
    multiple of ``batch_multiple`` (the number of data-parallel devices); accounting uses the
    rounded cap. With ``config.dp.unit='user'`` the units are the U users of ``user_ids``:
    ``config.train.batch_size`` is the expected number of users per step (rate q = B / U, also
    the divisor of the clipped sum), epochs count passes over the users, the cap counts users
    and the noise is calibrated for the Poisson-subsampled Gaussian over U users.
    """
    dp, tr = config.dp, config.train
    build_norm_strategy(dp)  # refuse an unknown config.dp.norms before any file is written
    if not dp.clip_norm > 0:
        raise ValueError(f"config.dp.clip_norm must be > 0 (inf: no clipping), got {dp.clip_norm}")
    if not dp.epsilon > 0:
        raise ValueError(f"config.dp.epsilon must be > 0, got {dp.epsilon}")
    unit = check_unit(config)
    if unit == "user" and user_ids is None:
        raise ValueError("config.dp.unit='user' needs the user id of every example")
    units = len(np.unique(user_ids)) if unit == "user" else num_examples  # what q is a rate of
    accounting.check_delta(dp.delta, units)
    if not 0 < tr.batch_size <= units:
        what = " (expected users per step with config.dp.unit='user')" if unit == "user" else ""
        raise ValueError(
            f"config.train.batch_size{what} must be in [1, {units}], got {tr.batch_size}"
        )
    q = tr.batch_size / units
    steps = tr.steps or math.ceil(tr.epochs * units / tr.batch_size)
    if steps <= 0:
        raise ValueError("config.train.steps or config.train.epochs must be > 0")
    if check_noise(config) == "banded_mf":
        return _plan_banded(config, num_examples, steps, batch_multiple)
    cap = _padded_cap(config, units, q, steps, batch_multiple)
    entry_kw = {"dataset_size": units, "max_batch_size": cap}
    sigma = _noise_multiplier(
        dp,
        lambda: accounting.calibrate_noise_multiplier(
            dp.epsilon, dp.delta, q, steps, dp.accountant, **entry_kw
        ),
    )
    users_kw = {}  # user-level: the U users are the units (`dpft.privacy.users.user_steps`)
    if unit == "user":
        users_kw = {"unit": unit, "num_users": units, "examples_per_user": dp.examples_per_user}
    target = (dp.epsilon, dp.delta, dp.accountant)
    return PrivacyPlan(num_examples, q, q * units, cap, steps, sigma, *target, **users_kw)


def _padded_cap(config, units: int, q: float, count: int, batch_multiple: int) -> int:
    """The padded batch of Poisson sampling over ``units`` at rate ``q`` for ``count`` draws:
    ``config.train.max_batch_size``, or the smallest cap whose truncation charge is <= 1% of
    delta (never above 1e-12 per draw), rounded up to a multiple of ``batch_multiple``."""
    dp, cap = config.dp, config.train.max_batch_size
    if not cap:
        p = accounting.overflow_probability_for(dp.epsilon, dp.delta, count)
        cap = sampling.poisson_batch_cap(units, q, min(p, sampling.DEFAULT_OVERFLOW_PROBABILITY))
    return -(-cap // batch_multiple) * batch_multiple


def _noise_multiplier(dp, calibrate) -> float:
    """``config.dp.noise_multiplier`` when >= 0, else ``calibrate()`` (to the finite target)."""
    if dp.noise_multiplier >= 0:
        return float(dp.noise_multiplier)
    if math.isinf(dp.epsilon):
        raise ValueError("config.dp.noise_multiplier < 0 (calibrate) needs a finite dp.epsilon")
    return float(calibrate())


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
    cap = _padded_cap(config, size, q, rounds, batch_multiple)
    sigma = _noise_multiplier(
        dp,
        lambda: correlated.calibrate_banded_noise_multiplier(
            dp.epsilon,
            dp.delta,
            q,
            steps,
            coefs,
            dp.accountant,
            dataset_size=size,
            max_batch_size=cap,
        ),
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


def check_unit(config) -> str:
    """``config.dp.unit`` ('example' | 'user') after checking what 'user' runs with.

    User-level DP (`dpft.privacy.users`, docs/user_level.md) runs in the centralized trainer
    on in-memory data (or cached features) in one phase on one device; other combinations get
    a one-line ValueError.
    """
    dp, tr = config.dp, config.train
    unit = dp.get("unit", "example")
    if unit not in users.UNITS:
        raise ValueError(f"config.dp.unit must be {'|'.join(users.UNITS)}, got {unit!r}")
    if unit == "example":
        return unit
    k = dp.get("examples_per_user", 0)
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"config.dp.examples_per_user must be an int >= 1, got {k!r}")
    spec = augment_lib.from_config(config.data)
    parallel = config.get("parallel", {})
    unsupported = {
        "config.federated": "federated" in config,
        "config.linear": "linear" in config,
        "config.data.pipeline='grain'": config.data.get("pipeline", "memory") == "grain",
        "config.train.host_chunk_size > 0": bool(tr.get("host_chunk_size", 0)),
        "config.train.microbatch_size=-1": tr.get("microbatch_size", 0) == -1,
        "config.dp.noise='banded_mf'": dp.get("noise", "independent") == "banded_mf",
        "config.dp.adaptive_quantile > 0": dp.get("adaptive_quantile", 0.0) > 0,
        "config.parallel.data != 1 (one device only)": parallel.get("data", 1) != 1,
        "config.parallel.fsdp": bool(parallel.get("fsdp", False)),
        "config.finetune.mode='lp_ft'": config.get("finetune", {}).get("mode", "") == "lp_ft",
        "config.data.augmult > 1 or config.data.augment": not spec.identity,
    }
    for what, used in unsupported.items():
        if used:
            raise ValueError(f"config.dp.unit='user' is not supported with {what}")
    return unit


def user_ids(config, train_arrays: dict) -> np.ndarray | None:
    """The user of every training example for ``config.dp.unit='user'`` (else None).

    The training arrays' own ``'user'`` array (one int per example) when they have one (it is
    removed from them: the step never sees it); otherwise the public synthetic assignment of
    the examples to ``config.dp.num_users`` users seeded by ``config.seed``
    (`dpft.privacy.users.synthetic_user_ids`).
    """
    if check_unit(config) != "user":
        return None
    n = len(train_arrays["label"])
    if "user" in train_arrays:
        ids = np.asarray(train_arrays.pop("user"))
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"the training data's 'user' array must hold one int id per example ({n}), got "
                f"shape {ids.shape} and dtype {ids.dtype}"
            )
        return ids
    num = config.dp.get("num_users", 0)
    if not (isinstance(num, int) and not isinstance(num, bool) and 1 <= num <= n):
        raise ValueError(
            f"config.dp.num_users must be an int in [1, {n}] (the data has no 'user' array: "
            f"examples are assigned to that many synthetic users), got {num!r}"
        )
    return users.synthetic_user_ids(n, num, config.seed)


def build_sampler(plan: PrivacyPlan, seed: int, user_ids: np.ndarray | None = None):
    """The run's sampler: Poisson, cyclic Poisson over ``len(plan.coefs)`` partitions, or
    Poisson over the users of ``user_ids`` (``plan.unit == 'user'``)."""
    if plan.unit == "user":
        if user_ids is None:
            raise ValueError("config.dp.unit='user' needs the user id of every example")
        return users.UserPoissonSampler(
            user_ids,
            plan.sampling_rate,
            plan.examples_per_user,
            seed,
            max_users=plan.max_batch_size,
        )
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
