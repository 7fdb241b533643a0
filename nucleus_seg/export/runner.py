"""Run a model written by ``nucleus-export`` without detectron2: numpy plus onnxruntime (or torch).

``nucleus-export`` copies this file beside the weights as ``nucleus_runner.py``; it imports nothing from
nucleus_seg or detectron2. The exported graph holds the network (pixel mean/std, padding, backbone, RPN,
box and mask heads, NMS); this file does what ``NucleusPredictor.predict_labels`` does around it: the
percentile normalisation, an optional rescale to the training diameter, and pasting each 28x28 soft mask
into its box (detectron2's sampling grid) to paint one label image, highest score on top, ids 1..N by
descending score, dropping what does not stand out from the image's pixel noise
(``NUCLEUS.PREDICT.MIN_SIGNIFICANCE``) and what has no step at its edge (``MIN_EDGE_SIGNIFICANCE``), and moving
each boundary to its own edge (``BOUNDARY_LEVEL``).
Not here: tiling of large images and test-time flips (use nucleus-predict for those).

    python nucleus_runner.py MODEL_DIR IMAGE OUT [--score-thresh S] [--diameter D|auto] [--backend onnx|torchscript]

IMAGE and OUT are ``.npy``, or TIFF when tifffile is installed. From Python:
``labels, scores = Segmenter("MODEL_DIR")(image)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np


def read_tiff(path: str) -> np.ndarray:
    """A TIFF's first series, channels last where ImageJ or OME metadata names a channel axis (nucleus_seg's
    ``read_image``: a two-channel composite is (C, Y, X) on disk)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        image, axes = tif.series[0].asarray(), tif.series[0].axes
    kept = [k for k, size in enumerate(image.shape) if size > 1 or axes[k] in "YX"]
    image, axes = image.reshape([image.shape[k] for k in kept]), "".join(axes[k] for k in kept)
    return np.moveaxis(image, 0, -1) if axes == "CYX" else image


