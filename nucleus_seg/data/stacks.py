"""Stacks of 2-D planes (time-lapses, z-stacks, ImageJ hyperstacks) for ``nucleus-predict``: each plane is cut out
as an image of its own, so every plane gets every output a single image gets, and the planes' label images are put
back together as one label stack with the stack's axes.

The model is 2-D: each plane is segmented alone, its nuclei numbered from 1; nothing links a nucleus across time
points or z-slices (no tracking, no 3-D stitching).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from ..utils.files import TIFF_SUFFIXES, atomic_path
from .io import PLANE_AXES, pixel_size_um, squeeze_axes, stack_axes

__all__ = ["PlaneStack", "plane_stem", "split_stack", "stack_planes"]


@dataclass
class PlaneStack:
    """A stack cut into plane files: ``axes`` (tifffile's letters, e.g. ``"T"`` or ``"TZ"``) of ``sizes``, and the
    plane files in C order over them."""

    path: Path
    axes: str
    sizes: tuple[int, ...]
    planes: list[Path]

    @property
    def stem(self) -> str:
        return self.path.stem


def stack_planes(path: str | os.PathLike) -> tuple[str, tuple[int, ...]] | None:
    """The plane axes and their sizes of a TIFF holding more than one 2-D plane (from its header, no pixels read);
    None for any other file."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file():
        return None
    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: the image reader reports it
        return None
    planes = stack_axes(shape, axes)
    if not planes:
        return None
    return "".join(a for a, _ in planes), tuple(s for _, s in planes)


def plane_stem(stem: str, axes: str, index: tuple[int, ...], sizes: tuple[int, ...]) -> str:
    """``movie`` plane (3,) of a 12-frame T stack: ``movie_t03`` (zero-padded to the axis' size)."""
    digits = [len(str(size - 1)) for size in sizes]
    return stem + "_" + "".join(f"{axis.lower()}{i:0{d}d}" for axis, i, d in zip(axes, index, digits))


def split_stack(path: str | os.PathLike, folder: str | os.PathLike) -> PlaneStack:
    """Write each plane of the stack at ``path`` to ``folder`` as a TIFF (channels kept, as an ImageJ composite;
    the stack's pixel size kept) named by :func:`plane_stem`."""
    path, folder = Path(path), Path(folder)
    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        image, axes = series.asarray(), series.axes
    image, axes = squeeze_axes(image, axes)
    plane_axes = "".join(a for a in axes if a in PLANE_AXES)
    rest = "".join(a for a in axes if a not in PLANE_AXES)  # e.g. "YX", "CYX", "YXS"
    image = np.transpose(image, [axes.index(a) for a in plane_axes + rest])
    sizes = image.shape[:len(plane_axes)]
    pixel_size = pixel_size_um(path)
    calibration = {} if pixel_size is None else {"resolution": (1 / pixel_size[1], 1 / pixel_size[0])}
    imagej = rest in ("YX", "CYX") and image.dtype in (np.uint8, np.uint16, np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    planes = []
    for index in np.ndindex(*sizes):
        target = folder / f"{plane_stem(path.stem, plane_axes, index, sizes)}{path.suffix}"
        with atomic_path(target) as tmp:
            if imagej:
                tifffile.imwrite(tmp, image[index], imagej=True, metadata={
                    "axes": rest, **({"unit": "um"} if pixel_size else {})}, **calibration)
            else:  # RGB (YXS) or a type ImageJ has not: a plain TIFF, read as the stack's planes are
                tifffile.imwrite(tmp, image[index], photometric="rgb" if rest == "YXS" else None)
        planes.append(target)
    return PlaneStack(path, plane_axes, tuple(sizes), planes)
