"""DP optimizers: ``optax.chain(privatizer, normalize_by_expected_batch, base_optimizer)``.

The privatizer adds Gaussian noise to the SUM of clipped per-example gradients of a logical
batch; the sum is then divided by the PUBLIC expected batch size (``q * N`` for Poisson
sampling), never by the realised one, which would depend on private data; the base optimizer
(SGD, Adam(W), LAMB from optax) is post-processing.

    grad_fn = dpft.privacy.clipping.clipped_grad(loss_fn, FlatClip(1.0))
    tx = dpft.optim.dp_adam(1e-3, noise_multiplier=1.1, l2_sensitivity=grad_fn.l2_sensitivity(p),
                            expected_batch_size=256.0, key=0)
"""

from __future__ import annotations

import jax
import optax

from dpft.privacy import adaptive
from dpft.privacy.noise import gaussian_privatizer

__all__ = [
    "base_optimizer",
    "adaptive_quantile",
    "check_adaptive",
    "dp_adam",
    "dp_adaptive_optimizer",
    "dp_adamw",
    "dp_chain",
    "dp_lamb",
    "dp_optimizer",
    "dp_sgd",
    "make_schedule",
    "normalize_by_expected_batch",
]

ScalarOrSchedule = float | optax.Schedule


def normalize_by_expected_batch(expected_batch_size: float) -> optax.GradientTransformation:
    """Divides the (noisy) sum by the public expected batch size.

    Privacy:
        Post-processing of a DP output with a public constant: costs no privacy. Dividing by the
        REALISED batch size instead would leak the batch size (and so membership).
    """
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
    return optax.scale(1.0 / float(expected_batch_size))


def dp_chain(
    base: optax.GradientTransformation,
    *,
    noise_multiplier: float,
    l2_sensitivity: float,
    expected_batch_size: float,
    key: jax.Array | int,
) -> optax.GradientTransformation:
    """``optax.chain(gaussian_privatizer, normalize_by_expected_batch, base)``.

    The returned transform's ``update`` takes the SUM of clipped per-example gradients of one
    logical batch (e.g. ``clipped_grad(...).grad_sum``) and must be called once per batch.

    Privacy:
        Each update is one Gaussian mechanism with multiplier ``noise_multiplier`` on a sum of
        L2 sensitivity ``l2_sensitivity``; everything after the privatizer is post-processing.
    """
    return optax.chain(
        gaussian_privatizer(noise_multiplier, l2_sensitivity, key),
        normalize_by_expected_batch(expected_batch_size),
        base,
    )


def make_schedule(
    learning_rate: float,
    total_steps: int | None = None,
    kind: str = "constant",
    warmup_steps: int = 0,
    end_fraction: float = 0.0,
) -> ScalarOrSchedule:
    """Learning-rate schedules: constant, cosine or linear decay, with optional linear warmup."""
    if kind == "constant" and not warmup_steps:
        return learning_rate
    if kind not in ("constant", "cosine", "linear"):
        raise ValueError(f"schedule must be constant, cosine or linear, got {kind!r}")
    if kind != "constant" and not total_steps:
        raise ValueError(f"a {kind} schedule needs total_steps")
    decay_steps = max(1, (total_steps or 1) - warmup_steps)
    if kind == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_fraction)
    elif kind == "linear":
        main = optax.linear_schedule(learning_rate, learning_rate * end_fraction, decay_steps)
    else:
        main = optax.constant_schedule(learning_rate)
    if not warmup_steps:
        return main
    warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warm, main], [warmup_steps])


_PRIVACY_ARGS = """
      noise_multiplier: sigma; the noise std is ``noise_multiplier * l2_sensitivity``.
      l2_sensitivity: the L2 sensitivity of the sums this optimizer receives, which the function
        that clips them carries: ``grad_fn.l2_sensitivity(params)`` of a
        `dpft.privacy.clipping.clipped_grad` function (``clipper.sensitivity(params)``).
      expected_batch_size: the PUBLIC expected logical batch size the noisy sum is divided by.
      key: the noise key (an int seed or a PRNG key); each update folds in its step count."""