def normalize(image: np.ndarray, n: dict) -> np.ndarray:
    """HxWx3 uint8, nuclei bright on dark: nucleus_seg's ``normalize_image`` (same arithmetic)."""
    image = np.asarray(image)
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] > 4:
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[2] == 4 and image[..., 3].min() == image[..., 3].max():
        image = image[..., :3]  # an opaque alpha (a 4th channel that varies is data)
    channel = int(n.get("CHANNEL", -1))  # the nuclear stain of a composite (models exported before it: all)
    if channel >= 0:
        count = 1 if image.ndim == 2 else image.shape[2]
        if channel >= count:
            raise ValueError(f"the image has {count} channel{'s' if count > 1 else ''} (0-{count - 1}): it has no "
                             f"channel {channel} (the model's normalize.CHANNEL)")
        image = image if image.ndim == 2 else image[..., channel]
    gray = (lambda a: a if a.ndim == 2 else a.max(axis=2))
    if n["METHOD"] == "none":
        out = image[..., None] if image.ndim == 2 else image
        out = gray(out)[..., None] if n["GRAY"] else out[..., :3]
    else:
        data = gray(image) if n["GRAY"] else (image[..., :3] if image.ndim == 3 else image)
        small_int = data.dtype.kind in "ui" and data.dtype.itemsize <= 2
        if n["METHOD"] == "percentile":
            lo, hi = np.percentile(data.astype(np.float64 if small_int else np.float32), (n["LOW"], n["HIGH"]))
            lo, hi = (float(lo), float(hi)) if small_int else (lo, hi)
        else:  # minmax
            lo, hi = float(data.min()), float(data.max())
        hi = lo + 1.0 if hi <= lo else hi
        out = (np.clip((data.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255) + 0.5).astype(np.uint8)
        out = out[..., None] if out.ndim == 2 else out
    if n["INVERT"] == "always" or (n["INVERT"] == "auto" and np.count_nonzero(out >= 128) * 2 > out.size):
        out = 255 - out
    if out.shape[2] < 3:
        out = np.concatenate([out, out, out], axis=2)[..., :3]
    return np.ascontiguousarray(out)


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) triangle-filter weights, antialiased when shrinking (PIL's BILINEAR, as detectron2)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale
    w = np.clip(1.0 - np.abs((np.arange(n_in)[None, :] + 0.5 - centre[:, None]) / support), 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of HxWx3 uint8, columns first then rows, rounded to uint8 after each (as PIL)."""
    if image.shape[:2] == (height, width):
        return image
    u8 = (lambda a: np.clip(a + 0.5, 0, 255).astype(np.uint8))
    cols = u8(np.einsum("xw,hwc->hxc", _resize_weights(image.shape[1], width), image.astype(np.float64)))
    return u8(np.einsum("yh,hxc->yxc", _resize_weights(image.shape[0], height), cols.astype(np.float64)))


def paste(mask: np.ndarray, box: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """A soft MxM mask sampled into its box as detectron2's ``paste_masks_in_image`` (grid_sample,
    align_corners=False, zero padding), >= 0.5; only a window one pixel around the box. (window, y, x)."""
    x0, y0, x1, y1 = (np.float32(v) for v in box)
    top, left = max(int(math.floor(y0)) - 1, 0), max(int(math.floor(x0)) - 1, 0)
    bottom, right = min(int(math.ceil(y1)) + 1, shape[0]), min(int(math.ceil(x1)) + 1, shape[1])
    size = np.float32(mask.shape[0])
    ys = np.arange(top, bottom, dtype=np.float32) + np.float32(0.5)
    xs = np.arange(left, right, dtype=np.float32) + np.float32(0.5)
    iy = (((ys - y0) / (y1 - y0) * 2 - 1 + 1) * size - 1) / 2  # grid_sample's unnormalisation
    ix = (((xs - x0) / (x1 - x0) * 2 - 1 + 1) * size - 1) / 2
    padded = np.pad(mask.astype(np.float32), 2)  # zeros outside: both corners of a sample off the mask hit them
    fy, fx = np.floor(iy), np.floor(ix)
    wy, wx = (iy - fy)[:, None], (ix - fx)[None, :]
    ya, xa = np.clip(fy.astype(int) + 2, 0, mask.shape[0] + 2), np.clip(fx.astype(int) + 2, 0, mask.shape[1] + 2)
    yb, xb = ya + 1, xa + 1
    value = ((1 - wy) * (1 - wx) * padded[ya][:, xa] + (1 - wy) * wx * padded[ya][:, xb]
             + wy * (1 - wx) * padded[yb][:, xa] + wy * wx * padded[yb][:, xb])
    return value >= 0.5, top, left


class Segmenter:
    """An exported model folder (``model.json`` + ``model.onnx`` and/or ``model.ts``) as a callable."""

    def __init__(self, folder: str | Path, backend: str | None = None):
        folder = Path(folder)
        self.meta = json.loads((folder / "model.json").read_text())
        files = self.meta["weights"]
        backend = backend or ("onnx" if "onnx" in files else "torchscript")
        if backend not in files:
            raise ValueError(f"{folder}: no {backend} weights (have {sorted(files)})")
        if backend == "onnx":
            import onnxruntime  # only this backend's runtime is needed

            session = onnxruntime.InferenceSession(str(folder / files["onnx"]), providers=["CPUExecutionProvider"])
            self.net = lambda x: session.run(None, {"image": x})
        else:
            import torch
            import torchvision  # noqa: F401 - registers the nms and roi_align ops the graph calls

            module = torch.jit.load(str(folder / files["torchscript"]), map_location="cpu").eval()
            self.net = lambda x: [t.numpy() for t in torch.no_grad()(module)(torch.from_numpy(x))]

    def detect(self, norm: np.ndarray, scale: float, thresh: float) -> tuple[list, np.ndarray]:
        """Windows ``(mask, y, x)`` and scores of one pass at ``scale``, in the frame of ``norm``."""
        height, width = norm.shape[:2]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        chw = np.ascontiguousarray(resize(norm, *size).transpose(2, 0, 1), dtype=np.float32)
        boxes, scores, _, masks = self.net(chw)
        cap = self.meta.get("detections_per_image", -1)
        if 0 < cap <= len(scores) and float(scores.min()) >= thresh:
            warnings.warn(f"{len(scores)} nuclei scoring >= {thresh:g} in a {size[0]}x{size[1]} px pass, the most "
                          f"the exported graph keeps (TEST.DETECTIONS_PER_IMAGE {cap}): more may be missing; split the "
                          "image or export with a larger TEST.DETECTIONS_PER_IMAGE", UserWarning, stacklevel=3)
        boxes = boxes * np.array([width / size[1], height / size[0]] * 2, dtype=np.float32)
        boxes = np.clip(boxes, 0, np.array([width, height, width, height], dtype=np.float32))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (scores >= thresh)
        return [paste(m[0], b, (height, width)) for m, b in zip(masks[keep], boxes[keep])], scores[keep]

    def __call__(self, image: np.ndarray, score_thresh: float | None = None,
                 diameter: float | str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(int32 label image, scores of ids 1..N). ``diameter``: px, "auto" (one estimate and one rescaled
        pass; nucleus-predict refines further), 0: none; None: the config's NUCLEUS.PREDICT.DIAMETER."""
        meta = self.meta
        thresh = meta["score_thresh"] if score_thresh is None else float(score_thresh)
        if thresh < meta["score_floor"]:
            raise ValueError(f"score threshold {thresh} is below {meta['score_floor']}, the lowest score the exported "
                             "graph keeps (nucleus-export --score-floor sets it)")
        norm = normalize(image, meta["normalize"])
        if not meta["normalize"]["GRAY"] and meta["input_format"] == "BGR":
            norm = np.ascontiguousarray(norm[..., ::-1])
        train = meta["train_diameter"]
        diameter = meta["diameter"] if diameter is None else diameter
        diameter = "auto" if diameter == "auto" or float(diameter) < 0 else float(diameter)
        scale = train / diameter if diameter != "auto" and diameter > 0 and train > 0 else 1.0
        found_thresh = min(thresh, meta["diameter_score_thresh"]) if diameter == "auto" else thresh
        windows, scores = self.detect(norm, scale, found_thresh)
        if diameter == "auto" and train > 0:  # the median equivalent diameter of the confident nuclei
            scale = auto_scale([w.sum() for (w, _, _), s in zip(windows, scores) if s >= meta["diameter_score_thresh"]],
                               train)
            if abs(scale - 1.0) > 0.05:
                windows, scores = self.detect(norm, scale, found_thresh)
        labels = np.zeros(norm.shape[:2], dtype=np.int32)
        for k in np.argsort(scores, kind="stable"):  # lowest score first: the best one wins each pixel
            if scores[k] >= thresh:
                window, y, x = windows[k]
                labels[y:y + window.shape[0], x:x + window.shape[1]][window] = k + 1
        gray = norm.astype(np.float32).mean(axis=2)
        for key, measure in (("min_significance", significance), ("min_edge_significance", edge_significance)):
            if meta.get(key, 0) > 0:  # in this order, as the package's finish_labels
                drop = measure(labels, gray) < meta[key]
                labels[np.concatenate([[False], drop])[labels]] = 0
        if meta.get("boundary_level", 0) > 0:
            labels = snap_labels(labels, gray, meta["boundary_level"])
        alive = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(scores) + 1)[1:])
        order = alive[np.argsort(-scores[alive], kind="stable")]
        lut = np.zeros(len(scores) + 1, dtype=np.int32)
        lut[order + 1] = np.arange(1, len(order) + 1, dtype=np.int32)
        return lut[labels], scores[order].astype(np.float32)


