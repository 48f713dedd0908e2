"""Calibration of classifiers: expected/maximum calibration error, NLL, reliability diagrams.

Definitions follow Guo et al. (2017), "On Calibration of Modern Neural Networks"; DP-SGD's
effect on calibration (and how the clipping mode changes it) is studied by Bu et al. (2023),
"On the convergence and calibration of deep learning with differential privacy". For each
example, the confidence is the maximum softmax probability and the prediction its argmax.
Confidences fall into ``num_bins`` equal-width bins on [0, 1]; bins are half-open ``(lo, hi]``
(a confidence equal to a bin's upper edge belongs to that bin) and the first bin also holds 0.
With ``n_b`` examples, accuracy ``acc_b`` and mean confidence ``conf_b`` in bin ``b``::

    ECE = sum_b (n_b / n) |acc_b - conf_b|        MCE = max_{b: n_b > 0} |acc_b - conf_b|

Privacy: these metrics are meant for the (public) evaluation split. Computed on private
training data they are NOT differentially private: log them only under a ``debug/`` prefix,
never as part of a released result.

Everything runs on the host in numpy (float64); logits may be numpy or JAX arrays.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping

import numpy as np


def bin_indices(confidence, num_bins: int) -> np.ndarray:
    """Bin of each confidence in ``[0, 1]``: bins are ``(lo, hi]``, the first one includes 0."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    idx = np.searchsorted(edges, np.asarray(confidence, np.float64), side="left") - 1
    return np.clip(idx, 0, num_bins - 1)


@dataclasses.dataclass(frozen=True, eq=False)
class CalibrationResult:
    """Calibration summary. Per-bin means are nan for empty bins."""

    ece: float
    mce: float
    nll: float  # mean negative log-likelihood of the label, in nats
    accuracy: float
    count: int
    bin_edges: np.ndarray  # [num_bins + 1]
    bin_counts: np.ndarray  # [num_bins], int64
    bin_confidence: np.ndarray  # [num_bins], mean confidence
    bin_accuracy: np.ndarray  # [num_bins]

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Scalar metrics as python floats, e.g. ``prefix="eval/"`` for metrics.jsonl."""
        keys = ("ece", "mce", "nll", "accuracy")
        return {f"{prefix}{k}": float(getattr(self, k)) for k in keys}


class CalibrationAccumulator:
    """Streaming calibration statistics over batches (sums only, so batches can be merged).

    Args:
      num_classes: expected ``K``; inferred from the first batch when None.
      num_bins: number of equal-width confidence bins on [0, 1].
    """

    def __init__(self, num_classes: int | None = None, num_bins: int = 15):
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_classes = num_classes
        self.num_bins = num_bins
        self.bin_counts = np.zeros(num_bins, np.int64)
        self.bin_conf_sum = np.zeros(num_bins, np.float64)
        self.bin_correct_sum = np.zeros(num_bins, np.float64)
        self.nll_sum = 0.0
        self.count = 0

    def update(self, logits, labels, mask=None) -> CalibrationAccumulator:
        """Adds a batch: ``logits [B, K]``, integer ``labels [B]``, optional ``mask [B]``.

        Rows whose mask is 0 are padding: ignored, their labels are not checked.
        """
        logits = np.asarray(logits).astype(np.float64)
        labels = np.asarray(labels)
        if logits.ndim != 2 or logits.shape[1] < 1:
            raise ValueError(f"expected logits of shape [batch, num_classes], got {logits.shape}")
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"expected labels of shape {logits.shape[:1]}, got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"expected integer labels, got dtype {labels.dtype}")
        k = logits.shape[1]
        if self.num_classes is None:
            self.num_classes = k
        elif k != self.num_classes:
            raise ValueError(f"expected logits with {self.num_classes} classes, got {k}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != labels.shape:
                raise ValueError(f"expected mask of shape {labels.shape}, got {mask.shape}")
            keep = mask != 0
            logits, labels = logits[keep], labels[keep]
        if labels.size == 0:
            return self
        if labels.min() < 0 or labels.max() >= k:
            bad = labels[(labels < 0) | (labels >= k)][0]
            raise ValueError(f"expected labels in [0, {k}), got {bad}")
        top = logits.max(axis=1, keepdims=True)
        if np.isnan(logits).any() or not np.isfinite(top).all():
            raise ValueError("expected logits without nan and with a finite maximum per row")
        # Stable log-softmax: shift by the row max, so the top log-probability is -logsumexp.
        lse = np.log(np.sum(np.exp(logits - top), axis=1))
        log_probs = logits - top - lse[:, None]
        confidence = np.exp(-lse)
        correct = (np.argmax(logits, axis=1) == labels).astype(np.float64)
        bins = bin_indices(confidence, self.num_bins)
        self.bin_counts += np.bincount(bins, minlength=self.num_bins)
        self.bin_conf_sum += np.bincount(bins, confidence, minlength=self.num_bins)
        self.bin_correct_sum += np.bincount(bins, correct, minlength=self.num_bins)
        self.nll_sum += float(-np.sum(log_probs[np.arange(labels.size), labels]))
        self.count += int(labels.size)
        return self

    def merge(self, other: CalibrationAccumulator) -> CalibrationAccumulator:
        """Adds ``other``'s statistics into this accumulator (e.g. from another host)."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"expected {self.num_bins} bins, got {other.num_bins}")
        if None not in (self.num_classes, other.num_classes) and (
            self.num_classes != other.num_classes
        ):
            raise ValueError(f"expected {self.num_classes} classes, got {other.num_classes}")
        self.num_classes = self.num_classes or other.num_classes
        self.bin_counts += other.bin_counts
        self.bin_conf_sum += other.bin_conf_sum
        self.bin_correct_sum += other.bin_correct_sum
        self.nll_sum += other.nll_sum
        self.count += other.count
        return self

    def result(self) -> CalibrationResult:
        if self.count == 0:
            raise ValueError("no examples: expected at least one unmasked row of logits [B, K]")
        n = self.count
        filled = self.bin_counts > 0
        safe = np.maximum(self.bin_counts, 1)
        conf = np.where(filled, self.bin_conf_sum / safe, np.nan)
        acc = np.where(filled, self.bin_correct_sum / safe, np.nan)
        # n_b/n * |acc_b - conf_b| == |correct_sum_b - conf_sum_b| / n: no per-bin division.
        ece = float(np.sum(np.abs(self.bin_correct_sum - self.bin_conf_sum)) / n)
        mce = float(np.max(np.abs(acc - conf)[filled]))
        return CalibrationResult(
            ece=ece,
            mce=mce,
            nll=self.nll_sum / n,
            accuracy=float(self.bin_correct_sum.sum() / n),
            count=n,
            bin_edges=np.linspace(0.0, 1.0, self.num_bins + 1),
            bin_counts=self.bin_counts.copy(),
            bin_confidence=conf,
            bin_accuracy=acc,
        )


