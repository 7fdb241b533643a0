"""Prediction outputs: label TIFF, overlay PNG, measurements CSV, ImageJ ROIs and GeoJSON outlines
(:mod:`nucleus_seg.data.outlines`), Kaggle submission, COCO results.

Everything is written atomically (:func:`nucleus_seg.utils.files.atomic_path`), so an interrupted run
leaves either the old file or the new one, never half a file. All per-run formats
are derived from label images, so they agree with each other on instances and areas.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import tifffile
from pycocotools import mask as mask_util
from scipy import ndimage
from skimage.measure import regionprops_table

from ..data.io import ImageReadError, drop_opaque_alpha
from ..data.outlines import Piece, geojson_text, imagej_roi_zip
from ..structures import inner_boundaries
from ..utils.files import atomic_path, atomic_write
from ..utils.rle import Runs, coco_rle_counts, label_runs, rle_encode_labels

OUTLINE_RGB = (255, 255, 0)
SUBMISSION_HEADER = ("ImageId", "EncodedPixels")
# label TIFFs: zlib at level 3 took 3.3 ms for a 1024 px image of 300 nuclei (38 KB), the default level 6 8.0 ms (22 KB)
ZLIB_LEVEL = {"level": 3}


def _csv_text(header: Sequence[str] | None, rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


# ---- label image --------------------------------------------------------------------------------

def write_label_tiff(path: str | os.PathLike, labels: np.ndarray,
                     pixel_size: tuple[float, float] | None = None, axes: str = "YX") -> None:
    """Label image as uint16 ImageJ TIFF (Fiji, napari), or uint32 plain TIFF past 65535 instances; with the
    (y, x) ``pixel_size`` in micrometres of the image it labels (:func:`~nucleus_seg.data.io.pixel_size_um`), so
    Fiji opens it calibrated as that image. A stack of label planes names its axes in ImageJ's order (``"TYX"``,
    ``"ZYX"``, ``"TZYX"``): Fiji opens it as a hyperstack.

    ImageJ's format has no 32-bit integer type; Fiji and napari still open the uint32 file.
    """
    labels = np.asarray(labels)
    if labels.ndim != len(axes) or not axes.endswith("YX") or axes[:-2] not in ("", "T", "Z", "TZ"):
        raise ValueError(f"{path}: label image of shape {labels.shape} does not fit axes {axes!r} "
                         "(YX, after T and/or Z)")
    top = int(labels.max()) if labels.size else 0
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"{path}: label image holds negative ids")
    with atomic_path(path) as tmp:
        if top <= np.iinfo(np.uint16).max:
            calibration = {} if pixel_size is None else {"resolution": (1 / pixel_size[1], 1 / pixel_size[0])}
            tifffile.imwrite(tmp, labels.astype(np.uint16), imagej=True, compression="zlib", compressionargs=ZLIB_LEVEL,
                             metadata={"axes": axes, **({"unit": "um"} if pixel_size else {})}, **calibration)
        else:
            calibration = {} if pixel_size is None else {  # pixels per centimetre
                "resolution": (1e4 / pixel_size[1], 1e4 / pixel_size[0]), "resolutionunit": "CENTIMETER"}
            tifffile.imwrite(tmp, labels.astype(np.uint32), compression="zlib", compressionargs=ZLIB_LEVEL,
                             **calibration, **({"metadata": {"axes": axes}} if labels.ndim > 2 else {}))


# ---- overlay ------------------------------------------------------------------------------------

def overlay_image(image: np.ndarray, labels: np.ndarray,
                  color: tuple[int, int, int] = OUTLINE_RGB) -> np.ndarray:
    """HxWx3 uint8 RGB: the (normalised) image with every nucleus outlined."""
    image = np.asarray(image)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    rgb = image if image.ndim == 3 else image[..., None]
    rgb = np.ascontiguousarray(np.broadcast_to(rgb[..., :3], labels.shape + (3,)) if rgb.shape[2] == 1
                               else rgb[..., :3]).astype(np.uint8, copy=True)
    rgb[inner_boundaries(labels)] = color
    return rgb


def write_overlay_png(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray) -> None:
    """The outlined image as a PNG."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(overlay_image(image, labels), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write(path, buf.tobytes())


