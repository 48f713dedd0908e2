"""Accountant against dp-accounting, calibration, ledger, budget and the command line."""

import json
import math
import subprocess
import sys

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp
from scipy import stats

from dpft.privacy import accounting as A

SETTINGS = [  # (q, sigma, steps, delta)
    (256 / 60000, 1.1, 1000, 1e-5),
    (0.01, 0.8, 200, 1e-6),
    (0.1, 2.0, 50, 1e-5),
    (1.0, 5.0, 10, 1e-5),
]


def direct(q, sigma, steps, delta, accountant):
    acc = pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant()
    event = (
        dpa.GaussianDpEvent(sigma)
        if q == 1
        else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
    )
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("q, sigma, steps, delta", SETTINGS)
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_matches_dp_accounting(q, sigma, steps, delta, accountant):
    ours = A.compute_epsilon(A.GaussianSteps(sigma, q, steps), delta, accountant)
    assert ours == pytest.approx(direct(q, sigma, steps, delta, accountant), rel=1e-6)


def test_pld_is_tighter_than_rdp_and_both_are_upper_bounds_of_published_runs():
    # De et al. 2022, CIFAR-10: q = 4096/50000, sigma = 10, 875 steps, delta 1e-5: eps ~ 1 (RDP).
    de = A.GaussianSteps(10.0, 4096 / 50000, 875)
    # Kurakin et al. 2022, ImageNet: q = 65536/1281167, sigma = 1.3127, 1368 steps: eps ~ 10 (RDP).
    ku = A.GaussianSteps(1.3127, 65536 / 1281167, 1368)
    for entry, delta, published in ((de, 1e-5, 1.0), (ku, 1e-6, 10.0)):
        e_rdp = A.compute_epsilon(entry, delta, "rdp")
        e_pld = A.compute_epsilon(entry, delta, "pld")
        assert e_rdp == pytest.approx(published, rel=0.05)
        assert e_pld < e_rdp


@pytest.mark.parametrize(
    "accountant, target",
    [("rdp", 0.5), ("rdp", 3.0), ("rdp", 8.0), ("pld", 1.0)],
)
def test_calibration_round_trips(accountant, target):
    q, steps, delta = 256 / 60000, 500, 1e-5
    sigma = A.calibrate_noise_multiplier(target, delta, q, steps, accountant)
    eps = A.compute_epsilon(A.GaussianSteps(sigma, q, steps), delta, accountant)
    assert eps <= target
    assert eps >= 0.99 * target
    # the steps calibration inverts it
    t = A.calibrate_steps(sigma, target, delta, q, accountant)
    assert steps <= t
    assert A.compute_epsilon(A.GaussianSteps(sigma, q, t + 1), delta, accountant) > target


def test_extremes():
    assert math.isinf(A.compute_epsilon(A.GaussianSteps(0.0, 0.01, 10), 1e-5))
    assert math.isinf(A.compute_epsilon(A.GaussianSteps(0.0, 0.01, 10), 1e-5, "rdp"))
    tiny = A.compute_epsilon(A.GaussianSteps(1.0, 1e-7, 100), 1e-5)
    assert 0 <= tiny < 1e-3
    large = A.compute_epsilon(A.GaussianSteps(0.3, 0.5, 1000), 1e-5, "rdp")
    assert large > 100
    assert A.compute_epsilon(A.GaussianSteps(1.0, 0.1, 0), 1e-5) == 0.0


def test_truncated_poisson_accounting():
    n, q = 10000, 0.05
    loose = A.GaussianSteps(1.0, q, 100, dataset_size=n, max_batch_size=700)
    free = A.GaussianSteps(1.0, q, 100)
    # cap far above the mean: accounted as Poisson with delta reduced by the overflow
    assert loose.overflow() < 1e-12
    assert A.compute_epsilon(loose, 1e-5) == pytest.approx(A.compute_epsilon(free, 1e-5), rel=1e-3)
    # cap that binds: PLD accounts the truncated mechanism exactly, RDP refuses. A binding cap
    # costs privacy (an added example can displace another), so ignoring it would under-report.
    tight = A.GaussianSteps(1.0, q, 100, dataset_size=n, max_batch_size=490)
    assert tight.overflow() > 0.5
    acc = pld.PLDAccountant()
    acc.compose(dpa.TruncatedSubsampledGaussianDpEvent(n, q, 490, 1.0), 100)
    eps_tight = A.compute_epsilon(tight, 1e-5, "pld")
    assert eps_tight == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert eps_tight > A.compute_epsilon(free, 1e-5, "pld")
    with pytest.raises(ValueError, match="max_batch_size"):
        A.compute_epsilon(tight, 1e-5, "rdp")


