"""Hyperparameter tuning: the accounting of `dpft.privacy.tuning` (against dp-accounting, its
monotonicity and limits, the distribution of K) and the `dpft.tune` command line (records,
total epsilon, resume, one-line errors)."""

import json
import math
import pathlib
import random

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import dp_event as dp_event_lib
from dp_accounting import pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import stats
from test_linear_cli import fake_features  # noqa: F401 (the generated-features fixture)

from dpft import tune
from dpft.privacy import accounting, tuning
from dpft.privacy.accounting import GaussianSteps

ROOT = pathlib.Path(__file__).resolve().parent.parent
DELTA = 1e-5
STEPS = [GaussianSteps(1.0, 0.01, 1000)]  # uncapped Poisson DP-SGD: about eps 2.1 (RDP)
POISSON = tuning.Repetitions("poisson", mu=3.0)
TNB = tuning.Repetitions("tnb", eta=0.5, gamma=0.2)
TNB_MEAN = tuning.Repetitions("tnb", eta=0.5, gamma=0.4).mean  # the CLI tests' distribution


def direct(event, reps, delta=DELTA):
    """dp-accounting's RDP epsilon of the repeated event, built here without dpft."""
    acc = rdp.RdpAccountant()
    acc.compose(dp_event_lib.RepeatAndSelectDpEvent(event, reps.mean, reps.shape))
    return acc.get_epsilon(delta)


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("reps", [POISSON, TNB, tuning.Repetitions("geometric", gamma=0.25)])
def test_total_equals_dp_accounting(reps):
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.0)), 1000)
    assert tuning.total_epsilon(event, reps, DELTA) == direct(event, reps)
    assert tuning.ledger_total_epsilon(STEPS, reps, DELTA) == direct(event, reps)
    sigmas = [5.0] * 10
    assert tuning.release_total_epsilon(sigmas, reps, DELTA) == direct(
        dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(5.0), 10), reps
    )


def test_capped_batches_are_charged_and_close():
    """A capped (truncating) Poisson batch costs a little more, by E[K] times its charge."""
    capped = [GaussianSteps(1.0, 0.01, 1000, dataset_size=10_000, max_batch_size=180)]
    assert 0 < capped[0].overflow(1) * TNB.mean < 0.01 * DELTA
    free = tuning.ledger_total_epsilon(STEPS, TNB, DELTA)
    charged = tuning.ledger_total_epsilon(capped, TNB, DELTA)
    assert free < charged < free * (1 + 1e-4)
    tight = [GaussianSteps(1.0, 0.01, 1000, dataset_size=10_000, max_batch_size=170)]
    with pytest.raises(ValueError, match="truncates too often"):
        tuning.ledger_total_epsilon(tight, TNB, DELTA)


def test_pld_has_no_rule_for_repeated_selection():
    """Why the total is RDP-based: dp-accounting's PLD accountant refuses the event."""
    event = tuning.repeated_event(accounting.dp_event(STEPS), POISSON)
    assert not pld.PLDAccountant().supports(event)
    assert rdp.RdpAccountant().supports(event)


def test_total_grows_with_the_mean_and_exceeds_the_base():
    base = accounting.compute_epsilon(STEPS, DELTA, "rdp")
    poisson = [
        tuning.ledger_total_epsilon(STEPS, tuning.Repetitions("poisson", mu=m), DELTA)
        for m in (1, 2, 5, 10, 50)
    ]
    assert all(a < b for a, b in zip(poisson, poisson[1:], strict=False))
    assert poisson[0] > base
    for eta in (0.0, 0.5, 1.0, 3.0):
        gammas = (0.99, 0.5, 0.1, 0.01) if eta == 0 else (1.0, 0.99, 0.5, 0.1, 0.01)
        named = {0.0: "logarithmic", 1.0: "geometric"}.get(eta)
        reps = [
            tuning.Repetitions(named, gamma=g)
            if named
            else tuning.Repetitions("tnb", eta=eta, gamma=g)
            for g in gammas
        ]
        means = [r.mean for r in reps]
        eps = [tuning.ledger_total_epsilon(STEPS, r, DELTA) for r in reps]
        assert all(a < b for a, b in zip(means, means[1:], strict=False))
        assert all(a < b for a, b in zip(eps, eps[1:], strict=False)), (eta, eps)
        assert eps[0] > base


def test_mean_one_limit_approaches_the_base():
    """gamma -> 1 (K = 1 almost surely): the total tends to the base's RDP epsilon; the slack
    left is (1 + eta) times the base's smallest RDP term, which shrinks with eta."""
    base = accounting.compute_epsilon(STEPS, DELTA, "rdp")
    gaps = []
    for eta in (2.0, 0.5, 0.05):
        total = tuning.ledger_total_epsilon(
            STEPS, tuning.Repetitions("tnb", eta=eta, gamma=1.0), DELTA
        )
        gaps.append(total - base)
    assert all(g > 0 for g in gaps)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.01 * base
    assert tuning.draw_repetitions(tuning.Repetitions("tnb", eta=0.5, gamma=1.0)) == 1


