"""Fine-tuning modes: phase plans, the feature cache, and LP-FT on the pretrained ResNet-20.

The ResNet-20 runs share compiled programs through the ``compilation_cache`` fixture (the
backbone's feature extractor, the head on features, the FT phase of the crashed and the resumed
run), so each program is compiled once.
"""

import json

import numpy as np
import pytest
from conftest import crash_at_metrics, have_data, latest_checkpoint

from dpft.config import base_config
from dpft.privacy import accounting
from dpft.train import feature_store, train_and_evaluate
from dpft.train.phases import phase_index, plan_phases

pytestmark = pytest.mark.usefixtures("compilation_cache")
needs_data = pytest.mark.skipif(
    not have_data(
        "pretrained/resnet-cifar10/resnet20.safetensors",
        "fashion-mnist/train-images-idx3-ubyte.gz",
    ),
    reason="no data dir (set DPFT_DATA_DIR)",
)


def mode_config(mode, pretrained="resnet20", **finetune):
    c = base_config()
    c.model.pretrained = pretrained
    c.finetune.mode = mode
    for k, v in finetune.items():
        setattr(c.finetune, k, v)
    return c


def test_lp_ft_splits_the_steps():
    phases = plan_phases(mode_config("lp_ft", lp_fraction=0.25), 100)
    assert [(p.name, p.start, p.end, p.use_features) for p in phases] == [
        ("lp", 0, 25, True),
        ("ft", 25, 100, False),
    ]
    assert phases[0].trainable == (r"linear/.*",) and phases[1].trainable == (".*",)
    assert [p.name for p in plan_phases(mode_config("lp_ft", lp_fraction=0.0), 10)] == ["ft"]
    assert [p.name for p in plan_phases(mode_config("lp_ft", lp_fraction=1.0), 10)] == ["lp"]
    # a checkpoint at step s belongs to the phase that ran step s - 1
    assert [phase_index(phases, s) for s in (1, 25, 26, 100)] == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "mode, pretrained, finetune, match",
    [
        ("bogus", "resnet20", {}, "finetune.mode"),
        ("head", "", {}, "model.pretrained"),
        ("full", "", {}, "model.pretrained"),
        ("scratch", "resnet20", {}, "must be empty"),
        ("lp_ft", "resnet20", {"lp_fraction": 1.5}, "lp_fraction"),
    ],
)
def test_bad_modes_are_refused(mode, pretrained, finetune, match):
    with pytest.raises(ValueError, match=match):
        plan_phases(mode_config(mode, pretrained, **finetune), 10)


def resnet_config(mode, **finetune):
    c = base_config()
    c.name = "ft"
    c.tensorboard = False
    c.data.name = "fashion_mnist"
    c.data.train_subset = 96
    c.data.eval_subset = 48
    c.model.name = "resnet20"
    c.model.pretrained = "resnet20"
    c.finetune.mode = mode
    c.finetune.head_init = "zero"
    for k, v in finetune.items():
        setattr(c.finetune, k, v)
    c.dp.noise_multiplier = 1.0
    c.dp.delta = 1e-3
    c.train.batch_size = 8
    c.train.max_batch_size = 24
    c.train.steps = 4
    c.train.learning_rate = 0.5
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 1
    c.eval_batch_size = 48
    return c


head_params = latest_checkpoint


@needs_data
def test_head_on_cached_features_equals_head_on_images(tmp_path):
    cached = train_and_evaluate(resnet_config("head"), tmp_path / "cached")
    files = list((tmp_path / "cached" / "features").glob("features-*/manifest-p00000.json"))
    assert len(files) == 1
    for split, rows in (("train", 96), ("eval", 48)):
        assert np.asarray(feature_store.open_split(files[0].parent, split)).shape == (rows, 64)
    direct = train_and_evaluate(resnet_config("head", feature_cache=False), tmp_path / "direct")
    a, meta_a = head_params(tmp_path / "cached")
    b, _ = head_params(tmp_path / "direct")
    # same noise key, sampler and steps: the head trained on cached features is the same head.
    # Leaves: step, linear bias, linear kernel, privatizer key and count (then, for the run on
    # images, the frozen backbone).
    assert len(a) == 5 and meta_a["step"] == 4 and len(b) > 5
    for x, y in zip(a, b[:5], strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
    assert np.abs(a[2]).max() > 0  # the zero-initialised head moved
    assert cached["epsilon"] == direct["epsilon"]
    assert abs(cached["test_accuracy"] - direct["test_accuracy"]) <= 1 / 48 + 1e-9
    # a second run sharing the cache directory reuses the shards instead of recomputing them
    shard = files[0].parent / "train-p00000-00000.x.npy"
    mtime = files[0].stat().st_mtime_ns, shard.stat().st_mtime_ns
    c = resnet_config("head", cache_dir=str(tmp_path / "cached" / "features"))
    train_and_evaluate(c, tmp_path / "again")
    assert (files[0].stat().st_mtime_ns, shard.stat().st_mtime_ns) == mtime
    assert not (tmp_path / "again" / "features").exists()


@needs_data
def test_lp_ft_composes_both_phases_and_resumes_across_them(tmp_path):
    c = resnet_config("lp_ft", lp_fraction=0.5, lp_learning_rate=2.0)
    c.finetune.trainable = (r"layer3_2/.*", r"linear/.*")
    full = train_and_evaluate(c, tmp_path / "full")
    assert full["phases"] == {"lp": 2, "ft": 2} and full["steps"] == 4
    n = 96
    entry = accounting.GaussianSteps(1.0, 8 / n, 4, dataset_size=n, max_batch_size=24)
    assert full["epsilon"] == pytest.approx(accounting.compute_epsilon([entry], 1e-3), rel=1e-9)
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").open()]
    assert [r["phase"] for r in lines] == [0, 0, 1, 1]

    with crash_at_metrics(3):
        train_and_evaluate(c, tmp_path / "resumed")
    # the checkpoint at the phase boundary holds the LP phase's (head-only) state
    _, meta = head_params(tmp_path / "resumed")
    assert meta["step"] == 2 and meta["phase"] == 0
    resumed = train_and_evaluate(c, tmp_path / "resumed")
    a, meta_a = head_params(tmp_path / "full")
    b, meta_b = head_params(tmp_path / "resumed")
    assert meta_a["ledger"] == meta_b["ledger"] and meta_b["phase"] == 1
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert resumed["epsilon"] == full["epsilon"]
    assert resumed["test_accuracy"] == full["test_accuracy"]
