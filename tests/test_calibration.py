"""Calibration metrics: hand-computed values, calibrated and over-confident extremes, streaming."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from dpft.metrics import (
    CalibrationAccumulator,
    bin_indices,
    calibration_metrics,
    reliability_diagram,
    reliability_diagrams,
)

# Five examples over K=3 classes, given as probabilities (logits are their logs).
HAND_PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # label 0: conf 0.90, correct, bin 13 = (13/15, 14/15]
        [0.92, 0.04, 0.04],  # label 1: conf 0.92, wrong,   bin 13
        [0.20, 0.50, 0.30],  # label 1: conf 0.50, correct, bin 7 = (7/15, 8/15]
        [0.65, 0.25, 0.10],  # label 2: conf 0.65, wrong,   bin 9 = (9/15, 10/15]
        [0.15, 0.10, 0.75],  # label 2: conf 0.75, correct, bin 11 = (11/15, 12/15]
    ]
)
HAND_LABELS = np.array([0, 1, 1, 2, 2])
# Bin 13: n=2, conf (0.90+0.92)/2 = 0.91, acc 1/2 -> gap 0.41
# Bin  7: n=1, conf 0.50, acc 1 -> gap 0.50
# Bin  9: n=1, conf 0.65, acc 0 -> gap 0.65
# Bin 11: n=1, conf 0.75, acc 1 -> gap 0.25
# ECE = (2*0.41 + 0.50 + 0.65 + 0.25) / 5 = 2.22 / 5 = 0.444;  MCE = 0.65;  accuracy = 3/5.
# NLL = -(ln 0.9 + ln 0.04 + ln 0.5 + ln 0.1 + ln 0.75) / 5
#     = (0.1053605 + 3.2188758 + 0.6931472 + 2.3025851 + 0.2876821) / 5 = 6.6076507 / 5
HAND_NLL = 1.3215301373


def test_hand_computed_example():
    # Adding a per-row constant to the logits must not change anything (softmax invariance).
    logits = np.log(HAND_PROBS) + np.array([[0.0], [3.0], [-7.0], [1.5], [40.0]])
    r = calibration_metrics(logits, HAND_LABELS)
    assert r.ece == pytest.approx(0.444, abs=1e-12)
    assert r.mce == pytest.approx(0.65, abs=1e-12)
    assert r.nll == pytest.approx(HAND_NLL, abs=1e-9)
    assert r.accuracy == pytest.approx(0.6, abs=1e-15)
    assert r.count == 5
    assert r.bin_edges.shape == (16,) and r.bin_edges[0] == 0.0 and r.bin_edges[-1] == 1.0
    expected_counts = np.zeros(15, np.int64)
    expected_counts[[7, 9, 11, 13]] = [1, 1, 1, 2]
    np.testing.assert_array_equal(r.bin_counts, expected_counts)
    np.testing.assert_allclose(r.bin_confidence[[7, 9, 11, 13]], [0.5, 0.65, 0.75, 0.91])
    np.testing.assert_array_equal(r.bin_accuracy[[7, 9, 11, 13]], [1.0, 0.0, 1.0, 0.5])
    assert np.isnan(r.bin_confidence[expected_counts == 0]).all()
    assert np.isnan(r.bin_accuracy[expected_counts == 0]).all()
    # float32 logits (and JAX arrays) give the same values up to float32 rounding of the input.
    r32 = calibration_metrics(jnp.asarray(logits, jnp.float32), jnp.asarray(HAND_LABELS))
    assert r32.ece == pytest.approx(0.444, abs=1e-5)
    assert r32.nll == pytest.approx(HAND_NLL, abs=1e-5)
    d = r.to_dict(prefix="eval/")
    assert set(d) == {"eval/ece", "eval/mce", "eval/nll", "eval/accuracy"}
    assert all(type(v) is float for v in d.values())
    assert json.loads(json.dumps(d))["eval/ece"] == pytest.approx(0.444)


def test_perfectly_calibrated_has_zero_ece_and_mce():
    # K=5: the top class has probability c, the other four (1-c)/4 each. For each c, exactly a
    # fraction c of its examples are correct (label 0), so accuracy == confidence in every bin.
    rows, labels = [], []
    for c in (0.3, 0.5, 0.7, 0.9):  # bins 4, 7, 10, 13
        n, n_correct = 200, round(200 * c)
        rows += [[c] + [(1 - c) / 4] * 4] * n
        labels += [0] * n_correct + [1 + i % 4 for i in range(n - n_correct)]
    perm = np.random.default_rng(0).permutation(len(labels))
    r = calibration_metrics(np.log(np.array(rows))[perm], np.array(labels)[perm])
    assert r.ece == pytest.approx(0.0, abs=1e-9)
    assert r.mce == pytest.approx(0.0, abs=1e-9)
    assert r.accuracy == pytest.approx(0.6, abs=1e-12)  # mean of 0.3, 0.5, 0.7, 0.9
    assert r.bin_counts.tolist() == [0] * 4 + [200, 0, 0, 200, 0, 0, 200, 0, 0, 200, 0]
    np.testing.assert_allclose(r.bin_accuracy[[4, 7, 10, 13]], [0.3, 0.5, 0.7, 0.9])


def test_maximally_overconfident():
    # Margin 100 over two other classes: confidence 1/(1 + 2e-100) == 1.0 in float64, always
    # wrong. NLL of the label = logsumexp(0, 100, 0) - 0 = 100 + log(1 + 2e-100) ~ 100.
    logits = np.zeros((64, 3), np.float32)
    logits[:, 1] = 100.0
    r = calibration_metrics(logits, np.zeros(64, np.int32))
    assert r.ece == pytest.approx(1.0, abs=1e-12)
    assert r.mce == pytest.approx(1.0, abs=1e-12)
    assert r.nll == pytest.approx(100.0, rel=1e-12)
    assert r.accuracy == 0.0
    assert r.bin_counts[-1] == 64 and r.bin_counts.sum() == 64


def _random_problem(n=203, k=7, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k)) * 3.0, rng.integers(0, k, size=n)


def _assert_same(a, b):
    for field in ("ece", "mce", "nll", "accuracy"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-12, abs=1e-15)
    assert a.count == b.count
    np.testing.assert_array_equal(a.bin_counts, b.bin_counts)
    np.testing.assert_allclose(a.bin_confidence, b.bin_confidence, rtol=1e-12)
    np.testing.assert_allclose(a.bin_accuracy, b.bin_accuracy, rtol=1e-12)


def test_streaming_with_padding_equals_one_shot():
    logits, labels = _random_problem()
    one_shot = calibration_metrics(logits, labels)
    acc, batch = CalibrationAccumulator(num_classes=7), 32
    for start in range(0, len(labels), batch):
        lg, lb = logits[start : start + batch], labels[start : start + batch]
        pad = batch - len(lb)
        # Padding rows carry garbage logits and an invalid label: the mask must hide both.
        lg = np.concatenate([lg, np.full((pad, 7), 1e3)])
        lb = np.concatenate([lb, np.full(pad, -1)])
        acc.update(lg, lb, mask=np.arange(batch) < batch - pad)
    streamed = acc.result()
    _assert_same(streamed, one_shot)
    assert streamed.count == 203
    # Merging accumulators over disjoint parts equals the whole.
    a = CalibrationAccumulator().update(logits[:50], labels[:50])
    b = CalibrationAccumulator().update(logits[50:], labels[50:])
    _assert_same(a.merge(b).result(), one_shot)
    with pytest.raises(ValueError, match="bins"):
        a.merge(CalibrationAccumulator(num_bins=10))
    with pytest.raises(ValueError, match="classes"):
        a.merge(CalibrationAccumulator(num_classes=3))


def test_bin_edge_convention():
    edges = np.linspace(0.0, 1.0, 16)
    # A confidence equal to an upper edge belongs to the bin below it; 0 goes to the first bin.
    assert bin_indices(edges, 15).tolist() == [0] + list(range(15))
    above = np.nextafter(edges[:-1], 2.0)
    assert bin_indices(above, 15).tolist() == list(range(15))
    # End to end with exact confidences and 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]:
    # uniform K=4 -> 0.25 -> bin 0; uniform K=2 -> 0.5 -> bin 1; K=1 -> 1.0 -> bin 3.
    assert math.exp(-math.log(4.0)) == 0.25 and math.exp(-math.log(2.0)) == 0.5
    counts = lambda logits, labels: calibration_metrics(logits, labels, num_bins=4).bin_counts
    assert counts(np.zeros((3, 4)), [0, 1, 2]).tolist() == [3, 0, 0, 0]
    assert counts(np.zeros((2, 2)), [0, 1]).tolist() == [0, 2, 0, 0]
    r = calibration_metrics(np.full((2, 1), 5.0), [0, 0], num_bins=4)
    assert r.bin_counts.tolist() == [0, 0, 0, 2] and r.ece == 0.0 and r.nll == 0.0


def test_invalid_inputs():
    with pytest.raises(ValueError, match="at least one"):
        calibration_metrics(np.zeros((0, 3)), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="at least one"):
        calibration_metrics(np.zeros((2, 3)), [0, 1], mask=[0, 0])
    with pytest.raises(ValueError, match=r"labels in \[0, 3\), got 3"):
        calibration_metrics(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match=r"labels in \[0, 3\), got -1"):
        calibration_metrics(np.zeros((2, 3)), [-1, 0])
    with pytest.raises(ValueError, match="shape"):
        calibration_metrics(np.zeros(3), [0, 1, 2])
    with pytest.raises(ValueError, match="3 classes"):
        CalibrationAccumulator(num_classes=3).update(np.zeros((1, 4)), [0])
    with pytest.raises(ValueError, match="nan"):
        calibration_metrics(np.array([[np.nan, 0.0]]), [0])


def test_reliability_diagram_writes_png(tmp_path):
    logits, labels = _random_problem()
    r = calibration_metrics(logits, labels)
    path = reliability_diagram(r, tmp_path / "a" / "b" / "rel.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    over = calibration_metrics(np.array([[0.0, 9.0]] * 4), [0] * 4)
    both = reliability_diagrams({"flat": r, "per-layer": over}, tmp_path / "cmp" / "both.png")
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        reliability_diagrams({}, tmp_path / "none.png")
