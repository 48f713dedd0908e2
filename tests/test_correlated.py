"""Banded matrix factorization (dpft.privacy.correlated): strategy, privatizer, sampler, accounting.

The privatizer's recursion is checked against the dense ``C^{-1} Z`` and its noise covariance
against ``sigma^2 S^2 C^{-1} C^{-T}`` by a statistical test; the sensitivity of ``C X`` over every
participation pattern the cyclic sampler allows is computed by brute force; with ``b = 1``
everything reduces to today's DP-SGD accounting; a tiny MNIST run resumes exactly. (The
Privacy: sections of the public functions are checked in test_core_isolation.)
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import crash_at_metrics, latest_checkpoint, needs_data, tiny_mnist_config

from dpft.privacy import accounting, banded_strategy, correlated, ledger, noise, sampling
from dpft.train import build

SIGMA, CLIP = 1.3, 2.0
STD = SIGMA * CLIP
COEFS = (1.0, 0.6, 0.35, 0.15)  # a 4-band with positive tail (cross terms would add up)


def run_privatizer(coefs, shapes, steps, key=0, updates=None):
    tx = correlated.banded_mf_privatizer(SIGMA, CLIP, coefs, key)
    zeros = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    state = tx.init(zeros)
    outs = []
    for t in range(steps):
        u = zeros if updates is None else updates[t]
        out, state = tx.update(u, state)
        outs.append(out)
    return outs, state, tx


def fresh_z(key, shapes, steps):
    """The z_t the privatizer draws, from the documented keys."""
    raw = jnp.asarray(jax.random.PRNGKey(key))
    zeros = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    return [
        noise.gaussian_noise(correlated.banded_step_key(raw, t), zeros, STD) for t in range(steps)
    ]


# ------------------------------------------------------------------------------- strategy


def test_band_one_is_dp_sgd_and_optimum_beats_the_square_root_start():
    assert correlated.optimal_banded_coefs(50, 1).tolist() == [1.0]
    assert correlated.prefix_sum_error((1.0,), 50) == pytest.approx(50 * 51 / 2)
    n = 200
    for b in (2, 4, 8):
        c = correlated.optimal_banded_coefs(n, b)
        assert c.shape == (b,) and c[0] == 1.0
        err = correlated.prefix_sum_error(c, n)
        assert err <= correlated.prefix_sum_error(banded_strategy._sqrt_coefs(b), n)
        assert err < 0.6 * n * (n + 1) / 2  # less total error than C = I at equal multiplier
        # a local optimum: the gradient in the free coefficients vanishes
        g = correlated.prefix_sum_error_grad(c, n)[1:]
        assert np.max(np.abs(g)) < 1e-3 * err
    # more band, less error
    errs = [
        correlated.prefix_sum_error(correlated.optimal_banded_coefs(n, b), n) for b in (1, 2, 4)
    ]
    assert errs[0] > errs[1] > errs[2]


def test_error_matches_dense_matrices_and_gradient_matches_finite_differences():
    n = 9
    c = np.array(COEFS)
    cmat = correlated.band_matrix(c, n)
    a = np.tril(np.ones((n, n)))
    dense = np.dot(c, c) * np.linalg.norm(a @ np.linalg.inv(cmat), "fro") ** 2
    assert correlated.prefix_sum_error(c, n) == pytest.approx(dense, rel=1e-12)
    np.testing.assert_allclose(
        correlated.inverse_coefs(c, n), np.linalg.inv(cmat)[:, 0], rtol=1e-12, atol=1e-14
    )
    assert correlated.column_norm(c) == pytest.approx(np.max(np.linalg.norm(cmat, axis=0)))
    g = correlated.prefix_sum_error_grad(c, n)
    h = 1e-6
    for j in range(1, len(c)):
        e = np.eye(len(c))[j] * h
        fd = (correlated.prefix_sum_error(c + e, n) - correlated.prefix_sum_error(c - e, n)) / 2 / h
        assert g[j] == pytest.approx(fd, rel=1e-6)


def test_coefs_are_checked():
    for bad in ((), (0.5, 0.1), (1.0, float("nan")), [[1.0]]):
        with pytest.raises(ValueError):
            correlated.check_coefs(bad)
    with pytest.raises(ValueError, match="band"):
        correlated.optimal_banded_coefs(3, 4)


# ------------------------------------------------------------------------------ privatizer


def test_recursion_equals_dense_inverse_times_z():
    shapes = {"w": (3, 5), "b": (7,)}
    n = 11
    outs, state, _ = run_privatizer(COEFS, shapes, n, key=4)
    zs = fresh_z(4, shapes, n)
    cinv = np.linalg.inv(correlated.band_matrix(COEFS, n))
    for name, shape in shapes.items():
        z = np.stack([np.asarray(zt[name]).ravel() for zt in zs])  # n x d
        got = np.stack([np.asarray(o[name]).ravel() for o in outs])
        np.testing.assert_allclose(got, cinv @ z, rtol=1e-4, atol=1e-5 * STD)
        assert outs[0][name].dtype == jnp.float32 and outs[0][name].shape == shape
        # the state holds the last b - 1 noise vectors, newest first
        hist = np.asarray(state.history[name]).reshape(len(COEFS) - 1, -1)
        np.testing.assert_allclose(hist, got[::-1][:3], rtol=1e-6)
    assert int(state.count) == n


def test_noise_is_added_to_the_updates():
    shapes = {"w": (6,)}
    ups = [{"w": jnp.full((6,), float(t))} for t in range(4)]
    noisy, _, _ = run_privatizer(COEFS, shapes, 4, key=1, updates=ups)
    pure, _, _ = run_privatizer(COEFS, shapes, 4, key=1)
    for t in range(4):
        np.testing.assert_allclose(noisy[t]["w"] - pure[t]["w"], t, atol=1e-5)


def test_band_one_is_iid_noise_from_a_key_domain_disjoint_from_the_independent_privatizer():
    shapes = {"w": (20000,)}
    outs, _, _ = run_privatizer((1.0,), shapes, 2, key=3)
    zs = fresh_z(3, shapes, 2)
    np.testing.assert_array_equal(outs[0]["w"], zs[0]["w"])
    ind = noise.gaussian_privatizer(SIGMA, CLIP, 3)
    zeros = {"w": jnp.zeros((20000,))}
    ind_out, _ = ind.update(zeros, ind.init(zeros))
    r = np.corrcoef(np.asarray(outs[0]["w"]), np.asarray(ind_out["w"]))[0, 1]
    assert abs(r) < 5 / math.sqrt(20000)  # independent draws, not the same stream
    assert not np.allclose(outs[0]["w"], ind_out["w"])


def test_noise_covariance_is_sigma2_cinv_cinvT():
    """Empirical covariance over 60000 coordinates of the n-step noise vs the formula."""
    n, d = 6, 60000
    outs, _, _ = run_privatizer(COEFS, {"w": (d,)}, n, key=11)
    x = np.stack([np.asarray(o["w"], np.float64) for o in outs])  # n x d, columns i.i.d.
    emp = x @ x.T / d
    cinv = np.linalg.inv(correlated.band_matrix(COEFS, n))
    want = STD**2 * cinv @ cinv.T
    se = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want**2) / d)  # Wishart std
    assert np.max(np.abs(emp - want) / se) < 5
    # the same test rejects independent noise of the same per-step variance
    iid = np.diag(np.diag(want))
    se_iid = np.sqrt((np.outer(np.diag(iid), np.diag(iid)) + iid**2) / d)
    assert np.max(np.abs(emp - iid) / se_iid) > 20


def test_state_is_a_pytree_and_resumes_exactly():
    shapes = {"w": (4, 3), "b": (5,)}
    full, _, _ = run_privatizer(COEFS, shapes, 8, key=2)
    first, state, tx = run_privatizer(COEFS, shapes, 5, key=2)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    restored = jax.tree_util.tree_unflatten(treedef, [np.array(x) for x in leaves])  # a copy
    zeros = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    rest = []
    for _ in range(3):
        out, restored = tx.update(zeros, restored)
        rest.append(out)
    for a, b in zip(full, first + rest, strict=True):
        for k in shapes:
            np.testing.assert_array_equal(a[k], b[k])


def test_privatizer_jits():
    tx = correlated.banded_mf_privatizer(SIGMA, CLIP, COEFS, 0)
    p = {"w": jnp.zeros((3,))}
    s = tx.init(p)
    out_j, s_j = jax.jit(tx.update)(p, s)
    out, s2 = tx.update(p, s)
    np.testing.assert_allclose(out_j["w"], out["w"], rtol=1e-6)
    np.testing.assert_allclose(s_j.history["w"], s2.history["w"], rtol=1e-6)


# -------------------------------------------------------------------------------- sampler


def test_cyclic_sampler_draws_from_partition_t_mod_b():
    n_ex, b, q = 3000, 4, 0.1
    s = sampling.CyclicPoissonSampler(n_ex, q, b, seed=5, assignment_seed=9)
    parts = s.partitions
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(n_ex))  # a partition of the examples
    assert all(abs(len(p) - n_ex / b) < 5 * math.sqrt(n_ex / b) for p in parts)
    counts = np.zeros(n_ex)
    steps = 400
    for t in range(steps):
        batch = s.batch_at(t)
        chosen = batch.indices[batch.mask]
        assert np.isin(chosen, parts[t % b]).all()
        counts[chosen] += 1
    rate = counts.sum() / (steps / b * n_ex)  # per example per step of its partition
    assert rate == pytest.approx(q, rel=0.03)
    # the assignment is public: it depends on assignment_seed, not on the (secret) seed
    other = sampling.CyclicPoissonSampler(n_ex, q, b, seed=6, assignment_seed=9)
    assert all(np.array_equal(a, c) for a, c in zip(parts, other.partitions, strict=True))
    assert not np.array_equal(s.batch_at(0).indices, other.batch_at(0).indices)
    assert s.expected_batch_size == pytest.approx(q * n_ex / b)
    assert s.overflow_prob <= 1e-12


def test_cyclic_sampler_resumes_exactly():
    a = sampling.CyclicPoissonSampler(500, 0.2, 3, seed=1, assignment_seed=0)
    first = [a.next() for _ in range(4)]
    b = sampling.CyclicPoissonSampler(500, 0.2, 3, seed=1, assignment_seed=0)
    b.load_state_dict(a.state_dict())
    c = sampling.CyclicPoissonSampler(500, 0.2, 3, seed=1, assignment_seed=0)
    ref = [c.next() for _ in range(7)]
    for x, y in zip(first + [b.next() for _ in range(3)], ref, strict=True):
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_array_equal(x.mask, y.mask)


# ---------------------------------------------------------------------- sensitivity (brute)


def participation_patterns(n_ex, b, n):
    """Every example's steps when the sampler takes the whole partition (q = 1)."""
    s = sampling.CyclicPoissonSampler(n_ex, 1.0, b, seed=0, assignment_seed=3)
    steps = {i: [] for i in range(n_ex)}
    for t in range(n):
        batch = s.batch_at(t)
        for i in batch.indices[batch.mask]:
            steps[int(i)].append(t)
    return {tuple(v) for v in steps.values()}


