"""Nucleus outlines for Fiji and QuPath: an ImageJ ROI set (``.zip`` for the ROI Manager) and GeoJSON.

Outlines run along pixel edges, as ImageJ's wand traces them ("traced" ROIs): a polygon's area is its nucleus'
pixel count, so Fiji's Measure gives the areas of the measurements CSV (a polygon through pixel centres, as
Cellpose writes, is smaller by about half its perimeter). The corners come from OpenCV's contour of the mask
at twice the resolution, where boundary pixel column ``j`` is the pixel edge ``(j + 1) // 2``.

ROIs are named by label id (``0001``, ...: the ``id`` column of the measurements CSV). A nucleus in several pieces
(a higher-scoring one painted across it) gets its largest piece as its ImageJ ROI and every piece, holes included,
as a GeoJSON MultiPolygon; the label TIFF keeps every pixel either way.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage

__all__ = ["geojson_text", "imagej_roi", "imagej_roi_zip", "label_outlines", "polygon_area"]

Ring = np.ndarray  # (K, 2) int x, y pixel-corner coordinates, not closed (the last corner joins the first)
Piece = tuple[Ring, list[Ring]]  # an outer ring and its holes

IMAGEJ_MAX_COORDINATE = 32767  # ImageJ ROIs store bounds as signed 16-bit numbers
_ROI_VERSION = 228
_ROI_TRACED = 8  # the wand's type: integer corners along pixel edges


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
