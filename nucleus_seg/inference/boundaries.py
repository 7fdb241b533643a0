"""Instance boundaries moved to the half-maximum of their own edge (``NUCLEUS.PREDICT.BOUNDARY_LEVEL``).

The synthetic labels the model learns from put a nucleus' boundary where its blurred edge is half-way between the
nucleus and the background around it. On images unlike the training set the model's masks drift from that edge
(2026-12-03, a CPU demo model: on the real DSB sample the first pixel inside its masks sits at 0.45 of the local
contrast against 0.61 on synthetic fields: its masks ran ~0.7 px wide). This step measures each instance's own
contrast, the median of its interior and of a ring of background around it, and re-decides only the pixels within
a narrow band of its boundary: a pixel there belongs to it when its (lightly smoothed) intensity is at least
``level`` of the way from the ring to the interior. Widths scale with the image's typical nucleus, so the rule
reads the same at every magnification. Instances it cannot judge (no interior, no background around them, no
contrast) and changes that would take away half an instance are left as predicted.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .masks import Detections, window_pixels, windows_to_label
from .significance import RING_MIN_PIXELS, gray_image, max_filter, medians_by_id, min_filter, typical_diameter
from .tiling import LabelPrediction, finalize_labels

__all__ = ["BAND_PER_DIAMETER", "band_width", "snap_boundaries", "snap_labels", "snapped_detections"]

BAND_PER_DIAMETER = 1 / 16  # pixels re-decided on each side of a boundary (2 px for 24 px nuclei, 1 below 24)
SMOOTH_PER_DIAMETER = 1 / 16  # Gaussian sigma of the intensity the level is read from (1.5 px for 24 px nuclei)
CORE_PER_DIAMETER = 1 / 8  # the interior: at least this far from any other label (3 px for 24 px nuclei)
RING_WIDTH = 3  # px of background just outside the band that give the background level
MIN_KEPT = 0.5  # an instance left with less than this part of its area is left as predicted


def _typical_diameter(labels: torch.Tensor, n: int) -> float:
    return typical_diameter(torch.bincount(labels.flatten().long(), minlength=n + 1)[1:])


def band_width(diameter: float) -> int:
    """Pixels re-decided on each side of a boundary for nuclei of ``diameter`` (at least 1)."""
    return max(1, round(BAND_PER_DIAMETER * diameter))


def _smooth(gray: torch.Tensor, sigma: float, opencv: bool | None = None) -> torch.Tensor:
    """Gaussian blur: OpenCV on the CPU, a separable convolution elsewhere (``opencv`` forces either); both
    reflect at the border."""
    if sigma < 0.3:
        return gray
    if gray.device.type == "cpu" if opencv is None else opencv:
        return torch.from_numpy(cv2.GaussianBlur(gray.cpu().numpy(), (0, 0), sigma))
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, device=gray.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(gray[None, None], (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[0, 0]


def snap_labels(labels: torch.Tensor | np.ndarray, gray: torch.Tensor | np.ndarray, level: float) -> torch.Tensor:
    """``labels`` (ids 1..N, 0 background) with each boundary moved to ``level`` of its own contrast in ``gray``
    (the normalised image, nuclei bright); the same ids, on ``labels``' device."""
    labels = torch.as_tensor(labels)
    n = int(labels.max()) if labels.numel() else 0
    if n == 0 or level <= 0:
        return labels
    gray = torch.as_tensor(gray, dtype=torch.float32, device=labels.device)
    diameter = _typical_diameter(labels, n)
    band = band_width(diameter)
    core_radius = max(1, round(CORE_PER_DIAMETER * diameter))
    smooth = _smooth(gray, SMOOTH_PER_DIAMETER * diameter).flatten()
    ids = labels.long()
    fg = ids > 0
    # interior: pixels with nothing but their own id around them; ring: background just past the band
    alone = (max_filter(labels, core_radius) == min_filter(labels, core_radius)).to(labels.device)
    core = torch.where(fg & alone, ids, 0).flatten()
    near = max_filter(labels, band).to(labels.device).long()
    reach = max_filter(labels, band + RING_WIDTH).to(labels.device).long()
    ring = torch.where(~fg & (near == 0), reach, 0).flatten()
    inner, outer = medians_by_id(smooth, core, n), medians_by_id(smooth, ring, n)
    core_pixels = torch.bincount(core, minlength=n + 1)[1:]
    ring_pixels = torch.bincount(ring, minlength=n + 1)[1:]
    contrast = inner - outer
    judged = (core_pixels >= RING_MIN_PIXELS) & (ring_pixels >= RING_MIN_PIXELS) & (contrast > 0)
    judged = torch.cat([torch.zeros(1, dtype=torch.bool, device=labels.device), judged])
    inner = torch.cat([inner.new_zeros(1), inner])
    outer = torch.cat([outer.new_zeros(1), outer])
    # the band: an instance's pixels near background, and background near an instance (its owner: the largest id)
    background_near = (max_filter((~fg).to(torch.float32), band) > 0).to(labels.device)
    owner = torch.where(fg, ids, near).flatten()
    in_band = ((fg & background_near) | (~fg & (near > 0))).flatten() & judged[owner]
    share = (smooth.double() - outer[owner]) / (inner[owner] - outer[owner]).clamp(min=1e-12)
    flat = ids.flatten()
    snapped = torch.where(in_band, torch.where(share >= level, owner, 0), flat)
    before = torch.bincount(flat, minlength=n + 1)
    after = torch.bincount(snapped, minlength=n + 1)
    undo = after < MIN_KEPT * before
    undo[0] = False
    if bool(undo.any()):
        snapped = torch.where(undo[flat] | undo[snapped], flat, snapped)
    return snapped.view(labels.shape).to(labels.dtype)