def test_shuffle_is_accounted_without_replacement_replace_one_at_half_sigma():
    # Replace-one swaps one clipped gradient for another: sensitivity 2C for noise std sigma C,
    # so dp-accounting must see the multiplier sigma / 2 (the setting quoted in the audit).
    n, b, steps, delta = 60000, 256, 2340, 1e-5
    entry = A.GaussianSteps(1.0, b / n, steps, sampling="shuffle", dataset_size=n, max_batch_size=b)
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(n, b, dpa.GaussianDpEvent(0.5)), steps)
    expected = acc.get_epsilon(delta)
    assert A.compute_epsilon(entry, delta) == pytest.approx(expected)
    assert A.compute_epsilon(entry, delta, "rdp") == pytest.approx(expected)
    assert expected > 14  # with sigma itself it would be about 2.2
    with pytest.raises(ValueError, match="cannot compose"):
        A.compute_epsilon([entry, A.GaussianSteps(1.0, 0.01, 1)], 1e-5)


def test_shuffle_of_the_whole_dataset_is_half_sigma_too():
    # batch = N (q = 1): every step is a plain Gaussian of multiplier sigma / 2 under replace-one
    entry = A.GaussianSteps(1.0, 1.0, 3, sampling="shuffle", dataset_size=100, max_batch_size=100)
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.GaussianDpEvent(0.5), 3)
    assert A.compute_epsilon(entry, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))


def test_shuffle_calibration_accounts_half_sigma():
    n, b, steps, delta = 10000, 100, 300, 1e-5
    kw = {"sampling": "shuffle", "dataset_size": n, "max_batch_size": b}
    sigma = A.calibrate_noise_multiplier(2.0, delta, b / n, steps, "rdp", **kw)

    def eps(s):
        acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        acc.compose(dpa.SampledWithoutReplacementDpEvent(n, b, dpa.GaussianDpEvent(s / 2)), steps)
        return acc.get_epsilon(delta)

    assert eps(sigma) <= 2.0 < eps(sigma / 1.01)


def _overflow(entry, n):
    """eta on n examples, from scipy directly (not from the code under test)."""
    return entry.count * stats.binom.sf(entry.max_batch_size, n, entry.sampling_rate)


def _charge_holds(entry, delta, eps):
    """delta_M(eps) + eta + e^eps eta' <= delta for the untruncated PLD of ``entry``."""
    acc = pld.PLDAccountant()
    gauss = dpa.GaussianDpEvent(entry.noise_multiplier)
    acc.compose(dpa.PoissonSampledDpEvent(entry.sampling_rate, gauss), entry.count)
    eta, eta_n = _overflow(entry, entry.dataset_size), _overflow(entry, entry.dataset_size + 1)
    charge = eta + math.exp(eps) * eta_n
    return acc.get_delta(eps) + charge <= delta, charge


def test_truncation_charge_includes_the_e_eps_term_fmnist_cnn():
    # configs/fmnist_cnn.py: N 60000, batch 2048, 40 epochs (1172 steps), epsilon 3, delta 1e-5,
    # the cap of 1e-12 overflow per step: the charge is about 0.24% of delta (charged branch).
    n, q, steps, delta = 60000, 2048 / 60000, 1172, 1e-5
    entry = A.GaussianSteps(1.8086, q, steps, dataset_size=n, max_batch_size=2368)
    eps = A.compute_epsilon(entry, delta)
    ok, charge = _charge_holds(entry, delta, eps)
    assert ok, "epsilon must satisfy delta_M(eps) + eta + e^eps eta' <= delta"
    assert 0.002 * delta < charge <= 0.01 * delta
    rdp_eps = A.compute_epsilon(entry, delta, "rdp")
    assert rdp_eps >= eps and math.isfinite(rdp_eps)


