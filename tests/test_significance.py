"""The significance rules: nuclei stand out from pixel noise, noise grains don't (NUCLEUS.PREDICT.MIN_SIGNIFICANCE);
nuclei step up at their edge, out-of-focus haze doesn't (MIN_EDGE_SIGNIFICANCE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucleus_seg.inference.masks import Detections
from nucleus_seg.inference.significance import (
    keep_significant,
    label_edge_significance,
    label_significance,
    pixel_noise,
    significant_detections,
)
from nucleus_seg.inference.tiling import LabelPrediction, finalize_labels


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def field(seed=0, sigma=10.0):
    """A noisy background (100 +- sigma) with one nucleus (+60) at (30, 30); the labels: that nucleus (id 1), a
    patch of plain noise of the same size (id 2) and a 3x3 'grain' at the brightest noise pixel away from it (id 3)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, sigma, (96, 96)).astype(np.float32)
    nucleus = disc(image.shape, 30, 30, 8)
    image[nucleus] += 60
    labels = np.zeros(image.shape, np.int32)
    labels[nucleus] = 1
    labels[disc(image.shape, 70, 30, 8)] = 2
    away = image.copy()
    away[:, :50] = -np.inf
    y, x = np.unravel_index(np.argmax(away[5:-5, 5:-5]), (86, 86))
    labels[y + 4:y + 7, x + 4:x + 7] = 3
    return image, labels


@pytest.mark.parametrize("sigma", [3.0, 10.0, 25.0])
def test_pixel_noise_measures_the_noise_not_the_nuclei(sigma):
    image, _ = field(sigma=sigma)
    assert pixel_noise(image) == pytest.approx(sigma, rel=0.08)
    assert pixel_noise(np.full((32, 32), 7.0)) == 0.0


def test_a_nucleus_is_significant_and_noise_is_not():
    image, labels = field()
    nucleus, patch, grain = label_significance(labels, image)
    assert nucleus > 50  # 6 sigma brighter over ~200 pixels
    assert abs(patch) < 5 and grain < 5  # even the brightest grain of noise


def test_what_cannot_be_judged_is_kept():
    image, labels = field()
    packed = labels.copy()
    packed[packed == 2] = 0
    ring = disc(image.shape, 30, 30, 20) & (packed == 0)
    packed[ring] = 2  # id 1 wholly enclosed by id 2: no background around it
    assert label_significance(packed, image)[0] == np.inf
    assert (label_significance(labels, np.full(image.shape, 9.0)) == np.inf).all()  # no measurable noise
    gap = labels.copy()
    gap[gap == 2] = 0  # id 2 has no pixels
    assert label_significance(gap, image)[1] == np.inf