@pytest.mark.parametrize("reps", [POISSON, TNB, tuning.Repetitions("logarithmic", gamma=0.1)])
def test_pmf_and_mean(reps):
    ks = range(0, 3000)
    p = np.array([reps.pmf(k) for k in ks])
    assert abs(p.sum() - 1) < 1e-9
    assert abs((p * np.arange(len(p))).sum() - reps.mean) < 1e-7
    if reps.distribution == "poisson":
        np.testing.assert_allclose(p[:40], stats.poisson.pmf(np.arange(40), reps.mu), rtol=1e-9)
    else:  # dp-accounting's own mean, and its gamma from the mean: never above ours
        assert math.isclose(
            rdp_lib._truncated_negative_binomial_mean(reps.gamma, reps.eta),
            reps.mean,
            rel_tol=1e-12,
        )
        gamma = rdp_lib._gamma_truncated_negative_binomial(reps.eta, reps.mean)
        assert reps.gamma * (1 - 1e-8) <= gamma <= reps.gamma


def _chi2_pvalue(samples, reps):
    """Pearson's test of the samples against the pmf (tail lumped into the last cell)."""
    lo = 0 if reps.distribution == "poisson" else 1
    hi = max(k for k in range(lo, 200) if reps.pmf(k) * len(samples) >= 5)
    counts = np.bincount(np.minimum(samples, hi + 1) - lo, minlength=hi + 2 - lo)
    probs = np.array([reps.pmf(k) for k in range(lo, hi + 1)])
    probs = np.append(probs, 1 - probs.sum())
    return stats.chisquare(counts, probs * len(samples)).pvalue


@pytest.mark.parametrize("reps", [POISSON, TNB])
def test_draws_follow_the_distribution(reps):
    rng = random.Random(1234)
    samples = np.array([tuning.draw_repetitions(reps, rng) for _ in range(20_000)])
    assert _chi2_pvalue(samples, reps) > 1e-3
    assert abs(samples.mean() - reps.mean) < 5 * samples.std() / math.sqrt(len(samples))
    # the test has power: the same draws reject a nearby distribution
    other = (
        tuning.Repetitions("poisson", mu=3.3)
        if reps.distribution == "poisson"
        else tuning.Repetitions("tnb", eta=0.5, gamma=0.23)
    )
    assert _chi2_pvalue(samples, other) < 1e-6


def test_secure_draws():
    """Without an rng the draws come from the OS CSPRNG: in the support, right mean."""
    samples = np.array([tuning.draw_repetitions(POISSON) for _ in range(4000)])
    assert samples.min() >= 0
    assert abs(samples.mean() - 3.0) < 6 * math.sqrt(3.0 / len(samples))
    assert len({tuning.draw_index(1000) for _ in range(50)}) > 40
    assert all(tuning.draw_repetitions(TNB) >= 1 for _ in range(200))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("poisson:4", tuning.Repetitions("poisson", mu=4.0)),
        ("tnb:0.5,0.1", tuning.Repetitions("tnb", eta=0.5, gamma=0.1)),
        ("geometric:0.2", tuning.Repetitions("geometric", gamma=0.2)),
    ],
)
def test_parse_repetitions(text, expected):
    assert tuning.parse_repetitions(text) == expected


@pytest.mark.parametrize("text", ["poisson", "poisson:0.5", "tnb:1", "tnb:-1,0.5", "zipf:2"])
def test_parse_repetitions_refuses(text):
    with pytest.raises(ValueError):
        tuning.parse_repetitions(text)


@pytest.mark.parametrize(
    "obj",
    [
        tuning.total_epsilon,
        tuning.ledger_total_epsilon,
        tuning.release_total_epsilon,
        tuning.release_rdp_epsilon,
        tuning.repeated_event,
        tuning.draw_repetitions,
        tuning.draw_index,
    ],
    ids=lambda o: o.__name__,
)
def test_public_dp_functions_have_privacy_section(obj):
    section = (obj.__doc__ or "").partition("Privacy:")[2]
    assert any(w in section for w in ("neighbour", "neighboring", "sensitivity", "independen"))


# --------------------------------------------------------------------------- command line


@pytest.fixture
def calls(monkeypatch):
    """The candidate runs `dpft.tune` starts (their workdirs), K fixed to 2."""
    started = []
    real = tune.train_and_evaluate

    def run(config, workdir):
        started.append(pathlib.Path(workdir).name)
        return real(config, workdir)

    monkeypatch.setattr(tune, "train_and_evaluate", run)
    monkeypatch.setattr(tuning, "draw_repetitions", lambda reps, rng=None: 2)
    return started


