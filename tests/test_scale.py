"""The input scale: the image-only diameter estimate and how "auto" chooses between passes."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import SAMPLE_DIR

from nucleus_seg.data.io import normalize_image, read_image, read_label_image
from nucleus_seg.data.transforms import FastResizeTransform, median_diameter
from nucleus_seg.inference.masks import Detections
from nucleus_seg.inference.scale import choose_scale, image_diameter, parse_diameter


@pytest.mark.parametrize("zoom", [0.25, 0.33, 0.5, 0.7, 1, 1.4, 2, 3, 5])
def test_the_image_alone_gives_the_nucleus_size_at_every_magnification(zoom):
    """Where the model is lost (x5: confident texture pieces; ~12 px widefield nuclei), the blobs' own scale
    is within 20% of the labels' median diameter (x0.25-x5 of the real sample)."""
    image, labels = read_image(SAMPLE_DIR / "image.tif"), read_label_image(SAMPLE_DIR / "labels.tif")
    h, w = labels.shape
    resize = FastResizeTransform(h, w, round(h * zoom), round(w * zoom))
    truth = median_diameter(np.bincount(resize.apply_segmentation(labels).ravel())[1:])
    found = image_diameter(normalize_image(resize.apply_image(image.astype(np.float32)))[..., 0])
    assert found == pytest.approx(truth, rel=0.2)


def _shot_noise(image: np.ndarray, photons: float = 25.0, seed: int = 0) -> np.ndarray:
    """The robustness suite's SNR-5 exposure: bright nuclei at 25 photons, read noise 2 counts, offset 10."""
    rng = np.random.default_rng(seed)
    unit = np.clip(image.astype(np.float32) / float(np.percentile(image, 99.9)), 0, None)
    return np.clip(rng.poisson(unit * photons) + rng.normal(0, 2.0, unit.shape) + 10, 0, None).astype(np.uint16)


def test_shot_noise_does_not_shrink_the_size_to_the_speckles():
    """At SNR 5 the speckles used to outvote the nuclei (real sample: 2.8 px for 23.7); responses the local
    noise alone could give no longer vote. On a synthetic field (where the noise test was chosen) and on the
    real sample, the noisy estimate stays within 20% of the labels' median."""
    from nucleus_seg.data.synth import generate_image, image_rng

    synthetic, synthetic_labels = generate_image(image_rng(777, 5, 13), 512, "fluorescence", 16)
    real, real_labels = read_image(SAMPLE_DIR / "image.tif"), read_label_image(SAMPLE_DIR / "labels.tif")
    for image, labels in ((synthetic, synthetic_labels), (real, real_labels)):
        truth = median_diameter(np.bincount(labels.ravel())[1:])
        clean = image_diameter(normalize_image(image)[..., 0])
        noisy = image_diameter(normalize_image(_shot_noise(image))[..., 0])
        assert noisy == pytest.approx(truth, rel=0.2) and noisy == pytest.approx(clean, rel=0.2)


def test_a_flat_image_has_no_size():
    assert image_diameter(np.full((64, 64), 7, np.uint8)) is None