def test_keep_significant_drops_noise_and_renumbers_by_score():
    image, labels = field()
    scores = np.array([0.6, 0.9, 0.8], np.float32)  # the noise outscores the nucleus
    boxes = np.arange(12, dtype=np.float32).reshape(3, 4)
    pred = finalize_labels(labels, scores, boxes)
    norm = np.repeat(np.clip((image - 60) * 1.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    kept = keep_significant(pred, norm, 5.0)
    assert len(kept) == 1 and kept.scores.tolist() == [pytest.approx(0.6)]
    np.testing.assert_array_equal(kept.labels, labels == 1)
    np.testing.assert_array_equal(kept.boxes, boxes[:1])
    assert keep_significant(pred, norm, 0.0) is pred


def test_detections_are_judged_as_their_label_image_is():
    image, labels = field()
    norm = np.clip(image, 0, 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    windows = torch.from_numpy(np.stack([labels == k for k in (1, 2, 3)] + [labels == 2]))
    scores = torch.tensor([0.6, 0.9, 0.8, 0.05])  # the last is under the output threshold
    zeros = torch.zeros(4, dtype=torch.long)
    det = Detections(labels.shape, torch.zeros(4, 4), scores, zeros, windows, zeros, zeros)
    kept = significant_detections(det, norm, 5.0, score_thresh=0.1)
    assert kept.scores.tolist() == pytest.approx([0.6, 0.05])  # noise dropped, the unshown one left alone
    same = keep_significant(LabelPrediction(labels, scores[:3].numpy(), np.zeros((3, 4), np.float32)), norm, 5.0)
    assert same.scores.tolist() == pytest.approx([0.6])


def test_the_gpu_dilation_equals_opencvs():
    from nucleus_seg.inference.significance import max_filter

    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 50, (40, 56)).astype(np.int32))
    labels[labels < 45] = 0
    for radius in (2, 4):
        torch.testing.assert_close(max_filter(labels, radius, opencv=False), max_filter(labels, radius, opencv=True))


def test_the_exported_runner_judges_as_the_package_does():
    """nucleus_runner.py (numpy only) carries its own copy of the rule: the same figures, to float rounding."""
    from nucleus_seg.export.runner import significance

    image, labels = field(seed=3)
    extra = np.zeros_like(labels)
    extra[60:80, 60:90] = 4  # a large patch of background noise
    labels = np.where(labels == 0, extra, labels)
    np.testing.assert_allclose(significance(labels, image), label_significance(labels, image), rtol=1e-4)


def hazy_field(seed=0):
    """A noisy background (100 +- 10) with a sharp nucleus (id 1), the same nucleus blurred by sigma 2 px (id 2),
    and a broad haze blob (Gaussian, sigma 12 px, +25 at its peak) outlined at its half-maximum (id 3)."""
    import cv2

    rng = np.random.default_rng(seed)
    signal = np.zeros((128, 128), np.float32)
    signal[disc(signal.shape, 30, 30, 9)] = 60
    blurred = np.zeros_like(signal)
    blurred[disc(signal.shape, 30, 90, 9)] = 60
    signal += cv2.GaussianBlur(blurred, (0, 0), 2)
    yy, xx = np.mgrid[:128, :128]
    signal += 25 * np.exp(-((yy - 90) ** 2 + (xx - 60) ** 2) / (2 * 12.0 ** 2))
    labels = np.zeros(signal.shape, np.int32)
    labels[disc(signal.shape, 30, 30, 9)] = 1
    labels[disc(signal.shape, 30, 90, 9)] = 2
    labels[disc(signal.shape, 90, 60, 14)] = 3  # half-maximum of the haze: 12 * 1.18
    return signal + rng.normal(100, 10, signal.shape).astype(np.float32), labels


def test_haze_stands_out_as_a_whole_but_has_no_edge():
    image, labels = hazy_field()
    sharp, blurred, haze = label_edge_significance(labels, image)
    assert label_significance(labels, image)[2] > 8  # the whole-object rule keeps the haze ...
    assert abs(haze) < 5  # ... its edge does not step up over the noise
    assert sharp > 25 and blurred > 15  # a nucleus does, in focus or blurred by 2 px
    kept = keep_significant(finalize_labels(labels, np.array([0.9, 0.8, 0.7], np.float32), np.zeros((3, 4))),
                            image, 5.0, label_edge_significance)
    np.testing.assert_array_equal(kept.labels, np.where(labels == 3, 0, labels))


def test_an_edge_that_cannot_be_judged_is_kept():
    image, labels = hazy_field()
    packed = np.where(disc(image.shape, 30, 30, 16) & (labels == 0), 4, labels)  # id 1 enclosed by id 4
    assert label_edge_significance(packed, image)[0] == np.inf
    assert (label_edge_significance(labels, np.full(image.shape, 9.0)) == np.inf).all()  # no measurable noise


def test_the_exported_runner_judges_edges_as_the_package_does():
    from nucleus_seg.export.runner import edge_significance

    image, labels = hazy_field(seed=4)
    labels[100:120, 5:25] = 7  # a patch of plain background, and ids with gaps
    np.testing.assert_allclose(edge_significance(labels, image), label_edge_significance(labels, image), rtol=1e-4)