def brute_force_sq_sensitivity(cmat, pattern):
    """max ||C[:, S] g||^2 over g in [-1, 1]^|S| (clipped scalar gradients): at a vertex."""
    cols = cmat[:, list(pattern)]
    signs = itertools.product((-1.0, 1.0), repeat=len(pattern))
    return max(float(np.sum((cols @ np.array(g)) ** 2)) for g in signs)


@pytest.mark.parametrize("coefs", [COEFS, None])
def test_sensitivity_over_every_allowed_pattern_matches_the_formula(coefs):
    n, b = 10, 4
    coefs = correlated.optimal_banded_coefs(n, b) if coefs is None else coefs
    cmat = correlated.band_matrix(coefs, n)
    maximal = participation_patterns(40, b, n)
    assert maximal == {tuple(range(k, n, b)) for k in range(b)}  # b-min-separated
    norm = correlated.column_norm(coefs)
    worst = 0.0
    for pat in maximal:
        for r in range(1, len(pat) + 1):
            for sub in itertools.combinations(pat, r):  # Poisson: any subset participates
                brute = brute_force_sq_sensitivity(cmat, sub)
                # disjoint column supports: no cross terms, for gradients of any dimension
                gram = cmat[:, list(sub)].T @ cmat[:, list(sub)]
                np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-12)
                assert brute == pytest.approx(float(np.trace(gram)), rel=1e-12)
                # each participation costs at most column_norm^2, on its own block of rows
                assert brute <= r * norm**2 * (1 + 1e-12)
                worst = max(worst, brute)
    assert worst <= correlated.participations(n, b) * norm**2 * (1 + 1e-12)
    # one participation at a full column attains the per-round sensitivity exactly
    assert brute_force_sq_sensitivity(cmat, (0,)) == pytest.approx(norm**2)


