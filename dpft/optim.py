"""DP optimizers: ``optax.chain(privatizer, normalize_by_expected_batch, base_optimizer)``.

The privatizer adds Gaussian noise to the SUM of clipped per-example gradients of a logical
batch; the sum is then divided by the PUBLIC expected batch size (``q * N`` for Poisson
sampling), never by the realised one, which would depend on private data; the base optimizer
(SGD, Adam(W), LAMB from optax) is post-processing.

    tx = dpft.optim.dp_adam(1e-3, noise_multiplier=1.1, l2_sensitivity=clipper.sensitivity(p),
                            expected_batch_size=256.0, key=0)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from dpft.privacy.noise import gaussian_privatizer

__all__ = [
    "dp_adam",
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


def _dp(base_fn: Callable[..., optax.GradientTransformation]):
    def make(
        learning_rate: ScalarOrSchedule,
        *,
        noise_multiplier: float,
        l2_sensitivity: float,
        expected_batch_size: float,
        key: jax.Array | int,
        **kwargs,
    ) -> optax.GradientTransformation:
        return dp_chain(
            base_fn(learning_rate, **kwargs),
            noise_multiplier=noise_multiplier,
            l2_sensitivity=l2_sensitivity,
            expected_batch_size=expected_batch_size,
            key=key,
        )

    make.__doc__ = (
        f"DP version of ``optax.{base_fn.__name__}``: privatizer, division by the expected batch "
        f"size, then ``optax.{base_fn.__name__}(learning_rate, **kwargs)``. See `dp_chain`."
    )
    return make


dp_sgd = _dp(optax.sgd)  # momentum=..., nesterov=...
dp_adam = _dp(optax.adam)
dp_adamw = _dp(optax.adamw)
dp_lamb = _dp(optax.lamb)

_BASES = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw, "lamb": optax.lamb}


def dp_optimizer(name: str, learning_rate: ScalarOrSchedule, **kwargs):
    """DP optimizer by name: 'sgd' | 'adam' | 'adamw' | 'lamb' (see `dp_chain` for kwargs)."""
    if name not in _BASES:
        raise ValueError(f"optimizer must be one of {sorted(_BASES)}, got {name!r}")
    return _dp(_BASES[name])(learning_rate, **kwargs)