def snap_boundaries(pred: LabelPrediction, norm: np.ndarray, level: float) -> LabelPrediction:
    """``pred`` with its boundaries snapped (:func:`snap_labels`) in ``norm``, the normalised image."""
    if level <= 0 or len(pred) == 0:
        return pred
    labels = snap_labels(torch.from_numpy(pred.labels), gray_image(norm), level).numpy()
    return finalize_labels(labels, pred.scores, pred.boxes)


def snapped_detections(det: Detections, norm: np.ndarray, level: float, score_thresh: float = 0.0) -> Detections:
    """``det`` with the masks of the detections scoring at least ``score_thresh`` (the output threshold) replaced
    by what each shows in the snapped label image of those detections, so every path paints the label image
    :func:`snap_boundaries` gives. Windows grow by the band on every side (within the image) to hold what a mask
    gained; lower scoring detections (kept for COCO AP's ranking) keep their masks."""
    if level <= 0 or len(det.scores) == 0:
        return det
    shown = det.scores >= score_thresh
    if not bool(shown.any()):
        return det
    labels = windows_to_label(det.windows[shown], det.oy[shown], det.ox[shown], det.scores[shown], det.image_shape)
    if int(labels.max()) == 0:
        return det
    snapped = snap_labels(labels, gray_image(norm, labels.device), level)
    band = band_width(_typical_diameter(labels, int(labels.max())))
    height, width = det.image_shape
    n, win_h, win_w = det.windows.shape
    new_h, new_w = min(win_h + 2 * band, height), min(win_w + 2 * band, width)
    oy = (det.oy - band).clamp(min=0, max=height - new_h)
    ox = (det.ox - band).clamp(min=0, max=width - new_w)
    windows = torch.zeros((n, new_h, new_w), dtype=torch.bool, device=det.windows.device)
    # every mask placed in its grown window, then the shown ones replaced by their snapped pixels
    rows, cols = window_pixels(det.oy - oy, det.ox - ox, win_h, win_w)  # old windows in the grown frames
    windows[torch.arange(n, device=det.windows.device)[:, None, None], rows, cols] = det.windows
    ids = torch.zeros(n, dtype=torch.long, device=det.windows.device)
    ids[shown] = torch.arange(1, int(shown.sum()) + 1, device=det.windows.device)
    image_rows, image_cols = window_pixels(oy, ox, new_h, new_w)
    windows[shown] = snapped[image_rows[shown], image_cols[shown]].long() == ids[shown][:, None, None]
    return Detections(det.image_shape, det.boxes, det.scores, det.classes, windows, oy, ox)