def test_brute_force_detects_participations_closer_than_the_band():
    cmat = correlated.band_matrix(COEFS, 8)
    close = brute_force_sq_sensitivity(cmat, (0, 1))
    assert close > 2 * correlated.column_norm(COEFS) ** 2 * 1.1  # cross terms add up


# -------------------------------------------------------------------------------- accounting


def test_band_one_accounting_is_exactly_dp_sgd():
    q, n, delta = 0.01, 300, 1e-5
    kw = {"dataset_size": 10000, "max_batch_size": 200}
    for acct in ("pld", "rdp"):
        got = correlated.banded_epsilon(1.1, (1.0,), q, n, delta, acct, **kw)
        want = accounting.compute_epsilon(accounting.GaussianSteps(1.1, q, n, **kw), delta, acct)
        assert got == want
    assert (
        correlated.banded_dp_event(1.1, (1.0,), q, n)
        == accounting.dp_event(accounting.GaussianSteps(1.1, q, n)).events[0]
    )
    s1 = correlated.calibrate_banded_noise_multiplier(2.0, delta, q, n, (1.0,), "rdp")
    s2 = accounting.calibrate_noise_multiplier(2.0, delta, q, n, "rdp")
    assert s1 == s2


def test_banded_accounting_is_dp_sgd_over_rounds_at_sigma_over_column_norm():
    q, n, delta, b = 0.05, 101, 1e-5, 4
    coefs = correlated.optimal_banded_coefs(n, b)
    norm = correlated.column_norm(coefs)
    eps = correlated.banded_epsilon(3.0, coefs, q, n, delta, "rdp")
    want = accounting.GaussianSteps(3.0 / norm, q, math.ceil(n / b))
    assert eps == accounting.compute_epsilon(want, delta, "rdp")
    event = correlated.banded_dp_event(3.0, coefs, q, n)
    assert event.count == 26 and event.event.sampling_probability == q
    assert event.event.event.noise_multiplier == pytest.approx(3.0 / norm)
    sigma = correlated.calibrate_banded_noise_multiplier(2.0, delta, q, n, coefs, "rdp", 1e-3)
    assert correlated.banded_epsilon(sigma, coefs, q, n, delta, "rdp") <= 2.0
    assert correlated.banded_epsilon(sigma * 0.995, coefs, q, n, delta, "rdp") > 2.0


