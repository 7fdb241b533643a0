"""Nucleus outlines as Fiji and QuPath keep them, written and read: ImageJ ROI sets (``.zip``, the ROI Manager's)
and GeoJSON (QuPath's objects).

Outlines run along pixel edges, as ImageJ's wand traces them ("traced" ROIs): a polygon's area is its nucleus'
pixel count, so Fiji's Measure gives the areas of the measurements CSV (a polygon through pixel centres, as
Cellpose writes, is smaller by about half its perimeter). The corners come from OpenCV's contour of the mask
at twice the resolution, where boundary pixel column ``j`` is the pixel edge ``(j + 1) // 2``.

ROIs are named by label id (``0001``, ...: the ``id`` column of the measurements CSV). A nucleus in several pieces
(a higher-scoring one painted across it) gets its largest piece as its ImageJ ROI and every piece, holes included,
as a GeoJSON MultiPolygon; the label TIFF keeps every pixel either way.

Read back (:func:`read_outline_labels`: annotations drawn or corrected in Fiji or QuPath, as a dataset's labels),
each ROI or feature becomes one nucleus: the pixels whose centres lie inside its outline, as ImageJ fills a polygon
(exact for traced outlines, whose edges never cross a pixel centre); ovals are the ellipse in their box, judged at
pixel centres too.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from matplotlib.path import Path as PolygonPath
from scipy import ndimage

from .io import ImageReadError, read_label_image

__all__ = ["GEOJSON_ENDING", "OUTLINE_STEM_ENDINGS", "OUTLINE_SUFFIXES", "ROIS_ENDING", "decode_imagej_roi",
           "geojson_text", "imagej_roi", "imagej_roi_zip", "is_outline_file", "label_outlines", "polygon_area",
           "read_annotation", "read_outline_labels", "read_outline_shapes"]

logger = logging.getLogger(__name__)

Ring = np.ndarray  # (K, 2) int x, y pixel-corner coordinates, not closed (the last corner joins the first)
Piece = tuple[Ring, list[Ring]]  # an outer ring and its holes

IMAGEJ_MAX_COORDINATE = 32767  # ImageJ ROIs store bounds as signed 16-bit numbers
_ROI_VERSION = 228
_ROI_TRACED = 8  # the wand's type: integer corners along pixel edges
OUTLINE_SUFFIXES = (".zip", ".roi", ".geojson")  # annotation files read as label images
# what nucleus-predict adds to an image's stem for its outline files (``<stem>_rois.zip``, ``<stem>_nuclei.geojson``):
# matched back to the image by the stem without it, so corrected outputs are annotations as they are
ROIS_ENDING, GEOJSON_ENDING = "_rois", "_nuclei"
OUTLINE_STEM_ENDINGS = (ROIS_ENDING, GEOJSON_ENDING)
# ImageJ's ROI types with an area: polygon, rectangle, oval, freehand, traced (line and point types have none)
_ROI_POLYGONS, _ROI_RECT, _ROI_OVAL = (0, 7, 8), 1, 2
_ROI_SUB_PIXEL = 128  # options flag: float coordinates follow the integer ones


def _corner_rings(mask: np.ndarray) -> tuple[list[Ring], np.ndarray]:
    """Every ring of a binary mask (outer rings and holes) in pixel-corner coordinates, and OpenCV's hierarchy."""
    doubled = np.repeat(np.repeat(np.pad(mask.astype(np.uint8), 1), 2, axis=0), 2, axis=1)
    contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    rings = []
    for contour in contours:
        corners = (contour[:, 0, :] + 1) // 2 - 1  # the padding's pixel undone
        corners = corners[np.any(corners != np.roll(corners, 1, axis=0), axis=1)]  # repeated corners
        turning = np.any(np.roll(corners, 1, axis=0) - corners != corners - np.roll(corners, -1, axis=0), axis=1)
        rings.append(corners[turning])  # only where the outline turns
    return rings, (hierarchy[0] if hierarchy is not None else np.zeros((0, 4), np.int32))


def polygon_area(ring: Ring) -> float:
    """The area enclosed by a ring (shoelace formula), whatever its orientation."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def label_outlines(labels: np.ndarray) -> dict[int, list[Piece]]:
    """``{id: [(outer ring, [holes]), ...]}`` for every id of a label image, largest piece first; pixel-corner
    (x, y) coordinates of the whole image, pixel (r, c) being the square from (c, r) to (c + 1, r + 1)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label image must be 2-D, got shape {labels.shape}")
    outlines: dict[int, list[Piece]] = {}
    for index, window in enumerate(ndimage.find_objects(labels)):
        if window is None:
            continue
        label = index + 1
        rings, hierarchy = _corner_rings(labels[window] == label)
        offset = np.array([window[1].start, window[0].start])
        pieces = [(rings[k] + offset, [rings[h] + offset for h in np.flatnonzero(hierarchy[:, 3] == k)])
                  for k in np.flatnonzero(hierarchy[:, 3] < 0)]
        outlines[label] = sorted(pieces, key=lambda piece: -polygon_area(piece[0]))
    return outlines


