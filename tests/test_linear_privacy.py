"""The DP core of the feature methods (dpft.privacy.rows): precision of the released sums, keys."""

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.lax import lax as lax_internal

from dpft import linear as L
from dpft.privacy import keys
from dpft.privacy import rows as R

# ------------------------------------------------------------------------------------------------
# Precision: a released sum keeps its bound when the default matmul precision is one bf16 pass
# ------------------------------------------------------------------------------------------------


def _is_default(precision) -> bool:
    if precision is None:
        return True
    if isinstance(precision, tuple | list):
        return all(_is_default(p) for p in precision)
    return precision in (jax.lax.Precision.DEFAULT, "default", "DEFAULT")


def _bf16(x):
    x = jnp.asarray(x)
    return x.astype(jnp.bfloat16).astype(jnp.float32) if x.dtype == jnp.float32 else x


@pytest.fixture
def bf16_default_precision(monkeypatch):
    """``lax.dot_general`` at the default precision rounds its float32 operands to bfloat16 (one
    bf16 pass, as on TPUs; XLA:CPU ignores the precision setting). jnp.matmul, jnp.dot,
    jnp.tensordot and ``@`` call it through the module attribute patched here (jnp.einsum binds
    it as a default argument and would not see the patch). Jit is disabled so that the patch is
    seen at trace time. Yields the list of the precisions of every call."""
    real = lax_internal.dot_general
    calls = []

    def dot_general(lhs, rhs, dimension_numbers, precision=None, *args, **kwargs):
        calls.append(precision)
        if _is_default(precision):
            lhs, rhs = _bf16(lhs), _bf16(rhs)
        return real(lhs, rhs, dimension_numbers, precision, *args, **kwargs)

    monkeypatch.setattr(lax_internal, "dot_general", dot_general)
    with jax.disable_jit():
        yield calls


# Every entry rounds UP in bfloat16: 1 + 2^-8 + 2^-10 lies above the midpoint 1 + 2^-8 between
# the bf16 neighbours 1 and 1 + 2^-7.
V = 1 + 2**-8 + 2**-10
D = 4
ROW = np.full((1, D), V, np.float32)
# A clip just above the row's norm 2 V (so the row is not rescaled) and below its bf16 norm.
FEATURE_CLIP = 2 * (1 + 2**-7) * (1 - 1e-3)


def contribution(fn, *args) -> float:
    """Frobenius norm of the sum over the one-example dataset (the sum without it is 0)."""
    return float(np.linalg.norm(np.asarray(fn(*args), np.float64)))


def test_the_emulation_breaks_a_default_precision_sum(bf16_default_precision):
    x = jnp.asarray(ROW)
    assert float(np.linalg.norm(ROW)) < FEATURE_CLIP
    for form in (lambda: x.T @ x, lambda: jnp.matmul(x.T, x), lambda: jnp.dot(x.T, x),
                 lambda: jnp.tensordot(x.T, x, 1)):  # fmt: skip
        bf16_default_precision.clear()
        assert np.linalg.norm(np.asarray(form())) > FEATURE_CLIP**2 * (1 + 1e-3)
        assert bf16_default_precision  # the patched function was called


def released_sums():
    """(name, the released sum on the one-example dataset, its stated bound)."""
    c = FEATURE_CLIP
    X = jnp.asarray(ROW)
    Xa = R.augment(X)
    y = jnp.asarray([0])
    WB = jnp.zeros((D + 1, 2), jnp.float32)  # p = (1/2, 1/2): G = (-1/2, 1/2), exact in bf16
    grad_norm = float(np.linalg.norm(np.append(ROW, 1.0)) * math.sqrt(0.5))
    clip = grad_norm * (1 + 1e-4)  # the gradient clip does not bind
    onehot = jnp.asarray([[1.0, 0.0]])
    return [
        ("grad", lambda: R.clipped_head_grad_sum(WB, Xa, y, clip), clip),
        ("gram", lambda: R.gram_sum(X, c), c**2),
        ("covariance", lambda: R.gram_sum(X, c, True), c**2 + 1),
        ("xty", lambda: R.xty_sum(X, onehot, c), c),
        ("curvature", lambda: R.curvature_sum(WB, X, c, True), (c**2 + 1) / 2),
        ("bohning", lambda: R.curvature_sum(WB, X, c, False), (c**2 + 1) / 2),
    ]