# ---- outlines -----------------------------------------------------------------------------------

def write_imagej_rois(path: str | os.PathLike, outlines: dict[int, list[Piece]]) -> None:
    """The nuclei as an ImageJ ROI set (``.zip``: Fiji's ROI Manager opens it), from
    :func:`~nucleus_seg.data.outlines.label_outlines`."""
    try:
        data = imagej_roi_zip(outlines)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    atomic_write(path, data)


def write_geojson(path: str | os.PathLike, outlines: dict[int, list[Piece]],
                  scores: Sequence[float] | dict[int, float]) -> None:
    """The nuclei as GeoJSON detections (QuPath: File > Import objects), from
    :func:`~nucleus_seg.data.outlines.label_outlines`."""
    atomic_write(path, geojson_text(outlines, scores))


# ---- measurements -------------------------------------------------------------------------------

class LabelledPixels(NamedTuple):
    """The labelled pixels of a label image: flat indices (raster order), ids, rows, columns, and the size of a
    per-id table (max id + 1). What every whole-image measurement starts from; :func:`measure` makes it once."""

    inside: np.ndarray
    lab: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    size: int


def labelled_pixels(labels: np.ndarray) -> LabelledPixels:
    flat = labels.ravel()
    inside = np.flatnonzero(flat > 0)
    lab = flat[inside].astype(np.int64)
    rows, cols = np.divmod(inside, labels.shape[1])
    return LabelledPixels(inside, lab, rows, cols, int(lab.max()) + 1 if lab.size else 1)


def _inertia_eigenvalues(labels: np.ndarray, ids: np.ndarray, pixels: LabelledPixels | None = None,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues l1 >= l2 of each id's inertia tensor [[mu_cc, -mu_rc], [-mu_rc, mu_rr]] / n (clipped at 0), from
    every region's second central moments at once (skimage's ``inertia_tensor_eigvals``)."""
    ids = np.asarray(ids, dtype=np.int64)
    _, lab, rows, cols, size = labelled_pixels(labels) if pixels is None else pixels
    n = np.bincount(lab, minlength=size).astype(np.float64)
    safe = np.maximum(n, 1)
    dr = rows - (np.bincount(lab, rows, size) / safe)[lab]
    dc = cols - (np.bincount(lab, cols, size) / safe)[lab]
    rr, cc, rc = (np.bincount(lab, w, size)[ids] / safe[ids] for w in (dr * dr, dc * dc, dr * dc))
    half_sum, half_diff = (cc + rr) / 2, (cc - rr) / 2
    root = np.sqrt(half_diff * half_diff + rc * rc)
    return np.maximum(half_sum + root, 0), np.maximum(half_sum - root, 0)


def eccentricities(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """skimage's ``regionprops`` eccentricity of each id in ``ids``, from every region's second central moments at
    once: skimage's per-region moments took ~40% of a 1024 px image's measurements (~440 nuclei, 0.14 of 0.35 s).

    The ellipse with the region's inertia tensor (eigenvalues l1 >= l2): eccentricity sqrt(1 - l2 / l1), 0 where
    l1 is 0 (one pixel).
    """
    return _eccentricity(*_inertia_eigenvalues(labels, ids))


def _eccentricity(l1: np.ndarray, l2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)


def ellipse_axes(labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """skimage's ``axis_major_length`` and ``axis_minor_length`` of each id: 4 sqrt(l1), 4 sqrt(l2), the axes of
    the ellipse with the region's second moments."""
    return _axes(*_inertia_eigenvalues(labels, ids))