def imagej_roi(ring: Ring, name: str) -> bytes:
    """One ImageJ "traced" polygon ROI (the ``.roi`` file format of ImageJ's RoiEncoder, big-endian), named."""
    left, top = (int(v) for v in ring.min(axis=0))
    right, bottom = (int(v) for v in ring.max(axis=0))
    if max(right, bottom) > IMAGEJ_MAX_COORDINATE:
        raise ValueError(f"ImageJ ROIs hold coordinates up to {IMAGEJ_MAX_COORDINATE}; this outline reaches "
                         f"({right}, {bottom}): write GeoJSON or the label image instead")
    n = len(ring)
    header = bytearray(64)
    header[0:4] = b"Iout"
    struct.pack_into(">hBx4hH", header, 4, _ROI_VERSION, _ROI_TRACED, top, left, bottom, right, n)
    header2_offset = 64 + 4 * n
    struct.pack_into(">i", header, 60, header2_offset)
    coordinates = np.concatenate([ring[:, 0] - left, ring[:, 1] - top]).astype(">i2").tobytes()
    encoded_name = name.encode("utf-16-be")
    header2 = bytearray(64)
    struct.pack_into(">ii", header2, 16, header2_offset + 64, len(name))  # name offset, length in characters
    return bytes(header) + coordinates + bytes(header2) + encoded_name


def imagej_roi_zip(outlines: dict[int, list[Piece]]) -> bytes:
    """An ImageJ ROI set (what Fiji's ROI Manager opens and saves): one ROI per nucleus, its largest piece, entries
    and ROIs named by zero-padded label id."""
    width = max(4, len(str(max(outlines, default=0))))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for label, pieces in sorted(outlines.items()):
            name = f"{label:0{width}d}"
            archive.writestr(f"{name}.roi", imagej_roi(pieces[0][0], name))
    return buffer.getvalue()


def _closed(ring: Ring) -> list[list[int]]:
    return np.concatenate([ring, ring[:1]]).tolist()


def geojson_text(outlines: dict[int, list[Piece]], scores: Sequence[float] | dict[int, float],
                 class_name: str = "Nucleus") -> str:
    """A GeoJSON FeatureCollection as QuPath imports it (File > Import objects, or drag and drop): one detection
    per nucleus, classified ``class_name``, named by label id, its score as a measurement; pixel coordinates."""
    features = []
    for label, pieces in sorted(outlines.items()):
        polygons = [[_closed(outer), *map(_closed, holes)] for outer, holes in pieces]
        geometry = ({"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1
                    else {"type": "MultiPolygon", "coordinates": polygons})
        score = scores[label] if isinstance(scores, dict) else scores[label - 1]
        features.append({"type": "Feature", "geometry": geometry, "properties": {
            "objectType": "detection", "name": str(label), "classification": {"name": class_name},
            "measurements": {"score": round(float(score), 6)}}})
    return json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))


# ---- reading ----------------------------------------------------------------------------------------

# ("polygon", (K, 2) corners), ("oval", [x0, y0, x1, y1]) or ("rings", [(K, 2) rings, ...]: a feature's outer rings
# and holes, even-odd), in pixel-corner x, y
Shape = tuple[str, "np.ndarray | list[np.ndarray]"]


def decode_imagej_roi(data: bytes, source: str) -> Shape:
    """One ``.roi`` file (ImageJ's RoiDecoder layout): a polygon, freehand, traced or rectangle ROI as its corners,
    an oval as its box. Line and point ROIs (no area) and composite ROIs are an ``ImageReadError``."""
    if len(data) < 64 or data[:4] != b"Iout":
        raise ImageReadError(f"{source}: not an ImageJ ROI (no 'Iout' header)")
    version, kind = struct.unpack_from(">hB", data, 4)
    top, left, bottom, right, n = struct.unpack_from(">4hH", data, 8)
    (shape_size,) = struct.unpack_from(">i", data, 36)
    (options,) = struct.unpack_from(">H", data, 50)
    if shape_size > 0:
        raise ImageReadError(f"{source}: a composite ROI (several shapes in one); split it in Fiji's ROI Manager "
                             "(More > Split) or export the annotation as a label image")
    sub_pixel = bool(options & _ROI_SUB_PIXEL) and version >= 222
    if kind in _ROI_POLYGONS:
        if len(data) < 64 + 4 * n:
            raise ImageReadError(f"{source}: ImageJ ROI cut short ({n} coordinates announced)")
        if sub_pixel and len(data) >= 64 + 12 * n:
            xy = np.frombuffer(data, ">f4", 2 * n, 64 + 4 * n).astype(np.float64)
        else:
            xy = np.frombuffer(data, ">i2", 2 * n, 64).astype(np.float64) + np.repeat([left, top], n)
        return "polygon", np.stack([xy[:n], xy[n:]], axis=1)
    box = np.array([left, top, right, bottom], np.float64)
    if sub_pixel and kind in (_ROI_RECT, _ROI_OVAL):
        x, y, w, h = struct.unpack_from(">4f", data, 18)
        box = np.array([x, y, x + w, y + h], np.float64)
    if kind == _ROI_RECT:
        x0, y0, x1, y1 = box
        return "polygon", np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    if kind == _ROI_OVAL:
        return "oval", box
    raise ImageReadError(f"{source}: ImageJ ROI of type {kind} (a line or points) has no area: outline nuclei "
                         "with the polygon, freehand, oval or wand tool")