def argv(workdir, *extra, grid="linear.learning_rate=0.01,0.1,1"):
    return [
        "--config",
        str(ROOT / "configs" / "fmnist_linear.py") + ":dp_gd,smoke",
        "--workdir",
        str(workdir),
        "--grid",
        grid,
        "--repetitions",
        "tnb:0.5,0.4",
        "--config.data.validation_fraction=0.1",
        "--config.linear.steps=5",
        "--config.tensorboard=False",
        *extra,
    ]


@pytest.mark.usefixtures("fake_features")
def test_tune_cli_records_total_and_resumes(tmp_path, calls, monkeypatch, capsys):
    workdir = tmp_path / "tune"
    real = tune.train_and_evaluate

    def crash_on_second(config, wd):
        if len(calls) == 1:
            raise RuntimeError("interrupted")
        return real(config, wd)

    monkeypatch.setattr(tune, "train_and_evaluate", crash_on_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        tune.main(argv(workdir))
    assert calls == ["000"] and not (workdir / "tuning.json").exists()
    assert (workdir / "candidates" / "000" / "summary.json").exists()

    monkeypatch.setattr(tune, "train_and_evaluate", real)  # `real` still counts the runs
    assert tune.main(argv(workdir)) == 0
    assert calls == ["000", "001"]  # the finished 000 is skipped, K read back
    assert "epsilon_total=" in capsys.readouterr().out

    record = json.loads((workdir / "tuning.json").read_text())
    released = json.loads((workdir / "summary.json").read_text())
    state = json.loads((workdir / tune.STATE).read_text())
    assert record["k"] == 2 == len(record["candidates"]) == len(state["candidates"])
    assert record["repetitions"] == {
        "distribution": "tnb",
        "mean": TNB_MEAN,
        "eta": 0.5,
        "gamma": 0.4,
    }
    assert record["pool_size"] == 3
    cands = [
        json.loads((workdir / "candidates" / f"00{i}" / "summary.json").read_text()) for i in (0, 1)
    ]
    for c, hp in zip(cands, state["candidates"], strict=True):
        assert c["target_epsilon"] == 3.0 and c["delta"] == 1e-4
        assert c["eval_data"].startswith("validation")
        assert json.loads((workdir / "candidates" / "000" / "config.json").read_text())["dp"][
            "secure_noise"
        ]
        assert hp["linear.learning_rate"] in (0.01, 0.1, 1.0)
    per = record["epsilon_per_candidate"]
    assert per == cands[0]["epsilon"] and per <= 3.0
    sigmas = [r["noise_multiplier"] for r in cands[0]["releases"]]
    reps = tuning.Repetitions("tnb", eta=0.5, gamma=0.4)
    event = dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigmas[0]), 5)])
    assert len(sigmas) == 5 and len(set(sigmas)) == 1
    assert record["epsilon_total"] == pytest.approx(direct(event, reps, 1e-4), rel=1e-12)
    assert record["epsilon_total"] > record["epsilon_per_candidate_rdp"] > per
    best = max(range(2), key=lambda i: cands[i]["test_accuracy"])
    assert record["best"] == best
    assert released["hyperparameters"] == state["candidates"][best]
    assert released["validation_accuracy"] == cands[best]["test_accuracy"]
    assert released["epsilon"] == record["epsilon_total"] and released["epsilon_includes_tuning"]
    assert "k" not in released and "candidates" not in released
    assert not any(k.startswith("test_") for k in released)

    before = (workdir / "candidates" / "000" / "summary.json").stat().st_mtime_ns
    assert tune.main(argv(workdir)) == 0  # finished: nothing reruns, same record
    assert calls == ["000", "001"]
    assert json.loads((workdir / "tuning.json").read_text()) == record
    assert (workdir / "candidates" / "000" / "summary.json").stat().st_mtime_ns == before

    assert tune.main(argv(workdir, grid="linear.learning_rate=0.01,0.1")) == 2
    assert "other arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    "grid,extra,needle",
    [
        ("linear.learnin_rate=1,2", (), "'linear.learnin_rate'"),
        ("linear.learning_rate", (), "KEY=V1,V2"),
        ("linear.learning_rate=1,abc", (), "'linear.learning_rate' expects a float"),
        ("dp.epsilon=1,3", (), "'dp.epsilon'"),
        ("linear.steps=5,10", (), "'linear.steps'"),
        ("linear.learning_rate=1", ("--config.data.validation_fraction=0",), "validation_fraction"),
        ("linear.learning_rate=1", ("--metric", "test_accuracy"), "--metric"),
        ("linear.learning_rate=1", ("--repetitions", "poisson:0.5"), "mu >= 1"),
        ("linear.learning_rate=1", ("--config.linear.bogus=1",), "'linear.bogus'"),
    ],
)
def test_bad_input_one_line(tmp_path, calls, capsys, grid, extra, needle):
    workdir = tmp_path / "tune"
    assert tune.main([*argv(workdir, grid=grid), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert calls == [] and not workdir.exists()