def dp_sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    noise_multiplier: float,
    l2_sensitivity: float,
    expected_batch_size: float,
    key: jax.Array | int,
) -> optax.GradientTransformation:
    """DP-SGD: the privatizer, division by the expected batch size, then ``optax.sgd``.

    Args:
      learning_rate: a float or an optax schedule.
      momentum: heavy-ball momentum (``None``: none).
      nesterov: Nesterov momentum.
    {privacy_args}

    Privacy:
        One Gaussian mechanism per update on a sum of L2 sensitivity ``l2_sensitivity``; the
        division and the SGD update are post-processing (see `dp_chain`).
    """
    base = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
    return dp_chain(
        base,
        noise_multiplier=noise_multiplier,
        l2_sensitivity=l2_sensitivity,
        expected_batch_size=expected_batch_size,
        key=key,
    )


def dp_adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    noise_multiplier: float,
    l2_sensitivity: float,
    expected_batch_size: float,
    key: jax.Array | int,
) -> optax.GradientTransformation:
    """DP-Adam: the privatizer, division by the expected batch size, then ``optax.adam``.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps: Adam's moment decays and denominator offset.
    {privacy_args}

    Privacy:
        As `dp_sgd`: Adam's moments are functions of the noisy sums only (post-processing).
    """
    return dp_chain(
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
        noise_multiplier=noise_multiplier,
        l2_sensitivity=l2_sensitivity,
        expected_batch_size=expected_batch_size,
        key=key,
    )


def dp_adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    noise_multiplier: float,
    l2_sensitivity: float,
    expected_batch_size: float,
    key: jax.Array | int,
) -> optax.GradientTransformation:
    """DP-AdamW: the privatizer, division by the expected batch size, then ``optax.adamw``.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps: Adam's moment decays and denominator offset.
      weight_decay: decoupled weight decay (a function of the parameters: public).
    {privacy_args}

    Privacy:
        As `dp_sgd`: the moments and the decay use the noisy sums and the parameters only.
    """
    return dp_chain(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
        noise_multiplier=noise_multiplier,
        l2_sensitivity=l2_sensitivity,
        expected_batch_size=expected_batch_size,
        key=key,
    )


def dp_lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    noise_multiplier: float,
    l2_sensitivity: float,
    expected_batch_size: float,
    key: jax.Array | int,
) -> optax.GradientTransformation:
    """DP-LAMB (Mehta et al. 2022): the privatizer, division by the expected batch size, then
    ``optax.lamb`` (Adam moments with a layer-wise trust ratio ``||w|| / ||update||``).

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps: Adam's moment decays and denominator offset.
      weight_decay: decoupled weight decay.
    {privacy_args}

    Privacy:
        As `dp_sgd`: the trust ratio uses the parameters and the noisy update only.
    """
    return dp_chain(
        optax.lamb(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
        noise_multiplier=noise_multiplier,
        l2_sensitivity=l2_sensitivity,
        expected_batch_size=expected_batch_size,
        key=key,
    )


for _alias in (dp_sgd, dp_adam, dp_adamw, dp_lamb):
    _alias.__doc__ = _alias.__doc__.replace("    {privacy_args}", _PRIVACY_ARGS.strip("\n"))

_ALIASES = {"sgd": dp_sgd, "adam": dp_adam, "adamw": dp_adamw, "lamb": dp_lamb}
_BASES = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw, "lamb": optax.lamb}


def base_optimizer(
    name: str, learning_rate: ScalarOrSchedule, **options
) -> optax.GradientTransformation:
    """The optax optimizer a DP chain ends with, by name ('sgd' | 'adam' | 'adamw' | 'lamb'),
    for the privatizers that are not `dp_chain`'s (correlated noise, adaptive clipping)."""
    if name not in _BASES:
        raise ValueError(f"optimizer must be one of {sorted(_BASES)}, got {name!r}")
    return _BASES[name](learning_rate, **options)


