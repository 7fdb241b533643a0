"""Reader for label TIFFs (``*_labels.tif`` as nucleus-predict writes them, label stacks too, the sample's
``labels.tif``): opened as a Labels layer, not as an image; and for nucleus outlines (Fiji ROI sets, QuPath
GeoJSON, nucleus-predict's ``_rois.zip`` / ``_nuclei.geojson``): opened as a Shapes layer over the image.
Anything else is left to other readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from ..data.io import ImageReadError, read_label_image
from ..data.outlines import is_outline_file, read_outline_shapes
from ..utils.files import TIFF_SUFFIXES


def _is_label_tiff(path: str) -> bool:
    if not path.lower().endswith(TIFF_SUFFIXES) or not Path(path).is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = [s for s in series.shape if s != 1]  # 2-D, or a stack of label planes (T and/or Z)
            return 2 <= len(shape) <= 4 and np.dtype(series.dtype).kind in "ui"
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can read: another reader's business
        return False


def _is_outline_file(path: str) -> bool:
    if not is_outline_file(path) or not Path(path).is_file():
        return False
    try:
        shapes = read_outline_shapes(path)  # JSON of anything but outlines is not ours
    except (ImageReadError, OSError, ValueError):
        return False
    return bool(shapes) or not path.lower().endswith(".zip")  # nor is a zip without ROIs


def napari_get_reader(path: str | list[str]):
    """npe2 reader hook: :func:`read_labels` when every path is a 2-D integer TIFF, :func:`read_outlines` when every
    path is an outline file, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if paths and all(_is_label_tiff(str(p)) for p in paths):
        return read_labels
    if paths and all(_is_outline_file(str(p)) for p in paths):
        return read_outlines
    return None


def _napari_vertices(corners: np.ndarray) -> np.ndarray:
    """Pixel-corner (x, y) to napari's (row, column), where pixel (r, c) is centred on (r, c)."""
    return np.asarray(corners, np.float64)[:, ::-1] - 0.5


def read_outlines(path: str | list[str]) -> list[tuple]:
    """One Shapes layer per file: each ROI or feature's outline (every ring of a GeoJSON feature; an oval as an
    ellipse), unfilled, with its nucleus' number (file order) as a feature."""
    layers = []
    for p in [path] if isinstance(path, str) else list(path):
        data, kinds, numbers = [], [], []
        for number, (kind, value) in enumerate(read_outline_shapes(p), start=1):
            if kind == "oval":
                x0, y0, x1, y1 = value
                rings, shape_type = [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])], "ellipse"
            else:
                rings, shape_type = (value if kind == "rings" else [value]), "polygon"
            for ring in rings:
                data.append(_napari_vertices(ring))
                kinds.append(shape_type)
                numbers.append(number)
        meta = {"name": Path(p).stem, "shape_type": kinds, "edge_color": "yellow", "face_color": "transparent",
                "edge_width": 1, "features": {"nucleus": numbers}}
        layers.append((data, meta, "shapes"))
    return layers


def read_labels(path: str | list[str]) -> list[tuple]:
    """One Labels layer per file, named by the file; a label stack (``nucleus-predict`` on a time-lapse or z-stack)
    as an N-D layer with a slider per plane axis."""
    paths = [path] if isinstance(path, str) else list(path)
    layers = []
    for p in paths:
        planes, axes = _label_array(p)
        layers.append((planes, {"name": Path(p).stem, "metadata": {"axes": axes}}, "labels"))
    return layers


def _label_array(path: str) -> tuple[np.ndarray, str]:
    """The label image or stack, and its axes (``"YX"``, ``"TYX"``, ...: the writer saves a stack with them)."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        kept = [k for k, size in enumerate(series.shape) if size != 1]
        if len(kept) > 2:  # a stack of label planes
            planes = series.asarray().reshape([series.shape[k] for k in kept])
            return planes, "".join(series.axes[k] for k in kept)
    return read_label_image(path), "YX"
