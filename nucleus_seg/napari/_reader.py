"""Reader for label TIFFs (``*_labels.tif`` as nucleus-predict writes them, the sample's ``labels.tif``):
opened as a Labels layer, not as an image. Anything that is not a 2-D integer TIFF is left to other readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from ..data.io import read_label_image

SUFFIXES = (".tif", ".tiff")


def _is_label_tiff(path: str) -> bool:
    if not path.lower().endswith(SUFFIXES) or not Path(path).is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = [s for s in series.shape if s != 1]
            return len(shape) == 2 and np.dtype(series.dtype).kind in "ui"
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can read: another reader's business
        return False


def napari_get_reader(path: str | list[str]):
    """npe2 reader hook: :func:`read_labels` when every path is a 2-D integer TIFF, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if paths and all(_is_label_tiff(str(p)) for p in paths):
        return read_labels
    return None


def read_labels(path: str | list[str]) -> list[tuple]:
    """One Labels layer per file, named by the file."""
    paths = [path] if isinstance(path, str) else list(path)
    return [(read_label_image(p), {"name": Path(p).stem}, "labels") for p in paths]