def dp_optimizer(
    name: str,
    learning_rate: ScalarOrSchedule,
    *,
    noise_multiplier: float,
    l2_sensitivity: float,
    expected_batch_size: float,
    key: jax.Array | int,
    **base_options,
) -> optax.GradientTransformation:
    """The DP optimizer called ``name`` ('sgd' | 'adam' | 'adamw' | 'lamb'), for configs:
    ``base_options`` are the alias's own (``momentum``, ``weight_decay``, ...).

    Privacy:
        That of the named alias (`dp_sgd`).
    """
    if name not in _ALIASES:
        raise ValueError(f"optimizer must be one of {sorted(_ALIASES)}, got {name!r}")
    return _ALIASES[name](
        learning_rate,
        noise_multiplier=noise_multiplier,
        l2_sensitivity=l2_sensitivity,
        expected_batch_size=expected_batch_size,
        key=key,
        **base_options,
    )


def dp_adaptive_optimizer(
    name: str,
    learning_rate: ScalarOrSchedule,
    *,
    noise_multiplier: float,
    initial_clip_norm: float,
    expected_batch_size: float,
    key: jax.Array | int,
    target_quantile: float,
    clip_learning_rate: float,
    count_noise: float = -1.0,
    **kwargs,
) -> optax.GradientTransformation:
    """`dp_optimizer` with adaptive quantile clipping (`dpft.privacy.adaptive`).

    ``optax.chain(adaptive_privatizer, normalize_by_expected_batch, base)``; the step
    (`dpft.train.step.make_train_step`) clips at the clip norm held in the privatizer's state.
    ``count_noise < 0`` selects ``sigma_b = expected_batch_size / 20``
    (`adaptive.default_count_noise`).

    Privacy:
        Each update is one Gaussian mechanism with the TOTAL multiplier ``noise_multiplier``
        (gradient sum and unclipped count together, `adaptive.split_noise_multiplier`), so the
        accountant's per-step entry is that of `dp_chain` with the same multiplier.
    """
    base = base_optimizer(name, learning_rate, **kwargs)
    sigma_b = float(count_noise)
    if sigma_b < 0:
        sigma_b = adaptive.default_count_noise(expected_batch_size)
    priv = adaptive.adaptive_privatizer(
        noise_multiplier,
        initial_clip_norm,
        key,
        target_quantile=target_quantile,
        learning_rate=clip_learning_rate,
        count_noise=sigma_b,
        expected_count=expected_batch_size,
    )
    return optax.chain(
        priv,
        normalize_by_expected_batch(expected_batch_size),
        base,
    )


def adaptive_quantile(dp) -> float:
    """``dp.adaptive_quantile`` (0: adaptive clipping off), refused outside [0, 1] in one line."""
    gamma = float(dp.get("adaptive_quantile", 0.0))
    if not 0 <= gamma <= 1:
        raise ValueError(f"config.dp.adaptive_quantile must be in (0, 1] (0 = off), got {gamma}")
    return gamma


def check_adaptive(config) -> bool:
    """Whether ``config.dp.adaptive_quantile`` turns adaptive clipping on; refuses what it lacks.

    Adaptive clipping runs in the centralized trainer with flat clipping, independent noise, one
    array step (no host chunks, one device) and a finite initial ``config.dp.clip_norm``; every
    other combination gets a one-line ValueError.
    """
    dp = config.dp
    if not adaptive_quantile(dp):
        return False
    if dp.clipping != "flat":
        raise ValueError(f"adaptive clipping needs config.dp.clipping='flat', got {dp.clipping!r}")
    unsupported = {
        "config.dp.noise='banded_mf'": dp.get("noise", "independent") != "independent",
        "config.train.host_chunk_size > 0": bool(config.train.get("host_chunk_size", 0)),
        "config.parallel.data > 1": config.get("parallel", {}).get("data", 1) > 1,
        "config.federated": "federated" in config,
        "an infinite config.dp.clip_norm": not dp.clip_norm < float("inf"),
    }
    for what, used in unsupported.items():
        if used:
            raise ValueError(f"adaptive clipping is not supported with {what}")
    return True