def _detections(diameter: float | None, count: int = 20, score: float = 0.95) -> list[Detections]:
    """``count`` round instances of ``diameter`` px (in the input image's frame), as a pass returns them."""
    if diameter is None:
        count = 0
    side = int(math.ceil(diameter or 1)) + 2
    windows = torch.zeros((count, side, side), dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    if count:
        r = diameter / 2
        windows[:] = (yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2 <= r * r
    zeros = torch.zeros(count, dtype=torch.long)
    return [Detections((512, 512), torch.zeros((count, 4)), torch.full((count,), score), zeros, windows, zeros,
                       zeros)]


def _model(sees):
    """A stand-in for a model trained at one size: ``sees(scale)`` is the diameter (input px) it reports."""
    calls = []

    def run_pass(scale):
        calls.append(scale)
        return _detections(sees(scale))

    return run_pass, calls


def test_texture_that_looks_consistent_upscaled_loses_to_the_image_s_own_blob_size():
    """Nuclei of 118 px (the sample at x5) and a model trained at 40: at its own scale it reads texture as
    15 px nuclei, and upscaled x2.7 that texture still looks like 15 px nuclei, the right size for the model.
    The image's blobs (108 px) decide: the pass at x0.37 sees the real nuclei at the training size."""
    run_pass, calls = _model(lambda s: 118.0 if s < 0.6 else 15.0)
    choice, _ = choose_scale(run_pass, run_pass(1.0), 0.9, 40.0, image_d=108.0, name="x5.tif")
    assert choice.sure and choice.diameter == pytest.approx(118.0, rel=0.05)
    assert choice.scale == pytest.approx(40 / 118, rel=0.12)


def test_small_nuclei_are_upscaled_as_far_as_they_need_no_hidden_clip():
    """~8 px nuclei and a 40 px model: x5, past the old [0.25, 4] clip (which left every widefield image off
    the model's size band); the model finds nothing at x1, the image says 8 px, the pass at x5 confirms."""
    run_pass, calls = _model(lambda s: 8.0 if s > 3 else None)
    choice, _ = choose_scale(run_pass, run_pass(1.0), 0.9, 40.0, image_d=8.5, name="widefield.tif")
    assert choice.sure and choice.scale == pytest.approx(5.0, rel=0.1)


def test_nothing_anywhere_is_a_warning_that_names_the_image():
    run_pass, calls = _model(lambda s: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice, _ = choose_scale(run_pass, run_pass(1.0), 0.9, 40.0, image_d=None, name="haze_03.tif")
    assert not choice.sure and choice.scale == 1.0 and choice.diameter is None
    assert len(caught) == 1 and "haze_03.tif" in str(caught[0].message) and "--diameter" in str(caught[0].message)
    assert calls == [1.0, 2.0, 0.5]  # probed larger and smaller before giving up


def test_a_pass_that_found_mostly_noise_found_no_nuclei():
    """A field of specks alone: the image's blobs say 5.7 px, and at x5.7 (as at x1) the model reads magnified
    camera noise as nuclei of a consistent-looking size. When the significance rule would drop most of a pass's
    confident instances, that pass found nothing: no scale is trusted, the image is predicted as it is, and the
    warning says what the passes found."""
    run_pass, calls = _model(lambda s: 32.0 / s)  # 'nuclei' of the training size at every scale: grains
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice, _ = choose_scale(run_pass, run_pass(1.0), 0.9, 32.0, image_d=5.7, name="debris.tif",
                                 noise_share=lambda dets: 0.98)
    assert not choice.sure and choice.scale == 1.0
    assert calls == [1.0, pytest.approx(32 / 5.7)]
    assert "debris.tif" in str(caught[0].message) and "only noise" in str(caught[0].message)
    # the same passes with nuclei that stand out: trusted as before
    run_pass, calls = _model(lambda s: 5.7 if s > 3 else None)
    choice, _ = choose_scale(run_pass, run_pass(1.0), 0.9, 32.0, image_d=5.7, name="small.tif",
                             noise_share=lambda dets: 0.1)
    assert choice.sure and choice.scale == pytest.approx(32 / 5.7, rel=0.05)


def test_agreeing_model_and_image_cost_no_extra_pass():
    run_pass, calls = _model(lambda s: 40.0 / s)  # a model that sizes the nuclei right at any scale
    choice, _ = choose_scale(run_pass, run_pass(1.0), 0.9, 40.0, image_d=38.0, name="ok.tif")
    assert choice.sure and choice.scale == 1.0 and calls == [1.0]


def test_the_user_s_diameter_always_wins():
    assert parse_diameter("23") == 23.0 and parse_diameter(0) == 0.0
    assert parse_diameter("auto") is None and parse_diameter(-1) is None
    for bad in ("big", -3, "nan"):
        with pytest.raises(ValueError, match="diameter must be"):
            parse_diameter(bad)