SCALE_LIMITS = (1 / 16, 16.0)  # nucleus_seg.inference.scale's: an estimate beyond them is refused, with a warning


def auto_scale(areas, train: float) -> float:
    """The rescale that brings the median equivalent diameter of ``areas`` (the confident nuclei of a first pass)
    to ``train``; 1.0 when nothing was found, or, with a warning, when the estimate is beyond SCALE_LIMITS (one
    pass only: nucleus_seg's predictor runs more and cross-checks them with the image's own blob size)."""
    areas = np.asarray([a for a in areas if a > 0], dtype=np.float64)
    if areas.size == 0 or train <= 0:
        return 1.0
    diameter = float(np.median(np.sqrt(4.0 * areas / math.pi)))
    scale = train / diameter
    if not SCALE_LIMITS[0] <= scale <= SCALE_LIMITS[1]:
        low, high = SCALE_LIMITS
        warnings.warn(f"diameter 'auto' found {diameter:.1f} px, a rescale of x{scale:.2f} beyond [{low:g}, {high:g}]: "
                      "predicting unscaled; pass --diameter if you know it", UserWarning, stacklevel=2)
        return 1.0
    return scale


def _square_filter(image: np.ndarray, radius: int, reduce) -> np.ndarray:
    """Max (``np.max``) or min (``np.min``) over a square of ``radius``; pixels outside the image count for nothing."""
    fill = -np.inf if reduce is np.max else np.inf
    grown = np.pad(image.astype(np.float64), radius, constant_values=fill)
    grown = reduce([grown[:, i:i + image.shape[1]] for i in range(2 * radius + 1)], axis=0)
    return reduce([grown[i:i + image.shape[0]] for i in range(2 * radius + 1)], axis=0)


