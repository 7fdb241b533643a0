"""Fuzzing the way in: random bytes, shapes and dtypes into the image and label readers and the training
mapper. Whatever arrives, the answer is an image, or one of nucleus_seg's own errors naming the file (never
a numpy, OpenCV, tifffile or detectron2 exception from deep inside)."""

from __future__ import annotations

import itertools

import numpy as np
import tifffile
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.data.io import ImageReadError, normalize_image, read_image, read_label_image, read_mask
from nucleus_seg.data.mapper import AnnotationError, NucleusDatasetMapper

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"BM", b"\xff\xd8\xff\xe0"]
SUFFIXES = [".png", ".tif", ".tiff", ".jpg", ".bmp"]
DTYPES = [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.uint32, np.int64, np.float16, np.float32,
          np.float64, np.bool_, np.complex64]
_names = itertools.count()


def _fresh(folder, suffix):
    return folder / f"f{next(_names)}{suffix}"


def _accepted_or_named(fn, path):
    """``fn(path)``: a numpy array, or ImageReadError naming ``path``."""
    try:
        out = fn(path)
    except ImageReadError as exc:
        assert str(path) in str(exc), exc
        return None
    assert isinstance(out, np.ndarray)
    return out


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=300), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_are_read_or_refused_naming_the_file(tmp_path, magic, body, suffix):
    path = _fresh(tmp_path, suffix)
    path.write_bytes(magic + body)
    for reader in (read_image, read_label_image, read_mask):
        _accepted_or_named(reader, path)


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), special=st.booleans())
def test_random_arrays_are_read_or_refused_naming_the_file(tmp_path, shape, dtype, seed, special):
    rng = np.random.default_rng(seed)
    data = (rng.normal(0, 1000, shape)).astype(dtype)
    if special and np.issubdtype(np.dtype(dtype), np.floating):
        data.flat[0] = np.nan
    path = _fresh(tmp_path, ".tif")
    try:
        tifffile.imwrite(path, data)
    except Exception:  # noqa: BLE001 - tifffile cannot store it: not an input anyone can have
        assume(False)
    image = _accepted_or_named(read_image, path)
    if image is not None:  # what the reader accepts, the normalisation turns into the model's input
        out = normalize_image(image)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    label = _accepted_or_named(read_label_image, path)
    if label is not None:
        assert label.ndim == 2 and label.dtype.kind == "i" and (label.size == 0 or label.min() >= 0)


segmentations = st.one_of(
    st.none(),
    st.integers(),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=8).map(lambda p: [p]),
    st.fixed_dictionaries({"size": st.lists(st.integers(0, 40), min_size=2, max_size=2),
                           "counts": st.one_of(st.text(max_size=12), st.lists(st.integers(-5, 900), max_size=6))}),
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segms=st.lists(segmentations, max_size=4), height=st.integers(8, 40), width=st.integers(8, 40),
       claimed=st.booleans())
def test_the_mapper_takes_any_annotation_or_names_the_file(tmp_path, segms, height, width, claimed):
    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_cpu_demo.yaml", ["INPUT.NUCLEUS.CROP_SIZE", "32"])
    mapper = NucleusDatasetMapper(cfg, is_train=True)
    path = _fresh(tmp_path, ".tif")
    tifffile.imwrite(path, np.random.default_rng(height).integers(0, 4000, (height, width), dtype=np.uint16))
    record = {"file_name": str(path), "height": height + (3 if claimed else 0), "width": width,
              "annotations": [{"segmentation": s, "bbox": [0, 0, 4, 4], "bbox_mode": 1, "category_id": 0}
                              for s in segms]}
    try:
        out = mapper(record)
    except (AnnotationError, ImageReadError) as exc:
        assert str(path) in str(exc), exc
        return
    assert not claimed and out["image"].shape[1:] == (32, 32)
