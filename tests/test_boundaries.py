"""Boundaries moved to their own edge (NUCLEUS.PREDICT.BOUNDARY_LEVEL): masks drawn too wide or too tight around
a blurred nucleus end at its half-maximum, whatever cannot be judged stays as predicted."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from nucleus_seg.inference.boundaries import _smooth, band_width, snap_boundaries, snap_labels, snapped_detections
from nucleus_seg.inference.masks import Detections, windows_to_label
from nucleus_seg.inference.significance import max_filter, min_filter
from nucleus_seg.inference.tiling import finalize_labels


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def blurred_field(radii=(10.0, 11.0), sigma=1.5, noise=0.0):
    """Two nuclei (+200 on 20) blurred by a PSF of ``sigma``; their half-maximum contours are the discs of
    ``radii`` (to a fraction of a pixel at this size)."""
    shape = (80, 120)
    image = np.full(shape, 20.0, np.float32)
    image[disc(shape, 40, 30, radii[0])] += 200
    image[disc(shape, 40, 85, radii[1])] += 200
    image = cv2.GaussianBlur(image, (0, 0), sigma)
    image += np.random.default_rng(0).normal(0, noise, shape).astype(np.float32) if noise else 0
    return image


def labels_of(shape, *discs):
    labels = np.zeros(shape, np.int32)
    for k, (cy, cx, r) in enumerate(discs, start=1):
        labels[disc(shape, cy, cx, r)] = k
    return labels


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("noise", [0.0, 15.0])
def test_too_wide_and_too_tight_masks_end_at_the_half_maximum(noise):
    image = blurred_field(radii=(14.0, 15.0), noise=noise)  # ~29 px across: a band of 2 px
    truth = labels_of(image.shape, (40, 30, 14.0), (40, 85, 15.0))
    drawn = labels_of(image.shape, (40, 30, 15.5), (40, 85, 13.5))  # 1.5 px too wide, 1.5 px too tight
    assert band_width(29.0) == 2
    snapped = snap_labels(torch.from_numpy(drawn), torch.from_numpy(image), 0.5).numpy()
    for k in (1, 2):
        before, after = iou(drawn == k, truth == k), iou(snapped == k, truth == k)
        assert before < 0.85 and after > 0.92, (k, before, after)
    np.testing.assert_array_equal(snap_labels(torch.from_numpy(drawn), torch.from_numpy(image), 0.0).numpy(), drawn)


def test_the_level_moves_the_boundary_and_only_a_band_changes():
    image = blurred_field()
    drawn = labels_of(image.shape, (40, 30, 10.0), (40, 85, 11.0))
    low = snap_labels(torch.from_numpy(drawn), torch.from_numpy(image), 0.2).numpy()
    high = snap_labels(torch.from_numpy(drawn), torch.from_numpy(image), 0.8).numpy()
    assert (low > 0).sum() > (drawn > 0).sum() > (high > 0).sum()
    band = band_width(21.0)
    near = (max_filter(torch.from_numpy(drawn), band) != min_filter(torch.from_numpy(drawn), band)).numpy()
    assert (low != drawn)[~near].sum() == 0 and (high != drawn)[~near].sum() == 0


def test_what_cannot_be_judged_stays_as_predicted():
    image = blurred_field()
    flat = np.full(image.shape, 50.0, np.float32)
    drawn = labels_of(image.shape, (40, 30, 12.0), (40, 85, 9.0))
    np.testing.assert_array_equal(snap_labels(torch.from_numpy(drawn), torch.from_numpy(flat), 0.5).numpy(), drawn)
    packed = drawn.copy()
    packed[(packed == 0)] = 3  # no background anywhere: no ring to compare with
    np.testing.assert_array_equal(snap_labels(torch.from_numpy(packed), torch.from_numpy(image), 0.5).numpy(), packed)
    dark = 240 - image  # a dark "nucleus" on bright: no positive contrast
    np.testing.assert_array_equal(snap_labels(torch.from_numpy(drawn), torch.from_numpy(dark), 0.5).numpy(), drawn)


def test_snapped_detections_paint_what_snap_boundaries_gives():
    """The detections path (windows grown by the band, shown ones replaced by their snapped pixels) paints the label
    image the label path gives; a detection below the output threshold keeps its mask."""
    image = blurred_field()
    norm = np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    shape = image.shape
    masks = [disc(shape, 40, 30, 11.5), disc(shape, 40, 85, 9.5), disc(shape, 10, 10, 4)]
    scores = torch.tensor([0.9, 0.8, 0.1])
    boxes, windows, oy, ox = [], [], [], []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        oy.append(max(ys.min() - 1, 0))
        ox.append(max(xs.min() - 1, 0))
    win = 26
    for m, y, x in zip(masks, oy, ox):
        windows.append(torch.from_numpy(m[y:y + win, x:x + win].copy()))
    det = Detections(shape, torch.tensor(boxes, dtype=torch.float32), scores, torch.zeros(3, dtype=torch.long),
                     torch.stack(windows), torch.tensor(oy), torch.tensor(ox))
    got = snapped_detections(det, norm, 0.5, score_thresh=0.5)
    shown = got.scores >= 0.5
    painted = windows_to_label(got.windows[shown], got.oy[shown], got.ox[shown], got.scores[shown], shape).numpy()
    plain = windows_to_label(det.windows[:2], det.oy[:2], det.ox[:2], det.scores[:2], shape).numpy()
    expected = snap_boundaries(finalize_labels(plain, scores[:2].numpy(), np.zeros((2, 4))), norm, 0.5)
    np.testing.assert_array_equal(finalize_labels(painted, scores[:2].numpy(), np.zeros((2, 4))).labels,
                                  expected.labels)
    assert (expected.labels != plain).any()
    low = windows_to_label(got.windows[2:], got.oy[2:], got.ox[2:], got.scores[2:], shape).numpy() > 0
    np.testing.assert_array_equal(low, masks[2])
    assert snapped_detections(det, norm, 0.0) is det


def test_the_gpu_filters_equal_opencvs():
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 50, (40, 56)).astype(np.int32))
    labels[labels < 45] = 0
    for radius in (1, 3):
        torch.testing.assert_close(min_filter(labels, radius, opencv=False), min_filter(labels, radius, opencv=True))
    gray = torch.from_numpy(np.random.default_rng(1).random((40, 56)).astype(np.float32))
    torch.testing.assert_close(_smooth(gray, 1.2, opencv=False), _smooth(gray, 1.2, opencv=True), atol=2e-3, rtol=0)


@pytest.mark.parametrize("noise", [0.0, 15.0])
def test_the_exported_runner_snaps_as_the_package_does(noise):
    """nucleus_runner.py (numpy only) carries its own copy of the step: the same pixels, but for the odd pixel
    whose level sits on the threshold to float rounding."""
    from nucleus_seg.export.runner import snap_labels as runner_snap

    image = blurred_field(noise=noise)
    drawn = labels_of(image.shape, (40, 30, 11.5), (40, 85, 9.5), (10, 60, 5.0))
    expected = snap_labels(torch.from_numpy(drawn), torch.from_numpy(image), 0.5).numpy()
    got = runner_snap(drawn, image, 0.5)
    assert (got != drawn).sum() > 50
    assert (got != expected).sum() <= 2
