"""The feature-method CLI (`dpft.linear.cli`): workdir contract, rerun, one-line config errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dpft.linear import cli
from dpft.train import train_and_evaluate

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


@pytest.fixture
def fake_features(monkeypatch):
    """Generated features instead of the ResNet-20 backbone; counts the loads."""
    calls = []

    def load(config, workdir):
        calls.append(workdir)
        return blobs(3000), blobs(300, seed=1), 3

    monkeypatch.setattr(cli, "load_features", load)
    return calls


def config(method, **linear):
    c = fmnist_linear.get_config(method)
    c.tensorboard = False
    c.dp.delta = 1e-3
    for k, v in linear.items():
        setattr(c.linear, k, v)
    return c


@pytest.mark.parametrize("method", cli.METHODS)
def test_each_method_writes_the_contract(method, tmp_path, fake_features):
    summary = train_and_evaluate(config(method, steps=3), tmp_path)
    for name in ("config.json", "metrics.jsonl", "summary.json", "reliability.png"):
        assert (tmp_path / name).exists(), name
    assert SUMMARY_KEYS <= set(summary)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert 0.99 * 3.0 <= summary["epsilon"] <= 3.0 and summary["delta"] == 1e-3
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
