"""The feature-method driver (`dpft.linear.experiment`, run through `dpft.__main__`): workdir
contract, rerun, one-line config errors, secure keys and their resume."""

import json
import os
import pathlib
import secrets
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpft import linear
from dpft.__main__ import train_and_evaluate
from dpft.linear import experiment

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import fmnist_linear  # noqa: E402

SUMMARY_KEYS = {
    "test_accuracy",
    "epsilon",
    "delta",
    "steps",
    "wall_seconds",
    "test_ece",
    "test_mce",
    "test_loss",
}


def blobs(n, d=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n).astype(np.int32)
    centers = 1.5 * np.eye(k, d)  # norms ~1.5-2.5: the configs' feature clips barely bind
    return {"x": (centers[y] + 0.3 * rng.normal(size=(n, d))).astype(np.float32), "y": y}


N = 3000  # training examples of the generated data


@pytest.fixture
def fake_features(monkeypatch):
    """Generated features instead of the dataset and the ResNet-20 backbone; counts the loads."""
    calls = []

    def load_data(config):
        calls.append(config)
        train, evaluation = blobs(N, seed=config.seed), blobs(300, seed=1)
        return {"label": train["y"], "x": train["x"]}, {"label": evaluation["y"], **evaluation}, 3

    def load_features(config, workdir, data):
        train, evaluation, _ = data
        return {"x": train["x"], "y": train["label"]}, {"x": evaluation["x"], "y": evaluation["y"]}

    monkeypatch.setattr(experiment, "load_data", load_data)
    monkeypatch.setattr(experiment, "load_features", load_features)
    return calls


def config(method, **overrides):
    c = fmnist_linear.get_config(method)
    c.tensorboard = False
    c.dp.delta = 1e-4  # < 1/N
    for k, v in overrides.items():
        setattr(c.linear, k, v)
    return c


@pytest.mark.parametrize("method", experiment.METHODS)
def test_each_method_writes_the_contract(method, tmp_path, fake_features):
    summary = train_and_evaluate(config(method, steps=3), tmp_path)
    for name in ("config.json", "metrics.jsonl", "summary.json", "reliability.png"):
        assert (tmp_path / name).exists(), name
    assert SUMMARY_KEYS <= set(summary)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert 0.99 * 3.0 <= summary["epsilon"] <= 3.0 and summary["delta"] == 1e-4
    assert summary["test_accuracy"] > 0.6  # well-separated blobs, 3 classes (chance 1/3)
    assert 0 <= summary["test_ece"] <= summary["test_mce"] <= 1 and summary["test_loss"] > 0
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == summary["steps"]
    for k in ("epsilon", "test_accuracy", "test_ece", "test_mce", "test_loss"):
        assert record[k] == pytest.approx(summary[k])


def test_rerun_returns_the_summary_without_work(tmp_path, fake_features):
    first = train_and_evaluate(config("dp_least_squares"), tmp_path)
    again = train_and_evaluate(config("dp_least_squares"), tmp_path)
    assert again == first and len(fake_features) == 1
    with pytest.raises(ValueError, match="different config"):
        train_and_evaluate(config("dp_least_squares", reg=7.0), tmp_path)


def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, fake_features):
    with pytest.raises(ValueError, match=r"config\.linear\.optimizer must be"):
        train_and_evaluate(config("dp_gd", optimizer="rmsprop"), tmp_path / "x")
    with pytest.raises(ValueError, match=r"config\.linear \(dp_newton\): need reg > 0"):
        train_and_evaluate(config("dp_newton", reg=-1.0), tmp_path / "z")
    c = config("dp_fc")
    c.dp.noise_multiplier = 1.0
    with pytest.raises(ValueError, match=r"config\.dp\.noise_multiplier"):
        train_and_evaluate(c, tmp_path / "y")
    assert not (tmp_path / "y").exists()  # validated before the workdir is touched
    with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
        fmnist_linear.get_config("bogus")


