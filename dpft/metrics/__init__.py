"""Evaluation metrics computed on the host (numpy).

Metrics computed on private training data are not differentially private: log them only under
a ``debug/`` prefix. See ``dpft.metrics.calibration``.
"""

from dpft.metrics.calibration import (
    CalibrationAccumulator,
    CalibrationResult,
    bin_indices,
    calibration_metrics,
    reliability_diagram,
    reliability_diagrams,
)

__all__ = [
    "CalibrationAccumulator",
    "CalibrationResult",
    "bin_indices",
    "calibration_metrics",
    "reliability_diagram",
    "reliability_diagrams",
]
