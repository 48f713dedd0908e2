"""Federated LP-FT (``finetune.mode='lp_ft'``): one budget over both phases, the FT phase from
the LP phase's head, lp_fraction 1 == head, resume in either phase.

A tiny "pretrained" model (one Dense backbone with ``features`` and a zero head ``linear``)
stands in for the ResNet-20 so that every run compiles in seconds; the data, the feature cache,
the phases and the federated runner are the real ones. The runs share their compiled programs
(the same phases at another lp_fraction, a crashed and resumed run) through the
``compilation_cache`` fixture.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import crash_at_metrics

from tests.test_federated import checkpoint_arrays, fed_smoke, needs_data

pytestmark = pytest.mark.usefixtures("compilation_cache")


class TinyPretrained(nn.Module):
    num_classes: int = 10

    def setup(self):
        self.body = nn.Dense(8)
        self.linear = nn.Dense(self.num_classes)

    def features(self, x):
        return jnp.tanh(self.body(x.reshape((x.shape[0], -1))))

    def __call__(self, x):
        return self.linear(self.features(x))


BUILT: dict = {}  # the last "pretrained" parameters built


@functools.lru_cache(maxsize=2)
def _tiny(num_classes, shape):
    model = TinyPretrained(num_classes)
    variables = jax.jit(model.init)(jax.random.PRNGKey(123), jnp.zeros((1, *shape)))
    params = jax.device_get(dict(variables["params"]))
    params["linear"] = jax.tree_util.tree_map(np.zeros_like, params["linear"])
    return model, params


def tiny_build_model(config, num_classes, example_image):
    """A fixed "pretrained" backbone (same weights every call) with a zero head."""
    model, params = _tiny(num_classes, tuple(np.shape(example_image)))
    BUILT["params"] = params
    return model, {"params": jax.tree_util.tree_map(np.copy, params)}


@pytest.fixture
def tiny(monkeypatch):
    from dpft.train import build

    monkeypatch.setattr(build, "build_model", tiny_build_model)


def lp_ft_config(mode="lp_ft", lp_fraction=0.5, **federated):
    c = fed_smoke(f"{mode},smoke", **federated)
    c.model.name = "resnet20"  # only for the config checks: build_model is the tiny one
    c.federated.local_lr = 0.5
    c.federated.local_rate = 1.0  # full local batches: RDP accounting in closed form (fast)
    c.finetune.lp_fraction = lp_fraction
    c.finetune.lp_learning_rate = 0.5  # = local_lr: the LP phase is the head run
    return c


def metrics(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


_RUNS: dict = {}


def uninterrupted(tmp_path_factory, lp_fraction):
    """The uninterrupted lp_ft run at ``lp_fraction`` (shared by the tests of this module)."""
    from dpft.__main__ import train_and_evaluate

    if lp_fraction not in _RUNS:
        workdir = tmp_path_factory.mktemp(f"lp_ft_{lp_fraction}")
        _RUNS[lp_fraction] = (
            train_and_evaluate(lp_ft_config(lp_fraction=lp_fraction), workdir),
            workdir,
        )
    return _RUNS[lp_fraction]


def mode_run(tmp_path_factory, mode):
    """The one-phase ``mode`` run of the same rounds (shared by the tests of this module)."""
    from dpft.__main__ import train_and_evaluate

    if mode not in _RUNS:
        workdir = tmp_path_factory.mktemp(mode)
        _RUNS[mode] = (train_and_evaluate(lp_ft_config(mode), workdir), workdir)
    return _RUNS[mode]


@needs_data
def test_lp_ft_one_budget_and_ft_starts_from_lp_head(tmp_path_factory, tiny, monkeypatch):
    from dpft.federated import runner

    starts = []
    original = runner.run

    def spy(config, loss_fn, params, frozen, *args, **kwargs):
        result = original(config, loss_fn, params, frozen, *args, **kwargs)
        starts.append((kwargs["start_round"], dict(params), dict(frozen), result))
        return result

    monkeypatch.setattr(runner, "run", spy)
    _RUNS.pop(0.5, None)
    summary, workdir = uninterrupted(tmp_path_factory, 0.5)
    monkeypatch.setattr(runner, "run", original)
    assert summary["lp_rounds"] == 2 and summary["rounds"] == summary["steps"] == 4
    assert summary["finetune_mode"] == "lp_ft" and summary["ledger_steps"] == 4 * 2
    assert 0 < summary["epsilon"] <= lp_ft_config().dp.epsilon
    # one budget: the same noise and the same per-round entry as a one-phase run of 4 rounds
    head, _ = mode_run(tmp_path_factory, "head")
    assert head["lp_rounds"] == 0 and head["rounds"] == 4
    assert summary["epsilon"] == head["epsilon"]
    assert summary["noise_multiplier"] == head["noise_multiplier"]
    lines = metrics(workdir)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r["phase"] for r in lines] == [0, 0, 1, 1]
    eps = [r["epsilon"] for r in lines]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(summary["epsilon"])
    assert "test_accuracy" in lines[1] and "test_accuracy" in lines[3]
    # the FT phase (global rounds 2..4) starts from the pretrained backbone and the LP head
    (lp_start, lp_params, _, lp_result), (ft_start, ft_params, ft_frozen, _) = starts
    assert (lp_start, ft_start) == (0, 2) and set(lp_params) == {
        "params/linear/kernel",
        "params/linear/bias",
    }
    pretrained = BUILT
    assert set(ft_params) == {
        f"params/{k}/{w}" for k in ("body", "linear") for w in ("kernel", "bias")
    }
    assert not ft_frozen
    for k, v in lp_result.params.items():
        assert np.abs(np.asarray(v)).max() > 0  # the zero head moved in LP
        np.testing.assert_array_equal(np.asarray(ft_params[k]), np.asarray(v))
    for w in ("kernel", "bias"):
        np.testing.assert_array_equal(
            ft_params[f"params/body/{w}"], pretrained["params"]["body"][w]
        )
    assert (workdir / "lp" / "checkpoints" / "2").exists()
    assert checkpoint_arrays(workdir / "ft")[1]["round"] == 4


@needs_data
# (0.0, "full") holds as well (checked when this was written) but costs two more runs of CI time.
@pytest.mark.parametrize("lp_fraction, mode", [(1.0, "head")])
def test_lp_fraction_one_is_head_and_zero_is_full(
    tmp_path, tmp_path_factory, tiny, lp_fraction, mode
):
    from dpft.__main__ import train_and_evaluate

    phase = "lp" if lp_fraction == 1.0 else "ft"
    a = train_and_evaluate(lp_ft_config(lp_fraction=lp_fraction), tmp_path / "lp_ft")
    b, b_dir = mode_run(tmp_path_factory, mode)
    assert a["lp_rounds"] == (4 if mode == "head" else 0)
    arrays_a, meta_a = checkpoint_arrays(tmp_path / "lp_ft" / phase)
    arrays_b, meta_b = checkpoint_arrays(b_dir)
    assert meta_a["round"] == meta_b["round"] == 4 and meta_a["ledger"] == meta_b["ledger"]
    assert len(arrays_a) == len(arrays_b)
    for x, y in zip(arrays_a, arrays_b, strict=True):
        np.testing.assert_array_equal(x, y)
    for key in ("epsilon", "test_accuracy", "test_loss", "noise_multiplier"):
        assert a[key] == b[key], key
    assert [r["step"] for r in metrics(tmp_path / "lp_ft")] == [1, 2, 3, 4]


@needs_data
@pytest.mark.parametrize("lp_fraction", [0.5, 0.25])  # crash after LP / in the middle of FT
def test_resume_after_lp_or_mid_ft_equals_uninterrupted(
    tmp_path, tmp_path_factory, tiny, monkeypatch, lp_fraction
):
    from dpft.__main__ import train_and_evaluate
    from dpft.train import report

    full, full_dir = uninterrupted(tmp_path_factory, lp_fraction)
    c = lp_ft_config(lp_fraction=lp_fraction)  # checkpoints every 2 rounds and at LP's end
    with crash_at_metrics(3):
        train_and_evaluate(c, tmp_path / "resumed")
    lp_rounds = round(lp_fraction * 4)
    assert checkpoint_arrays(tmp_path / "resumed" / "lp")[1]["round"] == lp_rounds
    ft_ckpt = tmp_path / "resumed" / "ft" / "checkpoints"
    assert sorted(p.name for p in ft_ckpt.iterdir()) == ([] if lp_rounds == 2 else ["2"])

    original = report.MetricsWriter.write
    written = []

    def record(self, step, rec):
        written.append(step)
        return original(self, step, rec)

    monkeypatch.setattr(report.MetricsWriter, "write", record)
    resumed = train_and_evaluate(c, tmp_path / "resumed")
    assert written == [3, 4]  # the LP phase is not redone
    for phase in ("lp", "ft"):
        a, meta_a = checkpoint_arrays(full_dir / phase)
        b, meta_b = checkpoint_arrays(tmp_path / "resumed" / phase)
        assert meta_a["ledger"] == meta_b["ledger"] and meta_a["round"] == meta_b["round"]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    assert resumed["epsilon"] == full["epsilon"] and resumed["lp_rounds"] == lp_rounds
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert metrics(tmp_path / "resumed") == metrics(full_dir)  # rounds 1..4, each once