def test_truncation_beyond_the_charge_is_accounted_exactly_imagenet_pod():
    # configs/imagenet_pod.py: N 1,281,167, batch 16384, 1564 steps, epsilon 8, delta 1e-6.
    # With a cap of 1e-12 overflow per step, e^8 eta' is about 4.7e-6 > delta: exact PLD.
    n, q, steps, delta, sigma = 1281167, 16384 / 1281167, 1564, 1e-6, 0.7058
    entry = A.GaussianSteps(sigma, q, steps, dataset_size=n, max_batch_size=17286)
    assert math.exp(8) * _overflow(entry, n + 1) > delta
    acc = pld.PLDAccountant()
    acc.compose(dpa.TruncatedSubsampledGaussianDpEvent(n, q, 17286, sigma), steps)
    assert A.compute_epsilon(entry, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    # The cap sized by overflow_probability_for keeps the charge within 1% of delta.
    from dpft.privacy import sampling

    cap = sampling.poisson_batch_cap(n, q, A.overflow_probability_for(8.0, delta, steps))
    sized = A.GaussianSteps(sigma, q, steps, dataset_size=n, max_batch_size=cap)
    eps = A.compute_epsilon(sized, delta)
    ok, charge = _charge_holds(sized, delta, eps)
    assert ok and charge <= 0.01 * delta
    assert (1 + math.exp(8)) * _overflow(sized, n + 1) <= 0.01 * delta * (1 + 1e-9)


def test_ledger_merges_serialises_and_composes():
    ledger = A.PrivacyLedger()
    e1 = A.GaussianSteps(1.0, 0.01)
    e2 = A.GaussianSteps(2.0, 1.0, sampling="full")
    for _ in range(30):
        ledger.record(e1)
    ledger.record(e2, 5)
    ledger.record(e1, 10)
    assert [e.count for e in ledger.entries] == [30, 5, 10]
    restored = A.PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored == ledger
    acc = pld.PLDAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.0)), 40)
    acc.compose(dpa.GaussianDpEvent(2.0), 5)
    assert restored.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)


def test_budget_refuses_the_step_that_would_exceed_the_target():
    budget = A.PrivacyBudget(1.0, 1e-5, "rdp")
    assert budget.remaining(A.GaussianSteps(1.0, 0.02)) == 0  # a single step already costs > 1
    entry = A.GaussianSteps(2.0, 0.02)
    allowed = budget.remaining(entry)
    assert allowed > 10
    for _ in range(allowed):
        budget.spend(entry)
    assert budget.epsilon() <= 1.0
    with pytest.raises(A.BudgetExceededError, match="exceed the target epsilon"):
        budget.spend(entry)
    assert budget.ledger.steps == allowed
    over = A.PrivacyLedger(budget.ledger.entries)
    over.record(entry)
    assert over.epsilon(1e-5, "rdp") > 1.0
    # a restored ledger continues against the same budget
    resumed = A.PrivacyBudget(1.0, 1e-5, "rdp", A.PrivacyLedger.from_dict(budget.ledger.to_dict()))
    assert resumed.remaining(entry) == 0


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dpft.privacy.accounting", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_epsilon_and_sigma():
    args = ["--sampling-rate", "0.08192", "--steps", "875", "--delta", "1e-5"]
    out = run_cli("epsilon", *args, "--noise-multiplier", "10", "--accountant", "rdp")
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(direct(0.08192, 10.0, 875, 1e-5, "rdp"), rel=1e-5)
    assert out.stderr == ""
    out = run_cli("sigma", *args, "--epsilon", "1.0")
    assert out.returncode == 0, out.stderr
    assert A.compute_epsilon(A.GaussianSteps(float(out.stdout), 0.08192, 875), 1e-5) <= 1.0
    out = run_cli("epsilon", *args, "--noise-multiplier", "0")
    assert out.returncode == 0 and out.stdout.startswith("inf")


@pytest.mark.parametrize(
    "args, name",
    [
        (["--sampling-rate", "1.5", "--noise-multiplier", "1"], "--sampling-rate"),
        (["--sampling-rate", "0", "--noise-multiplier", "1"], "--sampling-rate"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "-1"], "--noise-multiplier"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "1", "--delta", "1"], "--delta"),
    ],
)
def test_cli_bad_arguments_give_one_line_naming_the_argument(args, name):
    if "--delta" not in args:
        args = [*args, "--delta", "1e-5"]
    out = run_cli("epsilon", "--steps", "10", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0]
