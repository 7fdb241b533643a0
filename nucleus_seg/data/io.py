"""Reading microscopy images and label images, and mapping them to the model's input.

Shared by the mapper (training), the predictor (inference) and the evaluator, so that an image is
normalised the same way everywhere.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from ..utils.files import TIFF_SUFFIXES

logger = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image or mask could not be read or has an unusable shape; the message names the file."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as stored: HxW or HxWxC (C in 1-4), any integer or float dtype, without alpha.

    PNG/JPEG/BMP via OpenCV (unchanged depth, RGB channel order, alpha dropped), TIFF via tifffile (a fourth
    channel kept unless it is constant: see ``drop_opaque_alpha``).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            image = _read_tiff(path)
        else:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is not None and image.ndim == 3:
                # four channels from PNG/BMP are always colour and alpha (gray + alpha too, as OpenCV reads it)
                code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
                image = cv2.cvtColor(image, code)
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile/cv2 raise many types for corrupt files
        raise ImageReadError(f"{path}: cannot be read as an image ({exc})") from exc
    if image is None or image.size == 0:
        raise ImageReadError(f"{path}: cannot be read as an image (corrupt or unsupported format)")
    image = check_image_shape(image, path)
    if image.dtype.kind not in "biuf":
        raise ImageReadError(f"{path}: pixel type {image.dtype} is not an intensity image (integer or float)")
    bad = _non_finite_pixels(image)
    if bad is not None:
        count = int(np.count_nonzero(bad))
        if count == bad.size:
            raise ImageReadError(f"{path}: every pixel is NaN or Inf")
        logger.warning("%s: %d of %d pixels are NaN/Inf; they are left out of the normalisation and read as "
                       "background", path, count, bad.size)
    return image


PLANE_AXES = {"Z": "z-slices", "T": "time points", "I": "planes"}  # tifffile's letters for a stack's planes


def squeeze_axes(image: np.ndarray, axes: str) -> tuple[np.ndarray, str]:
    """A TIFF series' ``image`` without its length-1 axes (Y and X always kept), and its axis letters to match."""
    kept = [k for k, size in enumerate(image.shape) if size > 1 or axes[k] in "YX"]
    return image.reshape([image.shape[k] for k in kept]), "".join(axes[k] for k in kept)


def stack_axes(shape: tuple[int, ...], axes: str) -> list[tuple[str, int]]:
    """The plane axes (z, time, generic planes) longer than 1 of a TIFF series, with their sizes: a stack of 2-D
    images where there are any."""
    return [(axis, size) for axis, size in zip(axes, shape) if axis in PLANE_AXES and size > 1]


def _read_tiff(path: Path) -> np.ndarray:
    """A TIFF's first series, channels last where its metadata (ImageJ, OME) names a channel axis, so a
    two-channel ImageJ composite (C, Y, X) reads as HxWx2. A stack of several 2-D planes (z-slices, time
    points) is refused with what its axes are: each plane is an image of its own (``nucleus-predict`` cuts stacks
    into their planes with :mod:`.stacks`)."""
    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        image, axes = series.asarray(), series.axes
        alpha_tag = bool(series.keyframe.extrasamples) and series.keyframe.extrasamples[-1] in (1, 2)
    if alpha_tag and image.ndim == 3 and image.shape[-1] == 4 and drop_opaque_alpha(image).shape[-1] == 4:
        logger.warning("%s: its 4th channel is tagged as alpha but varies, so it is read as a 4th image channel "
                       "(tifffile tags any 4-channel array so); if it is transparency, save the image without it",
                       path)
    image, axes = squeeze_axes(image, axes)
    if axes == "CYX":
        return np.moveaxis(image, 0, -1)
    planes = stack_axes(image.shape, axes)
    if planes:
        what = ", ".join(f"{size} {PLANE_AXES[axis]}" for axis, size in planes)
        raise ImageReadError(f"{path}: a stack of 2-D images ({what}; axes {axes}, shape {tuple(image.shape)}), "
                             "not one image: give it to nucleus-predict, which predicts each plane, or save each "
                             "plane as an image of its own (Fiji: Image > Stacks > Stack to Images)")
    return image


