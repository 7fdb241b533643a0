"""Sample data: the real DSB-2018 image shipped with the package (BSD-3) and its ground truth."""

from __future__ import annotations

from pathlib import Path

from ..data.io import read_image, read_label_image

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"


def dsb_sample() -> list[tuple]:
    """The image, and its ground-truth labels as a hidden layer to compare with."""
    return [
        (read_image(SAMPLE_DIR / "image.tif"), {"name": "DSB-2018 sample"}, "image"),
        (read_label_image(SAMPLE_DIR / "labels.tif"), {"name": "DSB-2018 ground truth", "visible": False}, "labels"),
    ]
