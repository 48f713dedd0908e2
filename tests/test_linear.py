"""dpft.linear and its DP core (dpft.privacy.releases, rows): accounting, exactness without noise,
sensitivity, noise independence, utility."""

import math
import os

# JAX's CPU eigendecomposition calls OpenBLAS, whose thread pool busy-waits on a shared,
# oversubscribed CPU (a 512 x 512 eigh then takes 1-9 s instead of 0.05 s). This only takes effect
# if OpenBLAS is not loaded yet (e.g. when this file runs alone), and never overrides a setting.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dp_accounting as dpa  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from dp_accounting import pld  # noqa: E402

from dpft import linear as L  # noqa: E402
from dpft.linear import newton as NT  # noqa: E402
from dpft.linear import ridge as LS  # noqa: E402
from dpft.privacy import releases as A  # noqa: E402
from dpft.privacy import rows as R  # noqa: E402

DELTA = 1e-5
INF = math.inf


def blobs(n=2000, d=16, k=4, sep=0.8, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d))
    means *= sep / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, k, n)
    X = means[y] + rng.normal(size=(n, d)) / np.sqrt(d)
    return X.astype(np.float32), y


def small(n=60, d=5, k=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, k, n), k


# ------------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "epsilon, weights",
    [(1.0, [1.0]), (8.0, [1.0, 1.0]), (3.0, [0.3] + [0.7 / 5] * 5), (0.5, [1.0, 2.0, 3.0])],
)
def test_calibration_hits_target_and_matches_pld(epsilon, weights):
    sigmas = A.calibrate_gaussian_composition(epsilon, DELTA, weights)
    releases = [(1.0, s) for s in sigmas]
    eps = A.epsilon_of(releases, DELTA)
    assert 0.99 * epsilon <= eps <= epsilon
    # the mu^2 budget is split in proportion to the weights
    inv2 = 1 / sigmas**2
    np.testing.assert_allclose(inv2 / inv2.sum(), np.asarray(weights) / np.sum(weights), rtol=1e-9)
    # same number as dp-accounting's PLD on the same ComposedDpEvent ...
    acc = pld.PLDAccountant(value_discretization_interval=A.PLD_DISCRETIZATION)
    acc.compose(A.dp_event(sigmas))
    assert eps == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)
    # ... as the ungrouped composition at dp-accounting's default discretisation ...
    flat = pld.PLDAccountant()
    flat.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(float(s)) for s in sigmas]))
    assert eps == pytest.approx(flat.get_epsilon(DELTA), rel=1e-4)
    # ... and as the exact mu-GDP curve of the composition (mu = sqrt(sum mu_j^2))
    assert eps == pytest.approx(A.gdp_epsilon(math.sqrt(inv2.sum()), DELTA), rel=1e-4)


def test_more_budget_share_means_less_noise():
    s = A.calibrate_gaussian_composition(2.0, DELTA, [1.0, 3.0, 1.0])
    assert s[1] < s[0] and s[0] == pytest.approx(s[2])
    assert s[0] / s[1] == pytest.approx(math.sqrt(3))
    lo, hi = (A.calibrate_gaussian_composition(e, DELTA, [1.0])[0] for e in (1.0, 4.0))
    assert hi < lo
    # sensitivities scale the std, not the multiplier
    releases, info = A.plan_releases(2.0, DELTA, ["a", "b"], [1.0, 10.0], [1.0, 1.0])
    assert releases[1].noise_std == pytest.approx(10 * releases[0].noise_std)
    assert info["epsilon"] <= 2.0


def test_infinite_epsilon_means_no_noise_and_zero_noise_means_infinite_epsilon():
    assert np.all(A.calibrate_gaussian_composition(INF, DELTA, [1.0, 2.0]) == 0)
    assert A.epsilon_of([(1.0, 2.0), (1.0, 0.0)], DELTA) == INF
    with pytest.raises(ValueError):
        A.plan_releases(1.0, DELTA, ["a"], [INF], [1.0])
    with pytest.raises(ValueError):
        A.calibrate_gaussian_composition(1.0, DELTA, [1.0, 0.0])


# ------------------------------------------------------------------------------------------------
# Exactness without noise
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", ["onehot", "pm1"])
def test_dp_least_squares_without_noise_is_ridge_regression(targets):
    X, y, k = small()
    params, info = L.dp_least_squares(
        X, y, k, epsilon=INF, delta=DELTA, feature_clip=1e6, reg=0.5, targets=targets,
        key=jax.random.key(0),
    )  # fmt: skip
    ref = L.least_squares(X, y, k, reg=0.5, targets=targets)
    np.testing.assert_allclose(params.weights, ref.weights, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(params.bias) == 0) and info["epsilon"] == INF