def _imagej_shapes(path: Path) -> list[Shape]:
    if path.suffix.lower() == ".roi":
        return [decode_imagej_roi(path.read_bytes(), str(path))]
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ImageReadError(f"{path}: not an ImageJ ROI set ({exc})") from None
    with archive:
        names = [n for n in archive.namelist() if n.lower().endswith(".roi")]
        return [decode_imagej_roi(archive.read(n), f"{path}:{n}") for n in names]


def _geojson_shapes(path: Path) -> list[Shape]:
    """Every feature's polygons (holes kept as polygons to cut out): QuPath exports a FeatureCollection or a plain
    list of features; a cell's nucleus (``nucleusGeometry``) is taken over its cell outline."""
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ImageReadError(f"{path}: not GeoJSON ({exc})") from None
    features = found.get("features", [found]) if isinstance(found, dict) else found
    shapes: list[Shape] = []
    for k, feature in enumerate(features if isinstance(features, list) else []):
        geometry = feature.get("nucleusGeometry") or feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in ("Polygon", "MultiPolygon"):
            raise ImageReadError(f"{path}: feature {k} is a {kind or 'feature without geometry'}, not a "
                                 "(Multi)Polygon: every feature must outline one nucleus")
        polygons = [geometry["coordinates"]] if kind == "Polygon" else geometry["coordinates"]
        rings = [_open_ring(np.asarray(ring, np.float64)[:, :2]) for polygon in polygons for ring in polygon]
        shapes.append(("rings", rings))
    return shapes


def _open_ring(ring: np.ndarray) -> np.ndarray:
    """A GeoJSON ring without its closing corner (GeoJSON repeats the first; ImageJ's and ours do not)."""
    return ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring


def _inside(shape: Shape, height: int, width: int) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The window of the image a shape covers and which of its pixels' centres lie inside (None: off the image)."""
    kind, value = shape
    rings = value if kind == "rings" else [value]
    points = np.concatenate(rings) if kind != "oval" else value.reshape(2, 2)
    x0, y0 = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(points.max(axis=0)).astype(int), [width, height])
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    if kind == "oval":
        (bx0, by0), (bx1, by1) = value.reshape(2, 2)
        rx, ry = max((bx1 - bx0) / 2, 1e-9), max((by1 - by0) / 2, 1e-9)
        inside = ((xx - (bx0 + bx1) / 2) / rx) ** 2 + ((yy - (by0 + by1) / 2) / ry) ** 2 <= 1
    else:
        centres = np.stack([xx.ravel(), yy.ravel()], axis=1)
        inside = np.zeros(len(centres), bool)
        for ring in rings:  # even-odd: a hole (or a piece inside a hole) flips what it covers
            if len(ring) >= 3:
                inside ^= PolygonPath(ring).contains_points(centres)
        inside = inside.reshape(yy.shape)
    return (slice(y0, y1), slice(x0, x1)), inside


def read_outline_shapes(path: str | Path) -> list[Shape]:
    """Each ROI or feature of an annotation file (``.zip``, ``.roi``, ``.geojson``), in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTLINE_SUFFIXES:
        raise ImageReadError(f"{path}: not an outline file ({', '.join(OUTLINE_SUFFIXES)})")
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    return _geojson_shapes(path) if suffix == ".geojson" else _imagej_shapes(path)


def read_outline_labels(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A label image of ``shape`` from an annotation file: an ImageJ ROI set (``.zip``) or ROI (``.roi``), or a
    GeoJSON file (QuPath), one nucleus per ROI or feature, ids in file order. Where outlines overlap the later one
    keeps the pixels, with a warning naming the file; an outline wholly off the image is an error."""
    path = Path(path)
    shapes = read_outline_shapes(path)
    height, width = shape
    labels = np.zeros((height, width), np.int32)
    overlap = 0
    for k, outline in enumerate(shapes, start=1):
        found = _inside(outline, height, width)
        if found is None or not found[1].any():
            raise ImageReadError(f"{path}: outline {k} covers no pixel of the {width}x{height} image")
        window, inside = found
        overlap += int(np.count_nonzero(labels[window][inside]))
        labels[window][inside] = k
    if overlap:
        logger.warning("%s: outlines overlap on %d pixels; each went to the later outline", path, overlap)
    return labels


def is_outline_file(path: str | Path) -> bool:
    """Whether ``path`` names an outline file (an ImageJ ROI set or ROI, GeoJSON) rather than a label image."""
    return str(path).lower().endswith(OUTLINE_SUFFIXES)


def read_annotation(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A label image file as it is, or an outline file as the label image of an image of ``shape``."""
    return read_outline_labels(path, shape) if is_outline_file(path) else read_label_image(path)