def _medians_by_id(values: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Median of ``values`` over each id 1..n of ``ids`` (0 = none; NaN for an id with none)."""
    where = ids > 0
    ids, values = ids[where], values[where].astype(np.float64)
    order = np.lexsort((values, ids))
    ids, values = ids[order], values[order]
    counts = np.bincount(ids, minlength=n + 1)[1:]
    starts = np.cumsum(counts) - counts
    out = np.full(n, np.nan)
    has = counts > 0
    out[has] = (values[starts[has] + (counts[has] - 1) // 2] + values[starts[has] + counts[has] // 2]) / 2
    return out


def _typical_diameter(area: np.ndarray) -> float:
    """The equivalent diameter of the median instance, from the areas of ids 1..N (those with pixels); the lower
    median of an even count, as torch.median in the package (np.median's mean of the two can round a ring width
    the other way)."""
    area = np.sort(area[area > 0])
    return math.sqrt(4 * float(area[(area.size - 1) // 2]) / math.pi)


def snap_labels(labels: np.ndarray, gray: np.ndarray, level: float) -> np.ndarray:
    """Each boundary moved to ``level`` of its own contrast (``NUCLEUS.PREDICT.BOUNDARY_LEVEL``):
    nucleus_seg.inference.boundaries' rule, in numpy."""
    n = int(labels.max(initial=0))
    if n == 0 or level <= 0:
        return labels
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    diameter = _typical_diameter(area)
    band = max(1, round(diameter / 16))
    core_radius = max(1, round(diameter / 8))
    sigma = diameter / 16
    smooth = gray.astype(np.float64)
    if sigma >= 0.3:  # a separable Gaussian, reflecting at the border as OpenCV does
        r = max(1, math.ceil(4 * sigma))
        kernel = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        kernel /= kernel.sum()
        for axis in (0, 1):
            padded = np.pad(smooth, [(r, r) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
            smooth = sum(w * np.take(padded, range(i, i + smooth.shape[axis]), axis=axis)
                         for i, w in enumerate(kernel))
    fg = labels > 0
    alone = _square_filter(labels, core_radius, np.max) == _square_filter(labels, core_radius, np.min)
    core = np.where(fg & alone, labels, 0).ravel()
    near = _square_filter(labels, band, np.max).astype(np.int64)
    reach = _square_filter(labels, band + 3, np.max).astype(np.int64)
    ring = np.where(~fg & (near == 0), reach, 0).ravel()
    values = smooth.ravel()
    inner, outer = _medians_by_id(values, core, n), _medians_by_id(values, ring, n)
    judged = ((np.bincount(core, minlength=n + 1)[1:] >= 4) & (np.bincount(ring, minlength=n + 1)[1:] >= 4)
              & (inner - outer > 0))
    judged, inner, outer = (np.concatenate([[v0], v]) for v0, v in ((False, judged), (0.0, inner), (0.0, outer)))
    background_near = _square_filter((~fg).astype(np.float64), band, np.max) > 0
    owner = np.where(fg, labels, near).ravel()
    in_band = ((fg & background_near) | (~fg & (near > 0))).ravel() & judged[owner]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = (values - outer[owner]) / np.maximum(inner[owner] - outer[owner], 1e-12)
    snapped = np.where(in_band, np.where(share >= level, owner, 0), flat)
    undo = np.bincount(snapped, minlength=n + 1) < 0.5 * np.bincount(flat, minlength=n + 1)
    undo[0] = False
    snapped = np.where(undo[flat] | undo[snapped], flat, snapped)
    return snapped.reshape(labels.shape).astype(labels.dtype)


def _pixel_noise(gray: np.ndarray) -> float:
    """One pixel's noise sigma from the median |difference| of horizontal neighbours on every other row."""
    diffs = np.abs(np.diff(gray[::2], axis=1)).ravel()
    middle = (diffs.size - 1) // 2  # the lower median, as torch.median
    return float(np.partition(diffs, middle)[middle]) / (0.6745 * math.sqrt(2)) if diffs.size else 0.0


def edge_significance(labels: np.ndarray, gray: np.ndarray, band: int = 2) -> np.ndarray:
    """Per id 1..labels.max(): (mean of its pixels within ``band`` px of the background - mean of that background)
    as a z-score over the pixel noise; inf where it cannot be judged. nucleus_seg.inference.significance's edge
    rule, in numpy."""
    n = int(labels.max(initial=0))
    out = np.full(n, np.inf)
    sigma = _pixel_noise(gray)
    if n == 0 or sigma <= 0:
        return out
    values = gray.ravel().astype(np.float64)
    inner = np.where((labels > 0) & (_square_filter(labels, band, np.min) == 0), labels, 0).ravel()
    outer = np.where(labels == 0, _square_filter(labels, band, np.max).astype(np.int64), 0).ravel()
    sides = [(np.bincount(side, minlength=n + 1)[1:], np.bincount(side, weights=values, minlength=n + 1)[1:])
             for side in (inner, outer)]
    (n_in, sum_in), (n_out, sum_out) = sides
    judged = np.flatnonzero((n_in >= 4) & (n_out >= 4))
    step = sum_in[judged] / n_in[judged] - sum_out[judged] / n_out[judged]
    out[judged] = step / (sigma * np.sqrt(1 / n_in[judged] + 1 / n_out[judged]))
    return out


def significance(labels: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """Per id 1..labels.max(): (mean - median of the background within half a typical radius) / pixel noise x
    sqrt(area); inf where it cannot be judged. nucleus_seg.inference.significance's rule, in numpy."""
    n = int(labels.max(initial=0))
    out = np.full(n, np.inf)
    sigma = _pixel_noise(gray)
    if n == 0 or sigma <= 0:
        return out
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    inside = np.bincount(flat, weights=gray.ravel().astype(np.float64), minlength=n + 1)[1:] / np.maximum(area, 1)
    radius = max(2, round(0.25 * _typical_diameter(area)))
    ring = np.where(labels == 0, _square_filter(labels, radius, np.max).astype(np.int64), 0).ravel()
    counts = np.bincount(ring, minlength=n + 1)[1:]
    judged = np.flatnonzero((area > 0) & (counts >= 4))
    level = _medians_by_id(gray.ravel(), ring, n)[judged]
    out[judged] = (inside[judged] - level) / sigma * np.sqrt(area[judged])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("image")
    parser.add_argument("out", help="label image: .npy, or .tif (tifffile)")
    parser.add_argument("--score-thresh", type=float)
    parser.add_argument("--diameter", help="nucleus diameter in px, or auto")
    parser.add_argument("--backend", choices=("onnx", "torchscript"))
    args = parser.parse_args(argv)
    tiff = (lambda p: Path(p).suffix.lower() in (".tif", ".tiff"))
    if tiff(args.image) or tiff(args.out):
        import tifffile  # only for TIFF files
    image = read_tiff(args.image) if tiff(args.image) else np.load(args.image)
    labels, scores = Segmenter(args.model_dir, args.backend)(image, args.score_thresh, args.diameter)
    labels = labels.astype(np.uint16 if labels.max(initial=0) < 65536 else np.uint32)
    tmp = Path(args.out).with_name(f".{Path(args.out).name}.tmp")  # written whole, then moved into place
    with open(tmp, "wb") as f:
        tifffile.imwrite(f, labels, compression="zlib") if tiff(args.out) else np.save(f, labels)
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(scores)} nuclei")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
