"""What a run writes: metrics.jsonl, TensorBoard events, the progress bar, the curves PNG and
the shared end of a run (`finish_run`: calibration.json, plots, summary.json).

In a multi-process run only process 0 writes: the others get a `NullWriter` and a disabled bar.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections.abc import Mapping

import numpy as np


def jsonable(v):
    """``v`` (a scalar or array) as JSON: a float or nested lists; NaN -> null, +-inf -> strings."""
    v = float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard. On resume from step ``s``, records of later steps (from the interrupted run,
    which the resumed run recomputes identically) are dropped first, so each step appears once.
    """

    def __init__(self, workdir: pathlib.Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            tmp.replace(self.path)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir), purge_step=resume_step + 1 or None)

    def write(self, step: int, metrics: Mapping[str, float]) -> dict:
        record = {"step": int(step), **{k: jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class NullWriter:
    """The `MetricsWriter` of a process that writes nothing (every process but 0)."""

    def write(self, step: int, metrics: Mapping[str, float]) -> dict:
        return {"step": int(step), **{k: jsonable(v) for k, v in metrics.items()}}

    def close(self) -> None:
        pass


def metrics_writer(workdir, resume_step: int, tensorboard: bool, primary: bool = True):
    """A `MetricsWriter` on the writing process, a `NullWriter` elsewhere."""
    if not primary:
        return NullWriter()
    return MetricsWriter(workdir, resume_step=resume_step, tensorboard=tensorboard)


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, desc: str, disable: bool = False):
    """A tqdm bar on stderr (``disable``: on every process but 0 of a multi-process run)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=disable,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        file=sys.stderr,
    )


def plot_curves(workdir: pathlib.Path, title: str = "") -> pathlib.Path | None:
    """training_curves.png: train loss (debug, not private), test accuracy and epsilon vs step."""
    records = read_metrics(workdir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        return zip(*pts, strict=True) if pts else ((), ())

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in (
        (axes[0], "debug/train_loss", "train loss (debug, non-private)"),
        (axes[1], "test_accuracy", "test accuracy"),
        (axes[2], "epsilon", "epsilon spent"),
    ):
        x, y = series(key)
        ax.plot(list(x), list(y), marker="." if len(list(series(key))[0]) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = pathlib.Path(workdir) / "training_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_calibration(path: pathlib.Path, result) -> None:
    """A `CalibrationResult` as JSON: the scalar metrics and the reliability bins."""
    fields = ("ece", "mce", "nll", "accuracy", "count")
    bins = ("bin_edges", "bin_counts", "bin_confidence", "bin_accuracy")
    record = {k: jsonable(getattr(result, k)) for k in fields + bins}
    path.write_text(json.dumps(record))


def finish_run(
    workdir: pathlib.Path,
    summary: Mapping,
    calibration,
    title: str,
    plots: bool = True,
    primary: bool = True,
) -> dict:
    """The end every driver shares: the evaluation's reliability bins (``calibration.json``),
    ``training_curves.png`` and ``reliability.png`` (when ``plots``), then ``summary.json``,
    written last and atomically, so its presence marks a finished run. Only process 0 writes.
    Returns the summary with its floats made JSON-safe.
    """
    from dpft.metrics import reliability_diagram

    summary = {k: jsonable(v) if isinstance(v, float) else v for k, v in summary.items()}
    if not primary:
        return summary
    workdir = pathlib.Path(workdir)
    write_calibration(workdir / "calibration.json", calibration)
    if plots:
        plot_curves(workdir, title=title)
        reliability_diagram(calibration, workdir / "reliability.png", title=title)
    tmp = workdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(workdir / "summary.json")
    return summary
