"""Detections that stand out from the image's own pixel noise (``NUCLEUS.PREDICT.MIN_SIGNIFICANCE``).

When "auto" upscales a field of small specks several times, the model reads the camera noise, magnified into
smooth blobs, as tiny nuclei (2026-12-03: 101 on a debris-only field with the recipe model, 2617 with a CPU demo
model). No score threshold separates them, but statistics does: a real nucleus is brighter than the background
around it by many times what the noise of its mean could give. A detection's significance is

    (its mean - the median of a ring of background around it) / pixel noise * sqrt(its area)

in the normalised image the model saw (so inverted brightfield counts the right way round). The pixel noise is
the median absolute difference of neighbouring pixels, which nuclei and edges are too few to move. Measured on
held-out synthetic fields (benchmarks/README.md): true detections >= 22 clean and >= 4.6 at the suite's SNR 5,
magnified noise grains median 1.1. Detections with no background around them (packed among others) and images
with no measurable noise are kept: the rule only removes what it can judge.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .masks import Detections, select_detections, window_pixels, windows_to_label
from .tiling import LabelPrediction, finalize_labels

__all__ = ["EDGE_BAND", "RING_MIN_PIXELS", "gray_image", "keep_significant", "label_edge_significance",
           "label_significance", "max_filter", "medians_by_id", "min_filter", "pixel_noise", "significant_detections",
           "typical_diameter"]

Measure = Callable[[torch.Tensor, torch.Tensor], np.ndarray]  # labels, gray -> one value per id
RING_MIN_PIXELS = 4  # fewer background pixels around a detection than this: nothing to compare with, kept
EDGE_BAND = 2  # px each side of a boundary: a nucleus's edge steps within it, out-of-focus haze rises over tens
MAD_TO_SIGMA = 1 / (0.6745 * math.sqrt(2))  # median |difference of two neighbours| -> one pixel's noise sigma


def pixel_noise(gray: np.ndarray | torch.Tensor) -> float:
    """Standard deviation of the image's per-pixel noise, from the median absolute difference of horizontal
    neighbours on every other row (0 for an image without measurable noise, e.g. a quantised clean one)."""
    g = torch.as_tensor(gray, dtype=torch.float32)
    if g.shape[-1] < 2 or g.numel() == 0:
        return 0.0
    return float((g[::2, 1:] - g[::2, :-1]).abs().flatten().median()) * MAD_TO_SIGMA


def typical_diameter(area: torch.Tensor) -> float:
    """The equivalent diameter of the median instance, from the areas of ids 1..N (those with pixels)."""
    return math.sqrt(4 * float(area[area > 0].float().median()) / math.pi)


def _judged_image(labels: np.ndarray | torch.Tensor, gray: np.ndarray | torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Labels and image as tensors where ``labels`` is, the number of ids, and the pixel noise (0 when there is
    nothing to judge or no measurable noise)."""
    labels = torch.as_tensor(labels)
    gray = torch.as_tensor(gray, dtype=torch.float32, device=labels.device)
    n = int(labels.max()) if labels.numel() else 0
    return labels, gray, n, pixel_noise(gray) if n else 0.0


def label_significance(labels: np.ndarray | torch.Tensor, gray: np.ndarray | torch.Tensor) -> np.ndarray:
    """Significance of ids 1..labels.max() (index k-1 for id k); ``inf`` where it cannot be judged (no
    pixels, no background ring, or no measurable noise). Runs where ``labels`` is (the GPU's labels there)."""
    labels, gray, n, sigma = _judged_image(labels, gray)
    if sigma <= 0:
        return np.full(n, np.inf)
    flat = labels.flatten().long()
    area = torch.bincount(flat, minlength=n + 1)[1:]
    inside = torch.bincount(flat, weights=gray.flatten().double(), minlength=n + 1)[1:] / area.clamp(min=1)
    # the ring: background within half a typical radius of each detection (at least 2 px)
    radius = max(2, round(0.25 * typical_diameter(area)))
    ring = torch.where(labels == 0, max_filter(labels, radius), 0).long().flatten()
    ring_pixels = torch.bincount(ring, minlength=n + 1)[1:]
    level = medians_by_id(gray.flatten(), ring, n)
    significance = (inside - level) / sigma * area.double().sqrt()
    judged = (area > 0) & (ring_pixels >= RING_MIN_PIXELS)
    return torch.where(judged, significance, math.inf).cpu().numpy()


def label_edge_significance(labels: np.ndarray | torch.Tensor, gray: np.ndarray | torch.Tensor,
                            band: int = EDGE_BAND) -> np.ndarray:
    """Significance of the step at each instance's edge (index k-1 for id k): the mean of its pixels within
    ``band`` px of the background minus the mean of the background within ``band`` px of it, over the noise of
    that difference (a z-score). Haze of another focal plane rises over tens of pixels, so the model's outline
    of it has no step at its edge although the blob as a whole stands out; a nucleus steps within a pixel or
    two, blurred or noisy. ``inf`` where it cannot be judged (fewer than RING_MIN_PIXELS either side, no
    measurable noise)."""
    labels, gray, n, sigma = _judged_image(labels, gray)
    if sigma <= 0:
        return np.full(n, np.inf)
    values = gray.flatten().double()
    inner = torch.where((labels > 0) & (min_filter(labels, band) == 0), labels, 0)
    outer = torch.where(labels == 0, max_filter(labels, band), 0)
    sides = []
    for side in (inner.flatten().long(), outer.flatten().long()):
        count = torch.bincount(side, minlength=n + 1)[1:]
        total = torch.bincount(side, weights=values, minlength=n + 1)[1:]
        sides.append((count, total / count.clamp(min=1)))
    (n_in, mean_in), (n_out, mean_out) = sides
    z = (mean_in - mean_out) / (sigma * (1 / n_in.clamp(min=1) + 1 / n_out.clamp(min=1)).double().sqrt())
    judged = (n_in >= RING_MIN_PIXELS) & (n_out >= RING_MIN_PIXELS)
    return torch.where(judged, z, math.inf).cpu().numpy()


