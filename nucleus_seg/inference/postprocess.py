"""What follows the model on every path, in one order: detections that do not stand out from the pixel noise
dropped (``MIN_SIGNIFICANCE``, :mod:`.significance`), then those with no step at their edge (out-of-focus haze,
``MIN_EDGE_SIGNIFICANCE``), then the boundaries of the rest moved to their own edge (``BOUNDARY_LEVEL``,
:mod:`.boundaries`). All read the normalised image the model saw."""

from __future__ import annotations

import numpy as np

from .boundaries import snap_boundaries, snapped_detections
from .masks import Detections
from .significance import keep_significant, label_edge_significance, significant_detections
from .tiling import LabelPrediction

__all__ = ["finish_detections", "finish_labels", "needs_image"]


def needs_image(min_significance: float, boundary_level: float, min_edge_significance: float = 0.0) -> bool:
    """Whether any step is on (callers keep the normalised image only then)."""
    return min_significance > 0 or boundary_level > 0 or min_edge_significance > 0


def finish_labels(pred: LabelPrediction, norm: np.ndarray, min_significance: float,
                  boundary_level: float, min_edge_significance: float = 0.0) -> LabelPrediction:
    """A label prediction (stitched tiles, a label image) after the steps."""
    pred = keep_significant(pred, norm, min_significance)
    pred = keep_significant(pred, norm, min_edge_significance, label_edge_significance)
    return snap_boundaries(pred, norm, boundary_level)


def finish_detections(det: Detections, norm: np.ndarray, min_significance: float, boundary_level: float,
                      score_thresh: float, min_edge_significance: float = 0.0) -> Detections:
    """Detections after the steps, judged on what those scoring at least ``score_thresh`` show: they paint the
    label image :func:`finish_labels` gives for the label image of the detections."""
    det = significant_detections(det, norm, min_significance, score_thresh)
    det = significant_detections(det, norm, min_edge_significance, score_thresh, label_edge_significance)
    return snapped_detections(det, norm, boundary_level, score_thresh)
