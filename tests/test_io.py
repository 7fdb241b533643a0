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
    with pytest.raises(io.ImageReadError, match=r"stack\.tif.*split a stack of planes"):
        io.check_image_shape(np.zeros((5, 16, 16, 2)), "stack.tif")


def test_tiff_metadata_says_which_axis_is_channels_and_a_stack_is_refused_by_what_it_holds(tmp_path):
    """An ImageJ or OME composite stores its channels first, (C, Y, X): with two channels it was refused as a
    z-stack. A real stack is still refused, saying what its planes are."""
    import tifffile

    rng = np.random.default_rng(0)
    planes = rng.integers(0, 4000, (2, 24, 32), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "composite.tif", planes, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "one_slice.tif", planes[None], imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "composite.ome.tif", planes, metadata={"axes": "CYX"})
    for name in ("composite.tif", "one_slice.tif", "composite.ome.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), np.moveaxis(planes, 0, -1), err_msg=name)
    tifffile.imwrite(tmp_path / "zstack.tif", np.zeros((5, 2, 24, 32), np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    with pytest.raises(ImageReadError, match=r"zstack\.tif: a stack of 2-D images \(5 z-slices; axes ZCYX"):
        read_image(tmp_path / "zstack.tif")
    tifffile.imwrite(tmp_path / "movie.tif", np.zeros((3, 24, 32), np.uint16), imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(ImageReadError, match=r"movie\.tif: a stack of 2-D images \(3 time points"):
        read_image(tmp_path / "movie.tif")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((24, 32, 3), np.uint8))  # samples last: as before
    assert read_image(tmp_path / "rgb.tif").shape == (24, 32, 3)


def test_the_nuclear_channel_of_a_composite_is_read_alone():
    """A nuclear stain with a cytoplasm marker: every channel at once reads the cytoplasm as nuclei too; the
    chosen channel is normalised exactly as that channel saved on its own."""
    yy, xx = np.mgrid[:64, :64]
    nuclei = np.where((yy - 20) ** 2 + (xx - 20) ** 2 < 36, 3000, 200).astype(np.uint16)
    cytoplasm = np.where((yy - 40) ** 2 + (xx - 44) ** 2 < 300, 5000, 100).astype(np.uint16)
    composite = np.stack([cytoplasm, nuclei], axis=-1)
    np.testing.assert_array_equal(normalize_image(composite, channel=1), normalize_image(nuclei))
    assert normalize_image(composite)[44, 44, 0] == 255  # every channel: the cytoplasm is as bright as nuclei
    assert normalize_image(composite, channel=1)[44, 44, 0] == 0
    with pytest.raises(ValueError, match=r"has 2 channels \(0-1\): it has no channel 2"):
        normalize_image(composite, channel=2)
    with pytest.raises(ValueError, match=r"has 1 channel \(0-0\): it has no channel 1"):
        normalize_image(nuclei, channel=1)
    np.testing.assert_array_equal(normalize_image(nuclei, channel=0), normalize_image(nuclei))



def test_a_fourth_channel_is_data_unless_it_is_an_opaque_alpha(tmp_path, caplog):
    """A four-channel composite with the nuclear stain last: the default max over channels reads it (the first
    three alone missed it), and the measurements get four intensity columns. An opaque alpha (constant) is
    dropped wherever the image comes from; a PNG's alpha always; a TIFF's alpha-tagged 4th channel that varies is
    kept, with a warning (tifffile tags any 4-channel array as RGBA)."""
    import logging

    import cv2
    import tifffile

    from nucleus_seg.inference.outputs import measure

    yy, xx = np.mgrid[:48, :48]
    nuclei = np.where((yy - 20) ** 2 + (xx - 20) ** 2 < 36, 3000, 200).astype(np.uint16)
    markers = [np.full_like(nuclei, 300) for _ in range(3)]
    composite = np.stack([*markers, nuclei], axis=-1)
    assert normalize_image(composite)[20, 20, 0] == 255 and normalize_image(composite)[40, 40, 0] < 128
    np.testing.assert_array_equal(normalize_image(composite, channel=3), normalize_image(nuclei))
    labels = ((yy - 20) ** 2 + (xx - 20) ** 2 < 36).astype(np.int32)
    header, rows = measure(labels, composite, [0.9])
    assert [h for h in header if h.startswith("mean_intensity")] == [f"mean_intensity_c{c}" for c in range(4)]
    assert rows[0][header.index("mean_intensity_c3")] == 3000

    opaque = np.dstack([nuclei, nuclei, nuclei, np.full_like(nuclei, 65535)])
    assert io.check_image_shape(opaque).shape == (48, 48, 3)
    np.testing.assert_array_equal(normalize_image(opaque), normalize_image(nuclei))
    assert len(measure(labels, opaque, [0.9])[0]) == len(measure(labels, composite[..., :3], [0.9])[0])

    png = tmp_path / "rgba.png"
    alpha = np.where(xx < 24, 255, 128).astype(np.uint8)  # a PNG's alpha, varying: transparency, never a stain
    cv2.imwrite(str(png), np.dstack([np.full((48, 48, 3), 9, np.uint8), alpha]))
    assert read_image(png).shape == (48, 48, 3) and (read_image(png) == 9).all()

    tagged, imagej = tmp_path / "tagged.tif", tmp_path / "imagej.tif"
    tifffile.imwrite(tagged, composite)  # photometric RGB, 4th sample tagged as alpha
    tifffile.imwrite(imagej, np.moveaxis(composite, -1, 0), imagej=True, metadata={"axes": "CYX"})
    for path, warned in ((tagged, True), (imagej, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nucleus_seg.data.io"):
            np.testing.assert_array_equal(read_image(path), composite)
        assert (f"{path}: its 4th channel is tagged as alpha but varies" in caplog.text) is warned
    tifffile.imwrite(tagged, opaque)
    np.testing.assert_array_equal(read_image(tagged), opaque[..., :3])


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


def test_pixel_size_comes_from_imagej_or_ome_metadata_and_never_from_a_dpi(tmp_path):
    import cv2
    import tifffile

    image = np.zeros((20, 30), np.uint16)
    written = {
        "micron.tif": dict(imagej=True, resolution=(1 / 0.1625, 1 / 0.1625), metadata={"unit": "micron"}),
        "escaped.tif": dict(imagej=True, resolution=(1 / 0.5, 1 / 0.25), metadata={"unit": "\\u00B5m"}),
        "nm.tif": dict(imagej=True, resolution=(1 / 325, 1 / 325), metadata={"unit": "nm"}),
        "ome.ome.tif": dict(ome=True, metadata={"PhysicalSizeX": 0.65, "PhysicalSizeY": 0.7}),
        "ome_nm.ome.tif": dict(ome=True, metadata={"PhysicalSizeX": 100, "PhysicalSizeXUnit": "nm",
                                                   "PhysicalSizeY": 100, "PhysicalSizeYUnit": "nm"}),
        "uncalibrated.tif": dict(imagej=True, resolution=(1, 1)),
        "dpi.tif": dict(resolution=(72, 72), resolutionunit="INCH"),
        "plain.tif": {},
    }
    for name, kwargs in written.items():
        tifffile.imwrite(tmp_path / name, image, **kwargs)
    cv2.imwrite(str(tmp_path / "image.png"), image)
    found = {name: io.pixel_size_um(tmp_path / name) for name in [*written, "image.png"]}
    assert found["micron.tif"] == pytest.approx((0.1625, 0.1625))
    assert found["escaped.tif"] == pytest.approx((0.25, 0.5))  # (y, x): ImageJ's x resolution was 1 / 0.5
    assert found["nm.tif"] == pytest.approx((0.325, 0.325))
    assert found["ome.ome.tif"] == pytest.approx((0.7, 0.65))
    assert found["ome_nm.ome.tif"] == pytest.approx((0.1, 0.1))
    assert [found[n] for n in ("uncalibrated.tif", "dpi.tif", "plain.tif", "image.png")] == [None] * 4
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    assert io.pixel_size_um(tmp_path / "broken.tif") is None  # read_image is what reports a broken file