def per_example_grads(WB, X, y, k):
    """Materialised per-example gradients of the linear head (for small reference checks)."""
    Xa = np.concatenate([X, np.ones((len(X), 1))], axis=1).astype(np.float64)
    Z = Xa @ WB
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    return np.einsum("nd,nk->ndk", Xa, P - np.eye(k)[y])


@pytest.mark.parametrize("update", ["sgd", "adam"])
def test_dp_gd_one_step_from_zero_is_the_analytic_step(update):
    X, y, k = small()
    lr = 0.7
    params, _ = L.dp_gd(
        X, y, k, epsilon=INF, delta=DELTA, clip_norm=INF, learning_rate=lr, update=update,
        key=jax.random.key(0),
    )  # fmt: skip
    Xa = np.concatenate([X, np.ones((len(X), 1))], axis=1).astype(np.float64)
    g = Xa.T @ (1.0 / k - np.eye(k)[y]) / len(X)  # at zero init p is uniform
    step = -lr * g if update == "sgd" else -lr * g / (np.abs(g) + 1e-8)
    got = np.concatenate([params.weights, params.bias[None]], axis=0)
    np.testing.assert_allclose(got, step, rtol=1e-5, atol=1e-7)


def test_closed_form_clipped_sum_matches_materialised_per_example_gradients():
    X, y, k = small()
    X[:5] *= 30  # some gradients get clipped, some not
    WB = np.random.default_rng(2).normal(size=(X.shape[1] + 1, k))
    G = per_example_grads(WB, X, y, k)
    norms = np.linalg.norm(G.reshape(len(X), -1), axis=1)
    clip = float(np.median(norms))
    ref = np.einsum("ndk,n->dk", G, np.minimum(1, clip / norms))
    got = R.clipped_head_grad_sum(jnp.asarray(WB, jnp.float32), R.augment(jnp.asarray(X)), y, clip)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def objective(params, X, y, k, reg):
    wb = np.concatenate([params.weights, np.asarray(params.bias)[None]], axis=0).astype(np.float64)
    Xa = np.concatenate([X, np.ones((len(X), 1))], axis=1).astype(np.float64)
    return NT._objective(wb.ravel(), Xa, np.eye(k)[y], reg)[0]


def test_dp_newton_without_noise_converges_to_logistic_regression():
    X, y, k = small(n=200)
    reg = 1e-2
    ref = L.logistic_regression(X, y, k, reg)
    kw = dict(epsilon=INF, delta=DELTA, feature_clip=1e6, reg=reg, key=jax.random.key(0))
    params, _ = L.dp_newton(X, y, k, steps=40, **kw)
    np.testing.assert_allclose(params.weights, ref.weights, atol=2e-3)
    np.testing.assert_allclose(params.bias, ref.bias, atol=2e-3)
    # Boehning's global bound makes every step a majorise-minimise step: monotone decrease
    values = [objective(L.dp_newton(X, y, k, steps=s, hessian="bohning", **kw)[0], X, y, k, reg)
              for s in (1, 2, 4, 8)]  # fmt: skip
    assert np.all(np.diff(values) < 0) and values[-1] > objective(ref, X, y, k, reg)