def test_bad_method_on_the_command_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "dpft", "--config", str(ROOT / "configs/fmnist_linear.py:smoke")]
        + ["--workdir", str(tmp_path / "w"), "--config.linear.method=bogus"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: config.linear.method must be one of")
    assert "'bogus'" in lines[-1] and not (tmp_path / "w").exists()


def test_delta_of_1_over_n_or_more_is_refused_before_the_workdir_is_touched(
    tmp_path, fake_features
):
    c = config("dp_least_squares")
    c.dp.delta = 2 / N
    with pytest.raises(ValueError, match=r"config\.dp\.delta must be in \(0, 1/N") as e:
        train_and_evaluate(c, tmp_path / "w")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


def test_secure_root_key_fills_both_words_and_reproducible_mode_keeps_the_seed(tmp_path):
    c = config("dp_gd")
    c.dp.secure_noise = True
    roots = np.stack([np.asarray(experiment.run_key(c, tmp_path / str(i))) for i in range(4)])
    assert roots.dtype == np.uint32 and roots.shape == (4, 2)
    assert len(set(roots[:, 0])) == 4 and len(set(roots[:, 1])) == 4  # 64 bits of entropy
    for i in range(4):  # saved, and read back by a rerun in the same workdir
        assert (tmp_path / str(i) / experiment.SECRET).stat().st_mode & 0o777 == 0o600
        np.testing.assert_array_equal(experiment.run_key(c, tmp_path / str(i)), roots[i])
    c.dp.secure_noise = False
    np.testing.assert_array_equal(experiment.run_key(c, tmp_path / "r"), jax.random.PRNGKey(c.seed))
    assert not (tmp_path / "r").exists()


@pytest.fixture
def method_keys(monkeypatch):
    """The keys the CLI hands to `dpft.linear.dp_least_squares`, in call order."""
    seen = []
    real = linear.dp_least_squares

    def recording(*args, key, **kwargs):
        seen.append(np.asarray(jax.random.key_data(key) if key.dtype != np.uint32 else key))
        return real(*args, key=key, **kwargs)

    monkeypatch.setattr(linear, "dp_least_squares", recording)
    return seen


def test_secure_noise_depends_on_all_64_bits_of_the_secret(
    tmp_path, fake_features, method_keys, monkeypatch
):
    # two secrets that differ only above bit 32 must give different noise
    drawn = iter([(1 << 40) + 5, (1 << 41) + 5])
    monkeypatch.setattr(secrets, "randbits", lambda bits: next(drawn) & ((1 << bits) - 1))
    c = config("dp_least_squares")
    c.dp.secure_noise = True
    train_and_evaluate(c, tmp_path / "a")
    train_and_evaluate(c, tmp_path / "b")
    assert len(method_keys) == 2 and not np.array_equal(method_keys[0], method_keys[1])


def test_secure_run_killed_after_its_metrics_reruns_with_the_same_noise(
    tmp_path, fake_features, method_keys, monkeypatch
):
    c = config("dp_least_squares")
    c.dp.secure_noise = True
    fitted = []
    from dpft.train import report

    real_fit, real_plot = experiment.fit, report.plot_curves

    def recording_fit(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        fitted.append(np.asarray(out[0].weights))
        return out

    def killed(*args, **kwargs):  # after metrics.jsonl, before summary.json
        raise RuntimeError("killed")

    monkeypatch.setattr(experiment, "fit", recording_fit)
    monkeypatch.setattr(report, "plot_curves", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train_and_evaluate(c, tmp_path)
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "summary.json").exists()
    monkeypatch.setattr(report, "plot_curves", real_plot)
    summary = train_and_evaluate(c, tmp_path)
    assert len(fitted) == 2
    np.testing.assert_array_equal(fitted[1], fitted[0])  # the same release, not a second one
    np.testing.assert_array_equal(method_keys[1], method_keys[0])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    # a fresh secure run draws other noise; the secret is nowhere but in its file
    train_and_evaluate(c, tmp_path / "other")
    assert not np.array_equal(fitted[2], fitted[0])
    secret = str(json.loads((tmp_path / experiment.SECRET).read_text())["secure_seed"])
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert secret not in (tmp_path / name).read_text(), name
    assert secret not in json.dumps(summary)


def test_outputs_hold_no_unnoised_training_statistics_outside_debug(tmp_path, fake_features):
    """Outside debug/, metrics and summary hold DP outputs (epsilon, metrics of the noisy head
    on the eval data), the config's public choices and data-independent facts of the plan."""
    public = {"epsilon", "test_accuracy", "test_loss", "test_ece", "test_mce"}
    plan = {"delta", "target_epsilon", "method", "eval_data", "accountant", "releases", "steps"}
    sizes = {"num_train_examples", "feature_dim", "fit_seconds", "wall_seconds"}  # N public
    out = []
    for seed in (0, 1):  # two training sets of the same size
        c = config("dp_newton", steps=2)
        c.seed = seed
        summary = train_and_evaluate(c, tmp_path / str(seed))
        (record,) = [json.loads(x) for x in (tmp_path / str(seed) / "metrics.jsonl").open()]
        assert {k for k in record if not k.startswith("debug/")} == public | {"step"}
        assert set(summary) == public | plan | sizes
        out.append(summary)
    for k in plan | {"epsilon", "num_train_examples", "feature_dim"}:
        assert out[0][k] == out[1][k], k  # does not depend on the training data
