"""Instance matching between label images, the DSB-2018 score and StarDist-style matching stats.

Everything is computed from one sparse overlap table per image pair: the pixel counts of every
(ground-truth id, predicted id) pair come from a single ``np.bincount`` over pair codes, so a 1024x1024
image with hundreds of nuclei costs a few milliseconds instead of one pass per object.

Conventions (the same for every metric here):

* A ground-truth object and a prediction match at threshold ``t`` when their IoU is **strictly
  greater** than ``t`` (the DSB-2018 rule). For ``t >= 0.5`` such matches are necessarily one-to-one
  (two disjoint masks cannot both cover more than half of a third), so every pair above ``t`` is a
  match. For ``t < 0.5`` a maximum-cardinality one-to-one assignment is found (Hungarian), ties broken
  by the larger summed IoU, as StarDist does.
* TP = matches, FP = predictions without a match, FN = ground-truth objects without a match.
* ``accuracy = TP / (TP + FP + FN)``; this is what DSB-2018 and Cellpose call "average precision"
  (``ap50``/``ap75`` in the evaluator), not COCO AP.
* ``dsb_score`` of an image is the mean of ``accuracy`` over IoU thresholds 0.50, 0.55, ..., 0.95.
* ``panoptic_quality = sum of matched IoUs / (TP + FP/2 + FN/2)``,
  ``mean_matched_iou = sum of matched IoUs / TP``.
* Empty images: a ratio whose denominator is zero is **1** when the image has neither ground truth nor
  predictions (nothing to find and nothing found: a perfect image) and **0** otherwise. So GT without
  predictions scores 0, predictions without GT score 0 (precision, recall, F1, accuracy, PQ, DSB all 0).
* Instance ids may be any non-negative integers (holes in the range allowed); 0 is background.
  An id with no pixels does not exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

#: The DSB-2018 thresholds 0.50:0.05:0.95, rounded so that e.g. 0.6 is the double nearest 0.6.
IOU_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.round(np.arange(0.5, 0.951, 0.05), 2))

# Above this many (gt id, pred id) cells the dense bincount table would cost too much memory; ids are
# compacted first, and if still too many a sort-based sparse count is used.
_DENSE_LIMIT = 1 << 22


class Overlap(NamedTuple):
    """Sparse overlap of two label images: only pairs that share at least one pixel are listed."""

    gt_ids: np.ndarray  # (G,) ids present in the ground truth, ascending
    pred_ids: np.ndarray  # (P,) ids present in the prediction, ascending
    gt_area: np.ndarray  # (G,) pixels per ground-truth object
    pred_area: np.ndarray  # (P,) pixels per predicted object
    pair_gt: np.ndarray  # (K,) index into gt_ids
    pair_pred: np.ndarray  # (K,) index into pred_ids
    intersection: np.ndarray  # (K,) shared pixels
    iou: np.ndarray  # (K,) intersection over union

    @property
    def n_gt(self) -> int:
        return len(self.gt_ids)

    @property
    def n_pred(self) -> int:
        return len(self.pred_ids)


class ImageCounts(NamedTuple):
    """Match counts of one image at several IoU thresholds: all that the metrics need (and picklable)."""

    n_gt: int
    n_pred: int
    thresholds: tuple[float, ...]
    tp: np.ndarray  # (T,) int matches per threshold
    sum_iou: np.ndarray  # (T,) float summed IoU of the matches per threshold


def check_label_image(label: np.ndarray, what: str = "label image") -> np.ndarray:
    """Return ``label`` as a 2-D integer array, or raise a ValueError saying what is wrong with it."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D label image, got shape {label.shape}")
    if label.dtype == bool:
        return label.astype(np.uint8)
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.mod(label, 1) == 0):
            raise ValueError(f"{what}: label image holds non-integer values")
        label = label.astype(np.int64)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{what}: label image must hold integer ids, got dtype {label.dtype}")
    if label.size and np.issubdtype(label.dtype, np.signedinteger) and label.min() < 0:
        raise ValueError(f"{what}: label image holds negative ids (min {label.min()})")
    if label.dtype == np.uint64:  # numpy's bincount and index arithmetic need a signed type
        if label.size and label.max() >= 2**63:
            raise ValueError(f"{what}: label ids above 2**63 are not supported")
        label = label.astype(np.int64)
    return label