def _axes(l1: np.ndarray, l2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return 4 * np.sqrt(l1), 4 * np.sqrt(l2)


# skimage.measure.perimeter's weights (4-connected border pixels, by the code of their border neighbours)
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


def perimeters(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """skimage's ``regionprops`` perimeter of each id in ``ids`` (``perimeter(region.image, 4)``), for every region
    at once: a region's border pixels (a 4-neighbour outside it) coded 1 + 2 x their border 4-neighbours + 10 x
    their border diagonal neighbours in the same region, each code weighted as skimage weights it."""
    padded = np.pad(np.asarray(labels), 2)
    height, width = labels.shape

    def shifted(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
        return array[2 + dy:2 + dy + height, 2 + dx:2 + dx + width]

    core = shifted(padded, 0, 0)
    same = {(dy, dx): shifted(padded, dy, dx) == core for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx}
    inside = core > 0
    border = np.pad(inside & ~(same[-1, 0] & same[1, 0] & same[0, -1] & same[0, 1]), 2)
    code = np.ones(core.shape, np.uint8)
    for (dy, dx), alike in same.items():
        code += np.uint8(2 if dy == 0 or dx == 0 else 10) * (shifted(border, dy, dx) & alike)
    on_border = shifted(border, 0, 0)
    size = int(core.max()) + 1 if core.size else 1
    return np.bincount(core[on_border], _PERIMETER_WEIGHTS[code[on_border]], size)[np.asarray(ids, np.int64)]


_DIAMOND = np.array([[0, -1], [0, 1], [-1, 0], [1, 0]], np.int32)  # a pixel's edge midpoints, doubled (x, y)


def convex_areas(labels: np.ndarray, ids: np.ndarray, pixels: LabelledPixels | None = None) -> np.ndarray:
    """skimage's ``regionprops`` ``area_convex`` of each id in ``ids`` (present in ``labels``, any order), exactly, ~4x
    faster: its per-region hull images took ~70% of a 1024 px image's measurements (~500 nuclei, 90 of 120 ms).

    As skimage: the convex hull of each pixel's four edge midpoints, and the pixels whose centres lie inside it or
    on its boundary. Here coordinates are doubled (integers), each region's hull comes from OpenCV, and the pixels
    are counted row by row for all regions at once: per row the hull spans an interval, whose ends are exact in
    float64 (a ratio of small integers is either an integer or at least 1/denominator away from one).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return np.zeros(0)
    pixels = labelled_pixels(labels) if pixels is None else pixels
    order = np.argsort(pixels.lab, kind="stable")
    lab, rows, cols = pixels.lab[order], pixels.rows[order], pixels.cols[order]
    doubled = np.stack([2 * cols, 2 * rows], axis=1).astype(np.int32)
    starts, ends = np.searchsorted(lab, ids), np.searchsorted(lab, ids, side="right")
    hulls = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        centres = cv2.convexHull(doubled[start:end]).reshape(-1, 2)  # the hull of the centres, then their diamonds'
        hulls.append(cv2.convexHull((centres[:, None, :] + _DIAMOND).reshape(-1, 2)).reshape(-1, 2))
    # each hull's edges (x0, y0) -> (x1, y1), padded with NaN to the longest
    sizes = np.array([len(h) for h in hulls])
    corners = np.concatenate(hulls)
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)  # each corner's hull's first corner
    owner, place = np.repeat(np.arange(len(hulls)), sizes), np.arange(len(corners)) - first
    after = np.where(place + 1 < np.repeat(sizes, sizes), np.arange(len(corners)) + 1, first)  # the next corner
    x0, y0, x1, y1 = (np.full((len(hulls), int(sizes.max())), np.nan) for _ in range(4))
    x0[owner, place], y0[owner, place] = corners[:, 0], corners[:, 1]
    x1[owner, place], y1[owner, place] = corners[after, 0], corners[after, 1]
    most = x0.shape[1]
    # one entry per (region, pixel row) from the region's top row to its bottom one (its pixels in raster order)
    top, bottom = rows[starts], rows[ends - 1]
    heights = bottom - top + 1
    region = np.repeat(np.arange(len(hulls)), heights)
    row_y = 2.0 * (np.repeat(top - np.cumsum(heights) + heights, heights) + np.arange(heights.sum()))
    areas = np.zeros(len(hulls))
    step = max(1, (1 << 20) // most)  # entries x edges per pass, ~8 MB per array
    for first in range(0, len(region), step):
        k, y = region[first:first + step], row_y[first:first + step, None]
        ax, ay, bx, by = x0[k], y0[k], x1[k], y1[k]
        meets = (np.fmin(ay, by) <= y) & (y <= np.fmax(ay, by))
        level = ay == by  # an edge along this row: both its ends
        with np.errstate(divide="ignore", invalid="ignore"):
            x = ax + (y - ay) * (bx - ax) / (by - ay)
        left = np.fmin(np.where(meets & ~level, x, np.inf), np.where(meets & level, np.fmin(ax, bx), np.inf))
        right = np.fmax(np.where(meets & ~level, x, -np.inf), np.where(meets & level, np.fmax(ax, bx), -np.inf))
        count = np.floor(right.max(axis=1) / 2) - np.ceil(left.min(axis=1) / 2) + 1  # pixel centres: even x
        np.add.at(areas, k, np.where(np.isfinite(count), np.maximum(count, 0), 0))
    return areas


def region_basics(labels: np.ndarray, raw: np.ndarray, pixels: LabelledPixels | None = None,
                  ) -> dict[str, np.ndarray]:
    """skimage's ``regionprops_table`` columns label, area, centroid, bbox, intensity_mean and intensity_max (of
    every channel of ``raw``), the same values of the same types, for every region at once: per region, skimage's
    took ~30 of a writer's ~130 ms for a 1024 px image of 300 nuclei. Integer images only (sums of up to 32-bit
    integers are exact in float64, so the means are skimage's to the bit); float ones go to skimage (its float32
    means are summed in float32)."""
    exact = all(a.dtype.kind in "ui" and a.dtype.itemsize <= 4 for a in (labels, raw))
    if not exact or not labels.size:
        props = ("label", "area", "centroid", "bbox", "intensity_mean", "intensity_max")
        return regionprops_table(labels, intensity_image=raw, properties=props)
    # nuclei cover a fraction of the image: only their pixels are summed
    inside, lab, rows, cols, size = labelled_pixels(labels) if pixels is None else pixels
    n_all = np.bincount(lab, minlength=size)
    ids = np.flatnonzero(n_all[1:]) + 1
    n = n_all[ids].astype(np.float64)
    table = {"label": ids.astype(labels.dtype), "area": n,  # skimage: a float
             "centroid-0": np.bincount(lab, rows, size)[ids] / n, "centroid-1": np.bincount(lab, cols, size)[ids] / n}
    boxes = [box for box in ndimage.find_objects(labels) if box is not None]
    for k, part in enumerate(("start", "start", "stop", "stop")):
        table[f"bbox-{k}"] = np.array([getattr(box[k % 2], part) for box in boxes], dtype=np.int64)
    values = raw.reshape(labels.size, -1)[inside].astype(np.float64)
    suffixes = [""] if raw.ndim == 2 else [f"-{c}" for c in range(values.shape[1])]
    for c, suffix in enumerate(suffixes):
        table[f"intensity_mean{suffix}"] = np.bincount(lab, values[:, c], size)[ids] / n
    for c, suffix in enumerate(suffixes):
        top = np.full(size, -np.inf)
        np.maximum.at(top, lab, values[:, c])
        table[f"intensity_max{suffix}"] = top[ids]
    return table


def measure(labels: np.ndarray, raw_image: np.ndarray, scores: Sequence[float],
            pixel_size: tuple[float, float] | None = None) -> tuple[list[str], list[list]]:
    """Per-nucleus measurements (header, rows), one row per id 1..N, intensities on the raw image.

    Images of several channels get one intensity column per channel (an opaque alpha dropped: it is
    constant); ``scores[k]`` is id k+1's. Shape columns are skimage's ``regionprops`` (computed for every region at
    once), circularity ImageJ's (4 pi area / perimeter^2, at most 1; 0 for a single pixel). With the image's (y, x)
    ``pixel_size`` in micrometres, the area in square micrometres and the diameter of the circle of that area
    follow the pixel area.
    """
    labels = np.asarray(labels)
    raw = drop_opaque_alpha(np.asarray(raw_image))
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.shape[:2] != labels.shape:
        raise ValueError(f"raw image {raw.shape[:2]} and labels {labels.shape} differ in size")
    pixels = labelled_pixels(labels)  # once for the columns below
    table = region_basics(labels, raw, pixels)
    moments = _inertia_eigenvalues(labels, table["label"], pixels)  # one pass for both columns below
    table["eccentricity"] = _eccentricity(*moments)
    table["major_axis"], table["minor_axis"] = _axes(*moments)
    table["solidity"] = table["area"] / convex_areas(labels, table["label"], pixels)  # as skimage divides
    table["perimeter"] = perimeters(labels, table["label"])
    with np.errstate(divide="ignore", invalid="ignore"):  # ImageJ's circularity, capped at 1 as ImageJ does
        circularity = 4 * np.pi * table["area"] / table["perimeter"] ** 2
    table["circularity"] = np.where(table["perimeter"] > 0, np.minimum(circularity, 1.0), 0.0)
    channels = [""] if raw.ndim == 2 else [f"_c{c}" for c in range(raw.shape[2])]
    source = (["area", "centroid-0", "centroid-1", "bbox-0", "bbox-1", "bbox-2", "bbox-3"]
              + [f"intensity_mean{'-' + c[2:] if c else ''}" for c in channels]
              + [f"intensity_max{'-' + c[2:] if c else ''}" for c in channels]
              + ["eccentricity", "solidity", "major_axis", "minor_axis", "perimeter", "circularity"])
    header = (["id", "score", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]
              + [f"mean_intensity{c}" for c in channels] + [f"max_intensity{c}" for c in channels]
              + ["eccentricity", "solidity", "major_axis", "minor_axis", "perimeter", "circularity"]
              + (["area_um2", "diameter_um"] if pixel_size else []))
    pixel_area = pixel_size[0] * pixel_size[1] if pixel_size else 0.0
    scores = np.asarray(scores, dtype=np.float32)
    rows = []
    columns = [table[key].tolist() for key in source]  # Python ints and floats, as .item() of each gives
    for i, label in enumerate(table["label"].tolist()):
        if not 1 <= label <= len(scores):
            raise ValueError(f"label image holds id {label} but only {len(scores)} scores were given")
        values = [column[i] for column in columns]
        values[0] = int(values[0])  # area: a pixel count
        row = [label, repr(float(scores[label - 1]))] + [v if isinstance(v, int) else round(v, 4) for v in values]
        if pixel_size:
            area_um2 = values[0] * pixel_area
            row += [float(f"{area_um2:.6g}"), float(f"{2 * math.sqrt(area_um2 / math.pi):.6g}")]
        rows.append(row)
    return header, rows


def write_measurements_csv(path: str | os.PathLike, labels: np.ndarray, raw_image: np.ndarray,
                           scores: Sequence[float], pixel_size: tuple[float, float] | None = None) -> None:
    """:func:`measure` as a CSV file."""
    atomic_write(path, _csv_text(*measure(labels, raw_image, scores, pixel_size)))


def read_scores_csv(path: str | os.PathLike) -> dict[int, float]:
    """``{id: score}`` from a measurements CSV (to rebuild per-run files on ``--resume``)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            return {int(row["id"]): float(row["score"]) for row in csv.DictReader(f)}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ImageReadError(f"{path}: not a measurements CSV with id and score columns ({exc})") from exc


# ---- Kaggle submission --------------------------------------------------------------------------

def submission_rows(image_id: str, labels: np.ndarray, runs: Runs | None = None) -> list[tuple[str, str]]:
    """Kaggle DSB-2018 rows for one image: one per nucleus, or ``(image_id, "")`` if it has none (``runs``: the
    labels' :func:`~nucleus_seg.utils.rle.label_runs`, if made already)."""
    encoded = rle_encode_labels(labels, runs)
    if not encoded:
        return [(image_id, "")]
    return [(image_id, rle) for rle in encoded.values()]


def submission_lines(rows: Iterable[tuple[str, str]]) -> str:
    """Submission rows as the CSV's lines, without its header: made per image (by a writer process), so the
    per-run file is a join at the end of the run rather than 90k rows formatted then (~0.2 s)."""
    return _csv_text(None, rows)


def write_submission_csv(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """``ImageId,EncodedPixels`` CSV (column-major, 1-based run-length pairs) of :func:`submission_lines` chunks."""
    atomic_write(path, _csv_text(SUBMISSION_HEADER, []) + "".join(lines))


# ---- COCO results -------------------------------------------------------------------------------

def coco_results(image_id: str | int, labels: np.ndarray, scores: Sequence[float] | dict[int, float],
                 category_id: int = 1, runs: Runs | None = None) -> list[dict]:
    """COCO results entries (compressed RLE segmentation, XYWH bbox, score) for a label image (``runs``: its
    :func:`~nucleus_seg.utils.rle.label_runs`, if made already)."""
    height, width = labels.shape
    ids, starts, lengths = label_runs(labels) if runs is None else runs
    out = []
    if ids.size == 0:
        return out
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [ids.size]])):
        label = int(ids[lo])
        counts = coco_rle_counts(starts[lo:hi], lengths[lo:hi], height * width)
        rle = mask_util.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        score = scores[label] if isinstance(scores, dict) else scores[label - 1]
        out.append({
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "area": int(mask_util.area(rle)),
            "score": float(score),
        })
    return out


