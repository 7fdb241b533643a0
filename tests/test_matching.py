"""DSB score and matching stats against an independent brute-force reference (plain loops over pairs)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nucleus_seg.evaluation import matching
from nucleus_seg.evaluation.matching import (
    IOU_THRESHOLDS,
    aggregate_metrics,
    dsb_score,
    image_counts,
    image_metrics,
    label_overlap,
    matching_stats,
)

# ----------------------------------------------------------------------------- brute-force reference


def ref_ious(gt: np.ndarray, pred: np.ndarray) -> dict[tuple[int, int], float]:
    """IoU of every (gt id, pred id) pair sharing a pixel, by looping over pixels and pairs."""
    gt_ids = sorted({int(v) for v in gt.ravel() if v != 0})
    pred_ids = sorted({int(v) for v in pred.ravel() if v != 0})
    out = {}
    for g in gt_ids:
        for p in pred_ids:
            inter = union = 0
            for a, b in zip(gt.ravel().tolist(), pred.ravel().tolist()):
                inter += a == g and b == p
                union += a == g or b == p
            if inter:
                out[(g, p)] = inter / union
    return out


def ref_match(gt: np.ndarray, pred: np.ndarray, t: float) -> tuple[int, float, int, int]:
    """(TP, summed matched IoU, n_gt, n_pred): the one-to-one matching with IoU > t of most pairs
    (then largest summed IoU), found by trying every matching."""
    ious = ref_ious(gt, pred)
    gt_ids = sorted({int(v) for v in gt.ravel() if v != 0})
    pred_ids = sorted({int(v) for v in pred.ravel() if v != 0})
    best = (0, 0.0)

    def search(i: int, used: frozenset, count: int, total: float) -> None:
        nonlocal best
        if i == len(gt_ids):
            if count > best[0] or (count == best[0] and total > best[1] + 1e-12):
                best = (count, total)
            return
        search(i + 1, used, count, total)
        for p in pred_ids:
            iou = ious.get((gt_ids[i], p), 0.0)
            if p not in used and iou > t:
                search(i + 1, used | {p}, count + 1, total + iou)

    search(0, frozenset(), 0, 0.0)
    return best[0], best[1], len(gt_ids), len(pred_ids)


def ref_stats(gt: np.ndarray, pred: np.ndarray, t: float) -> dict[str, float]:
    tp, s, n_gt, n_pred = ref_match(gt, pred, t)
    fp, fn = n_pred - tp, n_gt - tp
    if n_gt == 0 and n_pred == 0:  # the documented rule: an empty pair is perfect
        return dict(tp=0, fp=0, fn=0, precision=1.0, recall=1.0, f1=1.0, accuracy=1.0, pq=1.0, miou=1.0)
    return dict(
        tp=tp,
        fp=fp,
        fn=fn,
        precision=tp / n_pred if n_pred else 0.0,
        recall=tp / n_gt if n_gt else 0.0,
        f1=2 * tp / (2 * tp + fp + fn),
        accuracy=tp / (tp + fp + fn),
        pq=s / (tp + 0.5 * fp + 0.5 * fn),
        miou=s / tp if tp else 0.0,
    )


def ref_dsb(gt: np.ndarray, pred: np.ndarray) -> float:
    return sum(ref_stats(gt, pred, t)["accuracy"] for t in [0.5 + 0.05 * i for i in range(10)]) / 10


# ----------------------------------------------------------------------------- random label pairs

rects = st.lists(
    st.tuples(
        st.integers(0, 13),
        st.integers(0, 13),
        st.integers(1, 7),
        st.integers(1, 7),
        st.sampled_from([1, 2, 3, 4, 5, 7, 9, 200, 65535, 70000]),
    ),
    max_size=6,
)


def paint(shape: tuple[int, int], rectangles) -> np.ndarray:
    """Rectangles painted in order: later ones cut into earlier ones, giving touching objects."""
    label = np.zeros(shape, dtype=np.int64)
    for y, x, h, w, k in rectangles:
        label[y : y + h, x : x + w] = k
    return label


@st.composite
def label_pairs(draw):
    shape = (draw(st.integers(1, 14)), draw(st.integers(1, 14)))
    gt = paint(shape, draw(rects))
    if draw(st.booleans()):  # prediction = ground truth with some pixels reassigned: IoUs near thresholds
        pred = gt.copy()
        for y, x, k in draw(
            st.lists(
                st.tuples(st.integers(0, 13), st.integers(0, 13), st.sampled_from([0, 1, 2, 3, 11, 12])),
                max_size=25,
            )
        ):
            if y < shape[0] and x < shape[1]:
                pred[y, x] = k
    else:
        pred = paint(shape, draw(rects))
    return gt, pred


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_pairs(), st.sampled_from([0.1, 0.3, 0.5, 0.6, 0.75, 0.9]))
def test_matching_stats_agree_with_brute_force(pair, t):
    gt, pred = pair
    ref = ref_stats(gt, pred, t)
    with pytest.MonkeyPatch.context() as mp:
        for limit in (matching._DENSE_LIMIT, 4, 1):  # dense table, renumbered ids, sparse pair counts
            mp.setattr(matching, "_DENSE_LIMIT", limit)
            got = matching_stats(gt, pred, t)
            assert (got["tp"], got["fp"], got["fn"]) == (ref["tp"], ref["fp"], ref["fn"])
            for key, ref_key in (
                ("precision", "precision"),
                ("recall", "recall"),
                ("f1", "f1"),
                ("accuracy", "accuracy"),
                ("panoptic_quality", "pq"),
                ("mean_matched_score", "miou"),
            ):
                assert got[key] == pytest.approx(ref[ref_key], abs=1e-12), key


@settings(max_examples=40, deadline=None)
@given(label_pairs())
def test_dsb_score_agrees_with_brute_force(pair):
    gt, pred = pair
    assert dsb_score(gt, pred) == pytest.approx(ref_dsb(gt, pred), abs=1e-12)
    assert dsb_score(gt.astype(np.uint32), pred.astype(np.int32)) == pytest.approx(
        ref_dsb(gt, pred), abs=1e-12
    )


def test_overlap_matches_brute_force_on_seeded_images():
    rng = np.random.default_rng(7)
    for _ in range(5):
        gt = rng.integers(0, 6, size=(9, 11)) * rng.integers(1, 3)
        pred = np.where(rng.random((9, 11)) < 0.8, gt, rng.integers(0, 9, size=(9, 11)))
        ov = label_overlap(gt, pred)
        got = {
            (int(ov.gt_ids[g]), int(ov.pred_ids[p])): iou
            for g, p, iou in zip(ov.pair_gt, ov.pair_pred, ov.iou)
        }
        ref = ref_ious(gt, pred)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-12)
        assert ov.gt_area.tolist() == [int((gt == k).sum()) for k in ov.gt_ids]


# ----------------------------------------------------------------------------- defined cases


def test_worked_example():
    """Two GT squares: one predicted exactly, one with 6/9 pixels (IoU 2/3)."""
    gt = np.zeros((6, 6), int)
    gt[:3, :3] = 1
    gt[3:, 3:] = 5
    pred = np.zeros((6, 6), int)
    pred[:3, :2] = 2
    pred[3:, 3:] = 7
    # accuracy 1 at t in {0.50, ..., 0.65} (both match), 1/3 at the 6 higher thresholds (one TP, FP, FN)
    assert dsb_score(gt, pred) == pytest.approx((4 * 1 + 6 / 3) / 10)
    s = matching_stats(gt, pred, 0.75)
    assert (s["tp"], s["fp"], s["fn"], s["f1"]) == (1, 1, 1, 0.5)
    assert matching_stats(gt, pred, 0.5)["panoptic_quality"] == pytest.approx((1 + 2 / 3) / 2)


def test_iou_exactly_at_threshold_is_not_a_match():
    gt = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 0, 0]])  # IoU exactly 0.5
    assert matching_stats(gt, pred, 0.5)["tp"] == 0
    assert matching_stats(gt, pred, 0.45)["tp"] == 1


@pytest.mark.parametrize(
    "gt_n, pred_n, expected",
    [
        (0, 0, 1.0),  # nothing to find, nothing found
        (3, 0, 0.0),  # everything missed
        (0, 3, 0.0),  # only false positives
    ],
)
def test_empty_image_rules(gt_n, pred_n, expected):
    gt = np.zeros((8, 8), np.uint16)
    pred = np.zeros((8, 8), np.uint16)
    for k in range(gt_n):
        gt[2 * k, :] = k + 1
    for k in range(pred_n):
        pred[:, 2 * k] = k + 1
    row = image_metrics(image_counts(gt, pred))
    for key in ("dsb_score", "ap50", "precision50", "recall50", "f1_50", "pq", "mean_matched_iou", "ap75"):
        assert row[key] == expected, key
    assert (row["tp50"], row["fp50"], row["fn50"]) == (0, pred_n, gt_n)


def test_split_ids_and_huge_ids_are_one_instance():
    gt = np.zeros((4, 8), np.int64)
    gt[:, :2] = 2**40  # one id in two pieces is one instance
    gt[:, 6:] = 2**40
    pred = np.zeros((4, 8), np.uint32)
    pred[:, :2] = 4_000_000_000
    pred[:, 6:] = 4_000_000_000
    s = matching_stats(gt, pred)
    assert (s["n_true"], s["n_pred"], s["tp"], s["mean_matched_score"]) == (1, 1, 1, 1.0)
    assert matching_stats(gt.astype(bool), pred.astype(bool))["tp"] == 1
    assert matching_stats(gt.astype(np.uint64), (pred > 0).astype(np.uint64))["tp"] == 1


def test_aggregate_means_rates_and_sums_counts():
    gt = np.zeros((6, 6), int)
    gt[1:4, 1:4] = 1
    rows = [image_metrics(image_counts(gt, gt)), image_metrics(image_counts(gt, np.zeros_like(gt)))]
    agg = aggregate_metrics(rows)
    assert agg["dsb_score"] == 0.5 and agg["f1_50"] == 0.5
    assert (agg["n_images"], agg["n_gt"], agg["n_pred"], agg["tp50"], agg["fn50"]) == (2, 2, 1, 1, 1)
    with pytest.raises(ValueError, match="no images"):
        aggregate_metrics([])


@pytest.mark.parametrize(
    "gt, pred, message",
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), "differ in shape"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), "2-D"),
        (np.full((4, 4), -1), np.zeros((4, 4), int), "negative"),
        (np.zeros((4, 4)), np.full((4, 4), 0.5), "non-integer"),
    ],
)
def test_bad_label_images_raise_clear_errors(gt, pred, message):
    with pytest.raises(ValueError, match=message):
        image_counts(gt, pred)


def test_thresholds_are_the_dsb_ones():
    assert IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    with pytest.raises(ValueError, match="threshold"):
        matching_stats(np.zeros((2, 2), int), np.zeros((2, 2), int), 1.0)


def test_below_half_matching_is_one_to_one_and_maximal():
    """Below IoU 0.5 matches can conflict. Here GT 1 overlaps A (IoU 6/14) and B (IoU 4/10), GT 2 only A
    (IoU 4/16): greedy by IoU would pair 1-A and leave 2 unmatched; the maximal matching is 1-B, 2-A."""
    gt = np.array([[1] * 10 + [2] * 10])
    pred = np.array([[5] * 4 + [6] * 10 + [0] * 6])
    s = matching_stats(gt, pred, 0.2)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0)
    assert s["mean_matched_score"] == pytest.approx((4 / 10 + 4 / 16) / 2)
    assert ref_match(gt, pred, 0.2)[:2] == (2, pytest.approx(4 / 10 + 4 / 16))
    assert matching_stats(gt, pred, 0.42)["tp"] == 1  # only 1-A (6/14 = 0.43) is above 0.42


def test_below_half_matching_prefers_more_matches_over_more_iou():
    """GT 1 - A alone has IoU 8/13; the two matches 1-B (2/10) and 2-A (3/18) sum to less but count more."""
    gt = np.array([[1] * 10 + [2] * 10])
    pred = np.array([[5] * 2 + [6] * 11 + [0] * 7])
    s = matching_stats(gt, pred, 0.15)
    assert s["tp"] == 2 == ref_match(gt, pred, 0.15)[0]
    assert s["mean_matched_score"] == pytest.approx((2 / 10 + 3 / 18) / 2)