def max_filter(labels: torch.Tensor, radius: int, opencv: bool | None = None) -> torch.Tensor:
    """Each pixel's largest value within a square of ``radius`` (as float32, exact for ids below 2**24; pixels
    outside the image count for nothing): OpenCV on the CPU (7 ms -> 0.2 ms on a 512 px field), two separable max
    filters on a GPU (``opencv`` forces either)."""
    size = 2 * radius + 1
    if labels.device.type == "cpu" if opencv is None else opencv:
        return torch.from_numpy(cv2.dilate(labels.cpu().numpy().astype(np.float32), np.ones((size, size), np.uint8)))
    grown = F.max_pool2d(labels[None, None].float(), (1, size), stride=1, padding=(0, radius))
    return F.max_pool2d(grown, (size, 1), stride=1, padding=(radius, 0))[0, 0]


def min_filter(labels: torch.Tensor, radius: int, opencv: bool | None = None) -> torch.Tensor:
    """Each pixel's smallest value within a square of ``radius`` (float32; pixels outside the image count for
    nothing), as :func:`max_filter`."""
    if labels.device.type == "cpu" if opencv is None else opencv:
        size = 2 * radius + 1
        return torch.from_numpy(cv2.erode(labels.cpu().numpy().astype(np.float32), np.ones((size, size), np.uint8)))
    return -max_filter(-labels.float(), radius, opencv=False)


def medians_by_id(values: torch.Tensor, ring: torch.Tensor, n: int) -> torch.Tensor:
    """Median of ``values`` over each id's pixels of ``ring`` (index k-1 for id k, 0 = none; NaN for an id with
    none): one sort of the pixels by id + value scaled into [0, 0.5), then the middle of each id's run
    (scipy.ndimage.median sorts the whole image and is 5x slower on a 512 px field of 400 nuclei)."""
    where = ring > 0
    ids, values = ring[where], values[where].double()
    if values.numel():
        low, span = values.min(), (values.max() - values.min()).clamp(min=1e-12)
        values = values[torch.sort(ids + (values - low) / span * 0.5).indices]
    counts = torch.bincount(ids, minlength=n + 1)[1:]
    starts = torch.cumsum(counts, 0) - counts
    has = counts > 0
    medians = torch.full((n,), math.nan, dtype=torch.float64, device=values.device)
    medians[has] = (values[starts[has] + (counts[has] - 1) // 2] + values[starts[has] + counts[has] // 2]) / 2
    return medians


def gray_image(norm: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    image = torch.as_tensor(np.asarray(norm), device=device).float()
    return image.mean(dim=2) if image.ndim == 3 else image


def keep_significant(pred: LabelPrediction, norm: np.ndarray, min_significance: float,
                     measure: Measure = label_significance) -> LabelPrediction:
    """``pred`` without the instances whose significance in ``norm`` (the normalised image) is below
    ``min_significance``, renumbered as every label prediction is (``finalize_labels``). ``measure``: the whole
    instance against its surroundings (``label_significance``) or its edge (``label_edge_significance``)."""
    if min_significance <= 0 or len(pred) == 0:
        return pred
    keep = measure(pred.labels, gray_image(norm)) >= min_significance
    if keep.all():
        return pred
    lut = np.concatenate([[0], np.where(keep, np.arange(1, len(keep) + 1), 0)]).astype(np.int32)
    return finalize_labels(lut[pred.labels], pred.scores, pred.boxes)


def significant_detections(det: Detections, norm: np.ndarray, min_significance: float,
                           score_thresh: float = 0.0, measure: Measure = label_significance) -> Detections:
    """``det`` without the detections scoring at least ``score_thresh`` (the output threshold) whose significance
    in ``norm`` is below ``min_significance``. Each is judged on the pixels it shows in the label image of those
    detections (highest score on top), and the pixels a dropped one showed are cut from the masks under it, so
    every path gives the label image ``keep_significant`` gives (``predict_batch``, ``predict_labels`` and the
    tiled paths drop the same pixels). Lower scoring detections (kept for COCO AP's ranking) are not judged."""
    if min_significance <= 0 or len(det.scores) == 0:
        return det
    shown = det.scores >= score_thresh
    labels = windows_to_label(det.windows[shown], det.oy[shown], det.ox[shown], det.scores[shown], det.image_shape)
    found = measure(labels, gray_image(norm, labels.device))
    significance = np.full(int(shown.sum()), np.inf)
    significance[:len(found)] = found  # ids past labels.max() painted nothing: kept, as other hidden ones
    dropped = torch.from_numpy(significance < min_significance).to(det.scores.device)
    if not bool(dropped.any()):
        return det
    keep = ~shown
    keep[shown] = ~dropped
    dropped_id = torch.cat([torch.zeros(1, dtype=torch.bool, device=dropped.device), dropped])
    rows, cols = window_pixels(det.oy, det.ox, *det.windows.shape[1:])
    uncovered = det.windows & ~dropped_id[labels.long()][rows, cols]
    return select_detections(Detections(det.image_shape, det.boxes, det.scores, det.classes, uncovered, det.oy,
                                        det.ox), keep)