# a length unit as ImageJ ("micron", "\\u00B5m") and OME ("µm", "nm") write it, in micrometres
LENGTH_UNITS_UM = {"um": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0,
                   "micrometer": 1.0, "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
                   "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3}


def pixel_size_um(path: str | os.PathLike) -> tuple[float, float] | None:
    """A TIFF's (y, x) pixel size in micrometres, from its OME or ImageJ metadata (what Fiji's *Image > Properties*
    and Bio-Formats write); None for any other file, a TIFF without them, an uncalibrated ("pixel") one, or a
    plain TIFF's resolution tags alone (usually a scanner's or screenshot's DPI, not a microscope's)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    try:
        with tifffile.TiffFile(str(path)) as tif:
            if tif.is_ome and tif.ome_metadata:
                return _ome_pixel_size(tif.ome_metadata)
            if tif.is_imagej:
                unit = LENGTH_UNITS_UM.get(str((tif.imagej_metadata or {}).get("unit", "")).strip().lower())
                tags = tif.pages.first.tags
                if unit is None or "XResolution" not in tags or "YResolution" not in tags:
                    return None
                (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
                return _positive((unit * yd / yn, unit * xd / xn)) if xn and yn else None
    except Exception:  # noqa: BLE001 - metadata is a bonus: unreadable metadata is no metadata
        return None
    return None


def _ome_pixel_size(xml: str) -> tuple[float, float] | None:
    import xml.etree.ElementTree as ET

    pixels = next((e for e in ET.fromstring(xml).iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    sizes = []
    for axis in "YX":
        value = pixels.attrib.get(f"PhysicalSize{axis}", pixels.attrib["PhysicalSizeX"])
        unit = LENGTH_UNITS_UM.get(pixels.attrib.get(f"PhysicalSize{axis}Unit", "µm").strip().lower())
        if unit is None:
            return None
        sizes.append(float(value) * unit)
    return _positive(tuple(sizes))


def _positive(sizes: tuple[float, ...]) -> tuple[float, float] | None:
    return (float(sizes[0]), float(sizes[1])) if all(np.isfinite(sizes)) and min(sizes) > 0 else None


def check_image_shape(image: np.ndarray, source: str | os.PathLike = "<array>") -> np.ndarray:
    """Accept HxW or HxWxC with C<=4 (and drop singleton leading axes and an opaque alpha); refuse stacks."""
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] > 4:
        image = np.moveaxis(image, 0, -1)  # channel-first TIFF
    if image.ndim == 2 or (image.ndim == 3 and 1 <= image.shape[2] <= 4):
        return drop_opaque_alpha(image)
    raise ImageReadError(
        f"{source}: shape {image.shape} is not a 2-D image (HxW or HxWxC with C<=4): split a stack of planes "
        "(z-slices, time points) into 2-D images, and save channels last or as an ImageJ composite"
    )


def drop_opaque_alpha(image: np.ndarray) -> np.ndarray:
    """An HxWx4 image whose 4th channel is constant (an opaque alpha) as HxWx3, others unchanged.

    A constant channel carries no signal, and an alpha at its maximum would hide every nucleus under the
    max over channels; a 4th channel that varies is data (a four-channel composite) and is kept.
    """
    if image.ndim == 3 and image.shape[2] == 4:
        fourth = image[..., 3]
        if fourth.min() == fourth.max():
            return image[..., :3]
    return image


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label image (0 = background, k = instance k) as int32/int64, 2-D only."""
    label = read_image(path)
    if label.ndim == 3:
        channels = label[..., :3] if label.shape[2] >= 3 else label
        if label.shape[2] == 1 or all(np.array_equal(channels[..., 0], channels[..., c])
                                      for c in range(channels.shape[2])):
            label = label[..., 0]
        else:
            raise ImageReadError(
                f"{path}: label image has {label.shape[2]} different channels; expected one channel of "
                "instance ids (a 2-D label image)"
            )
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.mod(label, 1) == 0):
            raise ImageReadError(f"{path}: label image holds non-integer values")
        label = label.astype(np.int64)
    if label.dtype.kind == "i" and label.size and label.min() < 0:
        raise ImageReadError(f"{path}: label image holds negative ids (min {label.min()})")
    if label.dtype == np.uint64 and label.size and label.max() >= 2**63:
        raise ImageReadError(f"{path}: label ids above 2**63 are not supported")
    # uint32 ids above 2**31 would wrap negative in int32
    wide = label.dtype.itemsize > 4 or (label.dtype.kind == "u" and label.dtype.itemsize == 4)
    return label.astype(np.int64 if wide else np.int32, copy=False)