def test_dp_fc_without_noise_is_preconditioned_gd():
    X, y, k = small()
    lr, reg, steps = 0.5, 0.1, 3
    params, _ = L.dp_fc(
        X, y, k, epsilon=INF, delta=DELTA, feature_clip=1e6, clip_norm=INF, steps=steps,
        learning_rate=lr, cov_fraction=0.5, reg=reg, key=jax.random.key(0),
    )  # fmt: skip
    Xa = np.concatenate([X, np.ones((len(X), 1))], axis=1).astype(np.float64)
    pre = np.linalg.inv(Xa.T @ Xa / len(X) + reg * np.eye(Xa.shape[1]))
    WB = np.zeros((Xa.shape[1], k))
    for _ in range(steps):
        g = per_example_grads(WB, X, y, k).sum(0) / len(X)
        WB = WB - lr * pre @ g
    got = np.concatenate([params.weights, params.bias[None]], axis=0)
    np.testing.assert_allclose(got, WB, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Sensitivity on adversarial neighbouring datasets (noise off)
# ------------------------------------------------------------------------------------------------


def adversarial(k=5, d=6, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(30, d))
    X = np.concatenate(
        [
            X,
            1e15 * rng.normal(size=(2, d)),  # huge
            -1e12 * np.ones((1, d)),
            np.zeros((1, d)),
            1e-30 * np.ones((1, d)),  # tiny
            np.eye(d)[:2] * 1e6,  # one huge coordinate
        ]
    ).astype(np.float32)
    return X, rng.integers(0, k, len(X)), k


def max_removal_change(fn, X, y, rows):
    """max over i in rows of ||fn(D) - fn(D minus example i)||_F."""
    full = np.asarray(fn(X, y), np.float64)
    keep = np.ones(len(X), bool)
    out = []
    for i in rows:
        keep[:] = True
        keep[i] = False
        out.append(np.linalg.norm(full - np.asarray(fn(X[keep], y[keep]), np.float64)))
    return max(out)


def test_released_sums_change_by_at_most_their_sensitivity():
    X, y, k = adversarial()
    c = 2.5
    wb = jnp.asarray(np.random.default_rng(0).normal(size=(X.shape[1] + 1, k)), jnp.float32)
    aug = lambda X: R.augment(R.clip_rows(jnp.asarray(X), c))
    cases = [  # (released sum, stated sensitivity)
        (lambda X, y: R.gram_sum(jnp.asarray(X), c), c**2),
        (lambda X, y: R.xty_sum(X, LS.target_matrix(y, k, "onehot"), c), c),
        (lambda X, y: R.xty_sum(X, LS.target_matrix(y, k, "pm1"), c), c * math.sqrt(k)),
        (lambda X, y: R.clipped_head_grad_sum(wb, R.augment(jnp.asarray(X)), y, 0.7), 0.7),
        (lambda X, y: R.clipped_head_grad_sum(wb, aug(X), y, math.sqrt(2 * (c**2 + 1))),
         math.sqrt(2 * (c**2 + 1))),  # dp_newton's default: the clip never binds
        (lambda X, y: R.curvature_sum(wb, jnp.asarray(X), c, True), (c**2 + 1) / 2),
        (lambda X, y: R.curvature_sum(wb, jnp.asarray(X), c, False), (c**2 + 1) / 2),
        (lambda X, y: R.gram_sum(jnp.asarray(X), c, True), c**2 + 1),  # dp_fc's covariance
    ]  # fmt: skip
    rows = [0, 1, 2, *range(30, len(X))]  # three ordinary rows and all adversarial ones
    for fn, bound in cases:
        change = max_removal_change(fn, X, y, rows)
        assert change <= bound * (1 + 1e-4), (change, bound)
        assert change >= 0.3 * bound  # the adversarial rows do push against the bound


# ------------------------------------------------------------------------------------------------
# Noise: independent across class columns, elements and steps; std sigma * sensitivity
# ------------------------------------------------------------------------------------------------


NOISE_SHAPE = (1000, 10, 40)  # d, K, N


def assert_iid_columns(noise, std):
    noise = np.asarray(noise, np.float64)
    d, k = noise.shape
    # chi-square: sum z^2 ~ chi2(d k), approximately N(dk, 2dk)
    z = (np.sum((noise / std) ** 2) - d * k) / math.sqrt(2 * d * k)
    assert abs(z) < 5, z
    corr = np.corrcoef(noise.T)
    off = corr[~np.eye(k, dtype=bool)]
    assert np.max(np.abs(off)) < 5 / math.sqrt(d)  # null: corr ~ N(0, 1/d)


def test_xty_noise_is_independent_across_classes():
    d, k, n = NOISE_SHAPE
    std = 2.5
    X, Y = np.zeros((n, d), np.float32), np.eye(k, dtype=np.float32)[np.arange(n) % k]
    assert_iid_columns(R.noisy_xty_sum(X, Y, 1.0, std, jax.random.key(1)), std)


def test_dp_least_squares_releases_independent_calibrated_noise():
    d, k, n = NOISE_SHAPE
    X, y = np.zeros((n, d), np.float32), np.arange(n) % k
    G, B, info = LS.dp_sufficient_stats(
        X, y, k, epsilon=1.0, delta=DELTA, feature_clip=3.0, targets="pm1", budget_split=0.3,
        key=jax.random.key(2),
    )  # fmt: skip
    gram, xty = info["releases"]
    assert gram["sensitivity"] == 9.0 and xty["sensitivity"] == pytest.approx(3.0 * math.sqrt(k))
    assert_iid_columns(B, xty["noise_std"])  # with X = 0, B is pure noise
    upper = np.asarray(G, np.float64)[np.triu_indices(d)] / gram["noise_std"]
    assert abs((np.sum(upper**2) - upper.size) / math.sqrt(2 * upper.size)) < 5
    # the two releases use independent keys
    assert abs(np.corrcoef(np.asarray(G)[:k].ravel(), np.asarray(B).T.ravel())[0, 1]) < 5 / 100


@pytest.mark.parametrize("steps", [1, 2])
def test_dp_gd_noise_is_independent_across_classes_and_steps(steps):
    d, k, n = NOISE_SHAPE
    X, y = np.zeros((n, d), np.float32), np.arange(n) % k
    params, info = L.dp_gd(
        X, y, k, epsilon=2.0, delta=DELTA, clip_norm=1.5, steps=steps, learning_rate=1.0,
        normalizer=4.0, key=jax.random.key(3),
    )  # fmt: skip
    # x = 0: the weight gradient is pure noise; after `steps` sgd steps W = -sum_t Z_t / 4
    std = info["noise_multiplier"] * 1.5 * math.sqrt(steps) / 4.0
    assert_iid_columns(params.weights, std)


def test_symmetric_gram_noise():
    d, std = 600, 0.7
    E = np.asarray(R.symmetric_gaussian(jax.random.key(4), d, std), np.float64)
    np.testing.assert_array_equal(E, E.T)
    upper = E[np.triu_indices(d)]
    z = (np.sum((upper / std) ** 2) - upper.size) / math.sqrt(2 * upper.size)
    assert abs(z) < 5
    # the rows above the diagonal are independent of each other
    a, b = E[0, 1:300], E[1, 301:600]
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(299)


# ------------------------------------------------------------------------------------------------
# Smoke at scale, and utility at epsilon = 8
# ------------------------------------------------------------------------------------------------


def test_smoke_many_classes():
    rng = np.random.default_rng(5)
    n, d, k = 500, 512, 1000
    X, y = rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, k, n)
    kw = dict(epsilon=2.0, delta=DELTA, key=jax.random.key(5))
    out = [
        L.dp_gd(X, y, k, clip_norm=1.0, learning_rate=1.0, update="adam", **kw),
        L.dp_least_squares(X, y, k, feature_clip=1.0, reg=1.0, **kw),
        L.dp_newton(X, y, k, feature_clip=1.0, steps=2, reg=1.0, hessian="bohning", **kw),
        L.dp_fc(X, y, k, feature_clip=1.0, clip_norm=1.0, steps=2, learning_rate=1.0,
                cov_fraction=0.5, reg=1.0, **kw),
    ]  # fmt: skip
    for params, info in out:
        assert params.weights.shape == (d, k) and params.bias.shape == (k,)
        assert np.all(np.isfinite(params.weights)) and info["epsilon"] <= 2.0