def test_banded_ledger_counts_rounds_and_budget_refuses_only_opening_steps():
    b = 3
    entry = correlated.banded_entry(2.0, COEFS[:b], 0.1)
    led = correlated.BandedLedger(b)
    for t in range(1, 11):
        led.record(entry, 1)
        assert led.steps == t and led.rounds == math.ceil(t / b)
    assert correlated.BandedLedger.from_dict(led.to_dict()) == led
    assert ledger.PrivacyLedger.from_dict(led.to_dict()).epsilon(1e-5) == led.epsilon(1e-5)
    one = correlated.BandedLedger(1)
    plain = ledger.PrivacyLedger()
    for _ in range(5):
        one.record(entry, 1)
        plain.record(entry, 1)
    assert one.entries == plain.entries
    # a budget of exactly 2 rounds allows 2 * b steps, then stops at the step opening round 3
    two = accounting.compute_epsilon(entry.with_count(2), 1e-5, "rdp")
    budget = correlated.BandedBudget(two * 1.0001, 1e-5, "rdp", b)
    for _ in range(2 * b):
        budget.spend(entry)
    with pytest.raises(ledger.BudgetExceededError):
        budget.spend(entry)
    assert budget.ledger.steps == 2 * b and budget.epsilon() <= two * 1.0001


# -------------------------------------------------------------------------------- wiring


def tiny_config(**dp):
    """test_train's tiny MNIST run with banded MF noise (band 3) unless ``dp`` says otherwise."""
    return tiny_mnist_config("tiny_mf", **{"noise": "banded_mf", "band": 3, **dp})