def coco_fragment(results: Iterable[dict]) -> str:
    """COCO results as a piece of the results list's JSON (``json.dumps(list)`` without its brackets): made per
    image, so the per-run file is a join at the end of the run rather than ~90k entries encoded then."""
    return ", ".join(json.dumps(result) for result in results)


def write_coco_json(path: str | os.PathLike, fragments: Iterable[str]) -> None:
    """A COCO results list (loadable by ``COCO.loadRes`` against ground truth with the same image ids), from
    :func:`coco_fragment` pieces: the same bytes as ``json.dumps`` of the whole list."""
    atomic_write(path, "[" + ", ".join(f for f in fragments if f) + "]")


def read_submission_csv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(ImageId, EncodedPixels)`` rows of a Kaggle submission CSV (to merge a new run into it)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            if tuple(next(reader, ())) != SUBMISSION_HEADER:
                raise ValueError(f"its header is not {','.join(SUBMISSION_HEADER)}")
            return [(row[0], row[1]) for row in reader]
    except (OSError, ValueError, IndexError) as exc:
        raise ImageReadError(f"{path}: not a submission CSV nucleus-predict can add to ({exc})") from exc


def read_json_list(path: str | os.PathLike, keys: Sequence[str]) -> list[dict]:
    """A JSON list of objects that all have ``keys`` (COCO results or images), or an error naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(isinstance(d, dict) and set(keys) <= set(d) for d in data):
            raise ValueError(f"expected a list of objects with {', '.join(keys)}")
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a file nucleus-predict can add to ({exc})") from exc
    return data