def test_smoke_wide_features():
    # d = 4096 for the eigen-free method (a 4096^2 eigendecomposition takes ~1 min on 2 CPUs)
    rng = np.random.default_rng(6)
    n, d, k = 200, 4096, 10
    X, y = rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, k, n)
    params, info = L.dp_gd(
        X, y, k, epsilon=1.0, delta=DELTA, clip_norm=1.0, steps=2, learning_rate=1.0,
        key=jax.random.key(6),
    )  # fmt: skip
    assert params.weights.shape == (d, k) and np.all(np.isfinite(params.weights))
    G = R.noisy_gram_sum(X, 1.0, 0.1, jax.random.key(7))
    assert G.shape == (d, d) and bool(jnp.all(G == G.T))


def test_every_method_learns_blobs_at_epsilon_8():
    X, y = blobs()
    k = 4
    assert L.accuracy(L.logistic_regression(X, y, k, 1e-3), X, y) > 0.95
    kw = dict(epsilon=8.0, delta=DELTA, key=jax.random.key(8))
    fits = {
        "gd": L.dp_gd(X, y, k, clip_norm=1.0, learning_rate=1.0, **kw),
        "adam": L.dp_gd(X, y, k, clip_norm=1.0, steps=3, learning_rate=0.3, update="adam", **kw),
        "ls": L.dp_least_squares(X, y, k, feature_clip=2.0, reg=10.0, **kw),
        "newton": L.dp_newton(X, y, k, feature_clip=2.0, steps=3, reg=1e-2, **kw),
        "fc": L.dp_fc(X, y, k, feature_clip=2.0, clip_norm=1.0, steps=3, learning_rate=1.0,
                      cov_fraction=0.3, reg=1e-2, **kw),
    }  # fmt: skip
    for name, (params, info) in fits.items():
        assert 0.99 * 8.0 <= info["epsilon"] <= 8.0, name
        assert L.accuracy(params, X, y) > 0.9, (name, L.accuracy(params, X, y))


def test_rejects_bad_inputs():
    X, y, k = small()
    kw = dict(epsilon=1.0, delta=DELTA, feature_clip=1.0, reg=1.0, key=jax.random.key(0))
    with pytest.raises(ValueError):
        L.dp_least_squares(X, y + k, k, **kw)
    with pytest.raises(ValueError):
        L.dp_least_squares(np.where(X > 0, np.nan, X), y, k, **kw)
    with pytest.raises(ValueError):
        L.dp_least_squares(X, y, k, **{**kw, "epsilon": -1.0})
    with pytest.raises(ValueError):  # clipping is required for a finite epsilon
        L.dp_least_squares(X, y, k, **{**kw, "feature_clip": INF})
    with pytest.raises(ValueError):
        L.dp_gd(X, y, k, epsilon=1.0, delta=DELTA, clip_norm=1.0, learning_rate=1.0,
                update="rmsprop", key=jax.random.key(0))  # fmt: skip
