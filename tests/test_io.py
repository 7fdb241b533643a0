"""Image reading and normalisation: the one path every image takes into the model."""

from __future__ import annotations

import numpy as np
import pytest

from nucleus_seg.data import io
from nucleus_seg.data.catalog import SAMPLE_DIR
from nucleus_seg.data.io import ImageReadError, normalize_image, read_image


@pytest.mark.parametrize("dtype,low,high", [(np.uint8, 0, 256), (np.uint16, 0, 4096), (np.uint16, 0, 65536),
                                            (np.int16, -500, 3000)])
def test_histogram_percentiles_equal_numpy(dtype, low, high):
    rng = np.random.default_rng(1)
    for shape in [(64, 48), (33, 17)]:
        data = rng.integers(low, high, size=shape).astype(dtype)
        for q in [(1.0, 99.8), (0.0, 100.0), (50.0, 50.0), (2.5, 97.5)]:
            assert np.allclose(io._histogram_percentiles(data, q), np.percentile(data.astype(np.float64), q))


def test_integer_lookup_path_matches_float_path():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 4096, size=(40, 50)).astype(np.uint16)
    fast = io.normalize_image(image)
    slow = io.normalize_image(image.astype(np.float32))  # float input takes np.percentile + arithmetic
    assert fast.shape == (40, 50, 3) and fast.dtype == np.uint8
    assert np.array_equal(fast, slow)


def test_rgba_and_gray_agree_and_bright_background_inverts():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 60, size=(32, 32)).astype(np.uint8)
    gray[8:16, 8:16] = 250  # a bright "nucleus"
    rgba = np.dstack([gray, gray // 2, gray // 3, np.full_like(gray, 255)])  # alpha must be ignored
    assert np.array_equal(io.normalize_image(gray), io.normalize_image(rgba))
    brightfield = 255 - gray
    out = io.normalize_image(brightfield)
    assert out[12, 12, 0] > out[0, 0, 0]  # inverted: nucleus bright again


def test_read_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(io.ImageReadError, match="broken.png"):
        io.read_image(bad)
    with pytest.raises(io.ImageReadError, match="missing.tif"):
        io.read_image(tmp_path / "missing.tif")
    with pytest.raises(io.ImageReadError, match="z-stacks"):
        io.check_image_shape(np.zeros((5, 16, 16, 2)), "stack.tif")



def test_nan_and_inf_pixels_are_left_out_not_blanking_the_image(tmp_path, caplog):
    """The sample as float32 with 5 NaN/Inf pixels of 262,144: the normalisation ignores them (it turned the
    whole image into NaN, and nucleus-predict found 0 nuclei instead of 97)."""
    import logging

    import tifffile

    raw = read_image(SAMPLE_DIR / "image.tif").astype(np.float32)
    spoilt = raw.copy()
    where = (np.array([5, 100, 200, 300, 400]), np.array([7, 50, 250, 260, 500]))
    spoilt[where] = [np.nan, np.inf, -np.inf, np.nan, np.nan]
    ref, out = normalize_image(raw), normalize_image(spoilt)
    changed = (out != ref).any(axis=2)
    assert changed.sum() <= 5 and (out[where] == 0).all()
    path = tmp_path / "spoilt.tif"
    tifffile.imwrite(path, spoilt)
    with caplog.at_level(logging.WARNING, logger="nucleus_seg.data.io"):
        read_image(path)
    assert str(path) in caplog.text and "5 of 262144 pixels are NaN/Inf" in caplog.text
    tifffile.imwrite(path, np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ImageReadError, match="every pixel is NaN"):
        read_image(path)