def calibration_metrics(logits, labels, num_bins: int = 15, mask=None) -> CalibrationResult:
    """One-shot calibration of ``logits [B, K]`` against integer ``labels [B]``."""
    return CalibrationAccumulator(num_bins=num_bins).update(logits, labels, mask).result()


def _draw(ax, hist_ax, result: CalibrationResult, title: str | None) -> None:
    edges = result.bin_edges
    width, left = np.diff(edges), edges[:-1]
    filled = result.bin_counts > 0
    acc = np.where(filled, result.bin_accuracy, 0.0)
    conf = np.where(filled, result.bin_confidence, 0.0)
    ax.bar(left, acc, width, align="edge", color="tab:blue", edgecolor="k", label="accuracy")
    ax.bar(
        left,
        conf - acc,
        width,
        bottom=acc,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}ECE {result.ece:.4f}, MCE {result.mce:.4f} (n={result.count})")
    ax.legend(loc="upper left", fontsize="small")
    hist_ax.bar(
        left, result.bin_counts / result.count, width, align="edge", color="gray", edgecolor="k"
    )
    hist_ax.set(xlim=(0, 1), xlabel="confidence", ylabel="fraction of examples")


def reliability_diagrams(results: Mapping[str, CalibrationResult], path) -> pathlib.Path:
    """Side-by-side reliability diagrams (one column per result, e.g. per clipping mode), each
    with its confidence histogram below; writes a PNG, creating parent dirs, returns the path.
    """
    if not results:
        raise ValueError("expected at least one CalibrationResult to draw")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(
        2,
        n,
        figsize=(4.5 * n, 6),
        squeeze=False,
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1]},
    )
    for col, (name, result) in enumerate(results.items()):
        _draw(axes[0, col], axes[1, col], result, name)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability_diagram(result: CalibrationResult, path, title: str | None = None):
    """Reliability diagram of one result (see ``reliability_diagrams``); returns the path."""
    return reliability_diagrams({title or "": result}, path)