def select_channel(image: np.ndarray, channel: int) -> np.ndarray:
    """Channel ``channel`` of an HxW or HxWxC image as HxW (the image itself for -1, every channel)."""
    if channel < 0:
        return image
    count = 1 if image.ndim == 2 else image.shape[2]
    if channel >= count:
        raise ValueError(f"the image has {count} channel{'s' if count > 1 else ''} (0-{count - 1}): it has no "
                         f"channel {channel} (INPUT.NORMALIZE.CHANNEL, nucleus-predict --channel)")
    return image if image.ndim == 2 else np.ascontiguousarray(image[..., channel])


def to_gray(image: np.ndarray) -> np.ndarray:
    """Collapse every channel to one, in the input's dtype (an opaque alpha is dropped earlier).

    Max over channels, not luminance: a nucleus stain in any one channel stays bright.
    """
    if image.ndim == 2:
        return image
    out = image[..., 0]
    for c in range(1, image.shape[2]):
        out = np.maximum(out, image[..., c])
    return out


def _sorted_value(cumulative: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Value at 0-based ``rank`` of the sorted data, from cumulative histogram counts."""
    return np.searchsorted(cumulative, rank, side="right")


def _histogram_percentiles(data: np.ndarray, q: tuple[float, float]) -> tuple[float, float]:
    """``np.percentile`` (linear interpolation) of small-range integer data through one bincount:
    exact, and ~10x faster than sorting a 512x512 image."""
    offset = int(data.min())
    counts = np.bincount((data.astype(np.int64) - offset).ravel() if offset else data.ravel())
    cumulative = np.cumsum(counts)
    position = np.asarray(q, dtype=np.float64) / 100.0 * (data.size - 1)
    below = np.floor(position)
    lo_v = _sorted_value(cumulative, below)
    hi_v = _sorted_value(cumulative, np.minimum(below + 1, data.size - 1))
    values = lo_v + (position - below) * (hi_v - lo_v) + offset
    return float(values[0]), float(values[1])


def _non_finite_pixels(data: np.ndarray) -> np.ndarray | None:
    """HxW mask of pixels with a NaN/Inf in any channel; None when there are none (or data is integer)."""
    if data.dtype.kind != "f":
        return None
    bad = ~np.isfinite(data)
    if bad.ndim == 3:
        bad = bad.any(axis=2)
    return bad if bad.any() else None


def normalize_image(
    image: np.ndarray,
    method: str = "percentile",
    low: float = 1.0,
    high: float = 99.8,
    invert: str = "auto",
    gray: bool = True,
    channel: int = -1,
) -> np.ndarray:
    """Map any microscopy image to HxWx3 uint8, nuclei bright on dark.

    Percentile stretching makes 8-, 12- and 16-bit data and different exposures look alike, which is
    what lets one model serve them all. ``invert="auto"`` flips images whose background is brighter
    than their foreground (brightfield, H&E), judged by the median lying in the upper half. NaN/Inf
    pixels of float images are left out of the stretch and come out as background (0). ``channel`` >= 0:
    only that channel is read (the nuclear stain of a composite); a ``ValueError`` if the image lacks it.
    """
    image = select_channel(check_image_shape(np.asarray(image)), channel)
    bad = None
    if method == "none":
        if image.dtype != np.uint8:
            raise ValueError(f"normalisation 'none' needs uint8 input, got {image.dtype}")
        out = image if image.ndim == 3 else image[..., None]
        out = to_gray(out)[..., None] if gray else out[..., :3]
    else:
        data = to_gray(image) if gray else (image[..., :3] if image.ndim == 3 else image)
        # integer data of up to 16 bits: percentiles from a histogram and the stretch as a lookup table
        small_int = data.dtype.kind in "ui" and data.dtype.itemsize <= 2
        # NaN/Inf (dead pixels, masked regions of float images) would turn every percentile into NaN and the
        # whole image blank: the stretch is computed on the finite pixels and the others become background
        bad = _non_finite_pixels(data)
        values = data if bad is None else data[~bad]
        if values.size == 0:
            raise ValueError("the image has no finite pixel (all NaN or Inf)")
        if bad is not None:
            data = np.where(bad if data.ndim == 2 else bad[..., None], np.nanmin(values), data)
        if method == "percentile":
            lo, hi = _histogram_percentiles(data, (low, high)) if small_int else np.percentile(
                values.astype(np.float32), (low, high))
        elif method == "minmax":
            lo, hi = float(values.min()), float(values.max())
        else:
            raise ValueError(f"unknown normalisation method {method!r} (percentile, minmax, none)")
        if hi <= lo:
            hi = lo + 1.0

        def stretch(values: np.ndarray) -> np.ndarray:
            return (np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255) + 0.5).astype(np.uint8)

        if small_int:
            offset = int(np.iinfo(data.dtype).min)
            lut = stretch(np.arange(offset, offset + 2 ** (8 * data.dtype.itemsize), dtype=np.float32))
            out = lut[data.astype(np.int64) - offset] if offset else lut[data]
        else:
            out = stretch(data.astype(np.float32))
        if out.ndim == 2:
            out = out[..., None]
    # median of uint8 data > 127 <=> more than half the pixels are >= 128
    if invert == "always" or (invert == "auto" and np.count_nonzero(out >= 128) * 2 > out.size):
        out = 255 - out
    if bad is not None:
        out[bad] = 0  # background, dark after any flip
    if out.shape[2] == 1:  # OpenCV's copy: np.repeat took 3.7 ms of a 1024 px image on the GPU host's threads
        out = cv2.cvtColor(out[..., 0], cv2.COLOR_GRAY2RGB) if out.size else np.repeat(out, 3, axis=2)
    elif out.shape[2] == 2:
        out = np.concatenate([out, out[..., :1]], axis=2)
    return np.ascontiguousarray(out)


def normalize_from_cfg(image: np.ndarray, cfg) -> np.ndarray:
    """``normalize_image`` with the settings of ``cfg.INPUT.NORMALIZE``."""
    n = cfg.INPUT.NORMALIZE
    return normalize_image(image, n.METHOD, n.LOW, n.HIGH, n.INVERT, n.GRAY, n.CHANNEL)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read one binary instance mask as HxW bool: any nonzero value is foreground.

    Masks come stored as 0/255, 0/1, 1-bit or palette PNGs (and TIFFs). Palette PNGs are read as
    palette *indices* (via Pillow), so a palette whose index 0 is not black still gives the right mask;
    OpenCV would expand the palette to colours. Colour masks count a pixel whose RGB is nonzero.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        data = read_image(path)
    else:
        if not path.is_file():
            raise ImageReadError(f"{path}: no such file")
        try:
            with Image.open(path) as pil:
                data = np.asarray(pil)
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for corrupt PNGs
            raise ImageReadError(f"{path}: cannot be read as a mask image ({exc})") from exc
        if data.size == 0:
            raise ImageReadError(f"{path}: empty image")
        data = check_image_shape(data, path)
    if data.ndim == 3:
        data = data[..., 0] if data.shape[2] <= 2 else data[..., :3].any(axis=2)
    return data != 0