def _compact(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber ids to 1..N (0 stays background); returns (compact label as intp, original ids)."""
    top = int(label.max()) if label.size else 0
    if top < (1 << 24):
        area = np.bincount(label.ravel(), minlength=top + 1)
        ids = np.flatnonzero(area[1:]) + 1
        lut = np.zeros(top + 1, dtype=np.intp)
        lut[ids] = np.arange(1, len(ids) + 1)
        return lut[label], ids
    ids, inverse = np.unique(label, return_inverse=True)
    inverse = inverse.reshape(label.shape)
    if ids[0] == 0:
        return inverse, ids[1:]
    return inverse + 1, ids


def label_overlap(gt: np.ndarray, pred: np.ndarray) -> Overlap:
    """Pixel overlap and IoU of every (ground truth, prediction) pair that touches, in O(pixels)."""
    gt = check_label_image(gt, "ground truth")
    pred = check_label_image(pred, "prediction")
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    top_g = int(gt.max()) if gt.size else 0
    top_p = int(pred.max()) if pred.size else 0
    g_ids = p_ids = None
    if (top_g + 1) * (top_p + 1) > _DENSE_LIMIT:  # sparse or huge ids: renumber to 1..N first
        gt, g_ids = _compact(gt)
        pred, p_ids = _compact(pred)
        top_g, top_p = len(g_ids), len(p_ids)
    width = top_p + 1
    if (top_g + 1) * width <= _DENSE_LIMIT:
        code_type = np.int32 if (top_g + 1) * width < (1 << 31) else np.int64
        codes = gt.astype(code_type, copy=False) * code_type(width) + pred.astype(code_type, copy=False)
        table = np.bincount(codes.ravel(), minlength=(top_g + 1) * width).reshape(top_g + 1, width)
        g_area_all = table.sum(axis=1)[1:]
        p_area_all = table.sum(axis=0)[1:]
        rows, cols = np.nonzero(table[1:, 1:])
        inter = table[1:, 1:][rows, cols]
    else:  # thousands of objects on both sides: count only the pairs that occur
        codes = gt.astype(np.int64) * width + pred.astype(np.int64)
        uniq, counts = np.unique(codes.ravel(), return_counts=True)
        g_area_all = np.bincount(uniq // width, weights=counts, minlength=top_g + 1)[1:].astype(np.int64)
        p_area_all = np.bincount(uniq % width, weights=counts, minlength=width)[1:].astype(np.int64)
        both = (uniq // width > 0) & (uniq % width > 0)
        rows, cols, inter = uniq[both] // width - 1, uniq[both] % width - 1, counts[both]
    g_present = g_area_all > 0
    p_present = p_area_all > 0
    g_index = np.cumsum(g_present) - 1
    p_index = np.cumsum(p_present) - 1
    g_pos = np.flatnonzero(g_present)
    p_pos = np.flatnonzero(p_present)
    gt_ids = (g_pos + 1) if g_ids is None else g_ids[g_pos]
    pred_ids = (p_pos + 1) if p_ids is None else p_ids[p_pos]
    gt_area = g_area_all[g_present].astype(np.int64)
    pred_area = p_area_all[p_present].astype(np.int64)
    pair_gt = g_index[rows]
    pair_pred = p_index[cols]
    inter = inter.astype(np.int64)
    union = gt_area[pair_gt] + pred_area[pair_pred] - inter
    return Overlap(gt_ids, pred_ids, gt_area, pred_area, pair_gt, pair_pred, inter, inter / union)


def match_pairs(overlap: Overlap, thresh: float) -> np.ndarray:
    """Indices into the overlap's pairs that are matches at ``thresh`` (IoU > thresh, one-to-one)."""
    if not 0.0 <= thresh < 1.0:
        raise ValueError(f"IoU threshold must be in [0, 1), got {thresh}")
    candidates = np.flatnonzero(overlap.iou > thresh)
    if thresh >= 0.5 or len(candidates) == 0:
        return candidates  # one-to-one by construction (see module docstring)
    rows, r_inv = np.unique(overlap.pair_gt[candidates], return_inverse=True)
    cols, c_inv = np.unique(overlap.pair_pred[candidates], return_inverse=True)
    # Cardinality first, IoU second: the IoU term sums to < 0.5 over any matching, less than one match.
    weight = np.zeros((len(rows), len(cols)))
    weight[r_inv, c_inv] = 1.0 + overlap.iou[candidates] / (2 * min(len(rows), len(cols)))
    pair_of = np.full((len(rows), len(cols)), -1, dtype=np.intp)
    pair_of[r_inv, c_inv] = candidates
    sel_r, sel_c = linear_sum_assignment(weight, maximize=True)
    chosen = pair_of[sel_r, sel_c]
    return np.sort(chosen[chosen >= 0])


def match_counts(overlap: Overlap, thresholds: Sequence[float] = IOU_THRESHOLDS) -> ImageCounts:
    """TP and summed matched IoU at each threshold, from one overlap table."""
    thresholds = tuple(float(t) for t in thresholds)
    tp = np.zeros(len(thresholds), dtype=np.int64)
    sum_iou = np.zeros(len(thresholds), dtype=np.float64)
    for i, t in enumerate(thresholds):
        chosen = match_pairs(overlap, t)
        tp[i] = len(chosen)
        sum_iou[i] = float(overlap.iou[chosen].sum())
    return ImageCounts(overlap.n_gt, overlap.n_pred, thresholds, tp, sum_iou)


def image_counts(
    gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> ImageCounts:
    """Match counts of a (ground truth, prediction) label-image pair at each threshold."""
    return match_counts(label_overlap(gt, pred), thresholds)


def _ratio(num: np.ndarray, den: np.ndarray, both_empty: bool) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)
    return np.where(den > 0, out, 1.0 if both_empty else 0.0)


def rates(counts: ImageCounts) -> dict[str, np.ndarray]:
    """Precision, recall, F1, accuracy, panoptic quality and mean matched IoU per threshold.

    Follows the empty-image convention of the module docstring (0/0 is 1 only for an empty pair).
    """
    n_gt, n_pred, tp, s = counts.n_gt, counts.n_pred, counts.tp, counts.sum_iou
    empty = n_gt == 0 and n_pred == 0
    fp, fn = n_pred - tp, n_gt - tp
    return {
        "precision": _ratio(tp, np.full_like(tp, n_pred), empty),
        "recall": _ratio(tp, np.full_like(tp, n_gt), empty),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "accuracy": _ratio(tp, tp + fp + fn, empty),
        "panoptic_quality": _ratio(s, tp + fp / 2 + fn / 2, empty),
        "mean_matched_iou": _ratio(s, tp, empty),
    }


def matching_stats(gt: np.ndarray, pred: np.ndarray, thresh: float = 0.5) -> dict[str, float]:
    """StarDist-style stats of one label-image pair at one IoU threshold (names as in StarDist)."""
    counts = image_counts(gt, pred, (thresh,))
    r = {k: float(v[0]) for k, v in rates(counts).items()}
    tp = int(counts.tp[0])
    return {
        "thresh": float(thresh),
        "tp": tp,
        "fp": counts.n_pred - tp,
        "fn": counts.n_gt - tp,
        "n_true": counts.n_gt,
        "n_pred": counts.n_pred,
        "precision": r["precision"],
        "recall": r["recall"],
        "f1": r["f1"],
        "accuracy": r["accuracy"],
        "panoptic_quality": r["panoptic_quality"],
        "mean_matched_score": r["mean_matched_iou"],
    }


def dsb_score(gt: np.ndarray, pred: np.ndarray) -> float:
    """DSB-2018 score of one image: mean over IoU 0.50:0.05:0.95 of TP/(TP+FP+FN)."""
    return float(rates(image_counts(gt, pred))["accuracy"].mean())


# ----------------------------------------------------------------------------- per image / dataset
#: Keys of an image's metric row that are counts (summed over a dataset); all others are averaged.
COUNT_KEYS = ("n_gt", "n_pred", "tp50", "fp50", "fn50", "tp75", "fp75", "fn75")


def image_metrics(counts: ImageCounts) -> dict[str, float]:
    """The flat per-image row the evaluator reports (needs thresholds 0.5 and 0.75 in ``counts``)."""
    if counts.thresholds != IOU_THRESHOLDS:
        raise ValueError(f"image_metrics needs counts at the DSB thresholds {IOU_THRESHOLDS}")
    r = rates(counts)
    row: dict[str, float] = {"dsb_score": float(r["accuracy"].mean())}
    for name, i in (("50", IOU_THRESHOLDS.index(0.5)), ("75", IOU_THRESHOLDS.index(0.75))):
        tp = int(counts.tp[i])
        row.update(
            {
                f"ap{name}": float(r["accuracy"][i]),
                f"precision{name}": float(r["precision"][i]),
                f"recall{name}": float(r["recall"][i]),
                f"f1_{name}": float(r["f1"][i]),
                ("pq" if name == "50" else f"pq{name}"): float(r["panoptic_quality"][i]),
                ("mean_matched_iou" if name == "50" else f"mean_matched_iou{name}"): float(
                    r["mean_matched_iou"][i]
                ),
                f"tp{name}": tp,
                f"fp{name}": counts.n_pred - tp,
                f"fn{name}": counts.n_gt - tp,
            }
        )
    row["n_gt"] = counts.n_gt
    row["n_pred"] = counts.n_pred
    return row


def aggregate_metrics(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Dataset numbers: rates are means over images, counts (``COUNT_KEYS``) are sums."""
    rows = list(rows)
    if not rows:
        raise ValueError("no images to aggregate")
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float, np.number))]
    out: dict[str, float] = {}
    for k in keys:
        values = [row[k] for row in rows]
        out[k] = int(sum(values)) if k in COUNT_KEYS else float(np.mean(values))
    out["n_images"] = len(rows)
    return out


def iou_curve(counts: Iterable[ImageCounts]) -> dict[str, list[float]]:
    """Mean accuracy/precision/recall/F1 over images at each IoU threshold (for the score-vs-IoU plot)."""
    counts = list(counts)
    if not counts:
        raise ValueError("no images")
    per_image = [rates(c) for c in counts]
    out: dict[str, list[float]] = {"thresholds": list(counts[0].thresholds)}
    for key in ("accuracy", "precision", "recall", "f1"):
        out[key] = np.mean([r[key] for r in per_image], axis=0).tolist()
    return out