def test_plan_and_optimizer_of_banded_mf():
    c = tiny_config(noise_multiplier=-1.0, epsilon=3.0)
    c.train.steps = 30
    c.train.max_batch_size = 0
    plan = build.plan_privacy(c, 600)
    assert plan.noise == "banded_mf" and len(plan.coefs) == 3 and plan.coefs[0] == 1.0
    assert plan.sampling_rate == pytest.approx(3 * 32 / 600)
    assert plan.expected_batch_size == 32.0
    entry = plan.entry()
    assert entry.noise_multiplier == pytest.approx(
        plan.noise_multiplier / correlated.column_norm(plan.coefs)
    )
    assert entry.dataset_size == plan.partition_size
    eps = accounting.compute_epsilon(entry.with_count(10), 1e-4, "pld")
    assert eps <= 3.0
    assert isinstance(build.build_sampler(plan, 0), sampling.CyclicPoissonSampler)
    assert isinstance(build.build_budget(plan), correlated.BandedBudget)
    tx = build.build_optimizer(c, plan, 1.0, jax.random.PRNGKey(0))
    state = tx.init({"w": jnp.zeros(3)})
    assert isinstance(state[0], correlated.BandedState)
    # independent noise is unchanged
    c2 = tiny_config(noise="independent", band=1)
    plan2 = build.plan_privacy(c2, 600)
    assert plan2.noise == "independent" and plan2.sampling_rate == pytest.approx(32 / 600)
    assert isinstance(build.build_sampler(plan2, 0), sampling.PoissonSampler)


def test_unsupported_combinations_fail_in_one_line():
    cases = [
        (tiny_config(noise="independent", band=4), "needs config.dp.noise='banded_mf'"),
        (tiny_config(noise="toeplitz"), "config.dp.noise must be"),
        (tiny_config(band=0), "config.dp.band must be"),
        (tiny_config(band=30), "band \\* batch_size"),
    ]
    grain = tiny_config()
    grain.data.pipeline = "grain"
    cases.append((grain, "not supported with config.data.pipeline='grain'"))
    fsdp = tiny_config()
    fsdp.parallel.fsdp = True
    cases.append((fsdp, "not supported with config.parallel.fsdp"))
    fed = tiny_config()
    fed.federated = {"rounds": 1}
    cases.append((fed, "not supported with config.federated"))
    for cfg, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            build.plan_privacy(cfg, 600) if "federated" not in cfg else build.check_noise(cfg)
        assert "\n" not in str(err.value)


def test_fmnist_cnn_mf_configs():
    from configs import fmnist_cnn

    c = fmnist_cnn.get_config("mf")
    assert c.dp.noise == "banded_mf" and c.dp.band > 1
    s = fmnist_cnn.get_config("mf,smoke")
    assert s.dp.noise == "banded_mf" and s.train.steps == 6
    assert build.check_noise(s) == "banded_mf"
    assert fmnist_cnn.get_config("").dp.noise == "independent"
    with pytest.raises(ValueError):
        fmnist_cnn.get_config("mf,bogus")


@needs_data
def test_banded_mf_run_resumes_exactly_and_accounts_rounds(tmp_path, compilation_cache):
    from dpft.train import train_and_evaluate

    c = tiny_config()
    full = train_and_evaluate(c, tmp_path / "full")
    assert full["steps"] == 6 and full["sampling_rate"] == pytest.approx(3 * 32 / 600)
    arrays, meta = latest_checkpoint(tmp_path / "full")
    assert meta["ledger"]["steps"] == 6 and meta["ledger"]["band"] == 3
    assert sum(e["count"] for e in meta["ledger"]["entries"]) == 2  # ceil(6 / 3) rounds
    plan = build.plan_privacy(c, 600)
    assert plan.entry().noise_multiplier == 2.0 / correlated.column_norm(plan.coefs)
    want = accounting.compute_epsilon(plan.entry().with_count(2), 1e-4)
    assert full["epsilon"] == pytest.approx(want, rel=1e-6)
    with crash_at_metrics(4):
        train_and_evaluate(c, tmp_path / "resumed")
    assert latest_checkpoint(tmp_path / "resumed")[1]["step"] == 3
    resumed = train_and_evaluate(c, tmp_path / "resumed")
    arrays2, meta2 = latest_checkpoint(tmp_path / "resumed")
    assert meta2["ledger"] == meta["ledger"]
    for a, b in zip(arrays, arrays2, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed["epsilon"] == full["epsilon"]