@pytest.mark.parametrize("case", range(len(released_sums())), ids=[n for n, *_ in released_sums()])
def test_released_sums_keep_their_bound_at_bf16_default_precision(case, bf16_default_precision):
    name, fn, bound = released_sums()[case]
    bf16_default_precision.clear()
    got = contribution(fn)
    assert bf16_default_precision, name  # the sum went through the patched dot_general
    assert got <= bound * (1 + 1e-6), (name, got, bound)
    assert got >= bound * (1 - 1e-2), (name, got, bound)  # the example is near the bound


def test_contractions_of_released_sums_ask_for_highest_precision(bf16_default_precision):
    for name, fn, _ in released_sums():
        bf16_default_precision.clear()
        fn()
        # the last contraction forms the sum; the logits before it may run at the default
        assert bf16_default_precision[-1] == jax.lax.Precision.HIGHEST, name


# ------------------------------------------------------------------------------------------------
# Keys: release j from keys.derive(key, "release", j), chunk i from keys.derive(k, "chunk", i)
# ------------------------------------------------------------------------------------------------


def derive(key, purpose, *indices):
    """The documented derivation, written out: the purpose's tag, then each index."""
    key = jax.random.fold_in(key, int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4]))
    for i in indices:
        key = jax.random.fold_in(key, i)
    return key


def test_noise_chunks_are_drawn_from_chunk_keys():
    key = jax.random.key(11)
    n = R.NOISE_CHUNK + 10
    z = np.asarray(R.gaussian(key, (n,), 2.0))
    for i, (lo, hi) in enumerate([(0, R.NOISE_CHUNK), (R.NOISE_CHUNK, n)]):
        chunk = jax.random.normal(derive(key, "chunk", i), (R.NOISE_CHUNK,), jnp.float32)
        np.testing.assert_array_equal(z[lo:hi], 2.0 * np.asarray(chunk)[: hi - lo])
    data = jax.random.key_data
    np.testing.assert_array_equal(data(keys.derive(key, "chunk", 1)), data(derive(key, "chunk", 1)))


def test_releases_draw_their_noise_from_release_keys():
    key = jax.random.key(12)
    n, d, k = 40, 6, 3
    X, y = np.zeros((n, d), np.float32), np.arange(n) % k

    def noise(j, shape, std):
        return np.asarray(R.gaussian(derive(key, "release", j), shape, std))

    # dp_gd, x = 0: the weight gradient is pure noise; with lr 1 and normalizer 1, sgd gives
    # W = -(Z_0 + Z_1) on the weight rows
    params, info = L.dp_gd(
        X, y, k, epsilon=2.0, delta=1e-5, clip_norm=1.5, steps=2, learning_rate=1.0,
        normalizer=1.0, key=key,
    )  # fmt: skip
    std = info["releases"][0]["noise_std"]
    want = -(noise(0, (d + 1, k), std) + noise(1, (d + 1, k), std))[:-1]
    np.testing.assert_allclose(params.weights, want, rtol=1e-5, atol=1e-5)
    # DP least squares, x = 0: B = X^T Y + Z is release 1's noise
    _, B, info = L.dp_sufficient_stats(
        X, y, k, epsilon=2.0, delta=1e-5, feature_clip=1.0, key=key
    )  # fmt: skip
    np.testing.assert_array_equal(B, noise(1, (d, k), info["releases"][1]["noise_std"]))
