"""COCO AP through faster-coco-eval agrees with pycocotools' own COCOeval on a small case."""

from __future__ import annotations

import copy
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest

from nucleus_seg.evaluation.coco import coco_evaluate, dataset_dicts_to_coco
from nucleus_seg.structures import annotation_to_rle, mask_to_annotation


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _result(image_id: int, mask: np.ndarray, score: float) -> dict:
    rle = _rle(mask)
    return {"image_id": image_id, "category_id": 0, "score": score, "segmentation": rle,
            "bbox": mask_util.toBbox(rle).tolist()}


def small_case(seed: int = 3):
    """Three images of rectangles and blobs; detections are shifted copies plus false positives, with
    more detections per image than the smaller cap so that the cap changes AP."""
    from detectron2.structures import BoxMode

    rng = np.random.default_rng(seed)
    dicts, results = [], []
    for image_id in range(3):
        h, w = 48, 64
        anns = []
        for _ in range(int(rng.integers(8, 16))):
            m = np.zeros((h, w), bool)
            y, x = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
            m[y : y + int(rng.integers(3, 10)), x : x + int(rng.integers(3, 10))] = True
            if rng.random() < 0.3:  # polygons (detectron2's other annotation format), XYXY boxes
                ys, xs = np.nonzero(m)
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                poly = [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]
                anns.append(
                    {
                        "segmentation": [poly],
                        "bbox": [x0, y0, x1, y1],
                        "bbox_mode": BoxMode.XYXY_ABS,
                        "category_id": 0,
                        "iscrowd": 0,
                    }
                )
            else:
                anns.append(mask_to_annotation(m))
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections per object: misses and duplicates
                shifted = np.roll(m, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
                results.append(_result(image_id, shifted, float(rng.random())))
        for _ in range(int(rng.integers(2, 6))):
            m = np.zeros((h, w), bool)
            y, x = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
            m[y : y + 5, x : x + 4] = True
            results.append(_result(image_id, m, float(rng.random())))
        dicts.append(
            {
                "image_id": image_id,
                "height": h,
                "width": w,
                "file_name": f"{image_id}.png",
                "annotations": anns,
            }
        )
    return dicts, results


def pycocotools_reference(coco_gt: dict, results: list, iou_type: str, max_dets: list) -> dict:
    """AP numbers from pycocotools' pure-Python COCOeval's precision/recall arrays."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = copy.deepcopy(coco_gt)
    gt.createIndex()
    dets = copy.deepcopy(results)
    for d in dets:
        d["category_id"] = 1
        if iou_type == "segm":
            d.pop("bbox")
    e = COCOeval(gt, gt.loadRes(dets), iou_type)
    e.params.maxDets = list(max_dets)
    e.evaluate()
    e.accumulate()
    p, r = e.eval["precision"], e.eval["recall"]

    def mean(a):
        a = a[a > -1]
        return float(a.mean() * 100) if a.size else float("nan")

    out = {
        "AP": mean(p[:, :, :, 0, -1]),
        "AP50": mean(p[0, :, :, 0, -1]),
        "AP75": mean(p[5, :, :, 0, -1]),
        "APs": mean(p[:, :, :, 1, -1]),
        "APm": mean(p[:, :, :, 2, -1]),
        "APl": mean(p[:, :, :, 3, -1]),
    }
    for i, m in enumerate(max_dets):
        out[f"AP@{m}"] = mean(p[:, :, :, 0, i])
        out[f"AR@{m}"] = mean(r[:, :, 0, i])
    return out


@pytest.mark.parametrize("max_dets", [(5, 20), (100, 1000)])
def test_coco_ap_agrees_with_pycocotools(max_dets):
    dicts, results = small_case()
    coco_gt = dataset_dicts_to_coco(dicts)
    metrics, curves = coco_evaluate(coco_gt, results, ("bbox", "segm"), max_dets)
    for iou_type in ("bbox", "segm"):
        ref = pycocotools_reference(coco_gt, results, iou_type, list(max_dets))
        assert set(ref) == set(metrics[iou_type])
        for key, value in ref.items():
            if math.isnan(value):
                assert math.isnan(metrics[iou_type][key]), key
            else:
                assert metrics[iou_type][key] == pytest.approx(value, abs=1e-9), (iou_type, key)
        assert len(curves[iou_type]["recall"]) == len(curves[iou_type]["precision50"]) == 101
    if max_dets == (5, 20):  # the small cap must bite on this data, or the test proves nothing
        assert metrics["segm"]["AP@5"] < metrics["segm"]["AP@20"]


def test_ground_truth_conversion_keeps_masks_boxes_and_areas():
    dicts, _ = small_case()
    coco_gt = dataset_dicts_to_coco(dicts)
    anns = [a for d in dicts for a in d["annotations"]]
    assert len(coco_gt["annotations"]) == len(anns)
    assert {a["category_id"] for a in coco_gt["annotations"]} == {1}
    for ann in coco_gt["annotations"]:
        mask = mask_util.decode(ann["segmentation"])
        assert ann["area"] == mask.sum()
        x, y, w, h = ann["bbox"]  # XYWH, also for the XYXY sources
        ys, xs = np.nonzero(mask)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_without_detections_ap_is_zero_and_without_gt_undefined():
    dicts, results = small_case()
    metrics, _ = coco_evaluate(dataset_dicts_to_coco(dicts), [], ("segm",), (100,))
    assert metrics["segm"]["AP"] == 0.0 and metrics["segm"]["AP@100"] == 0.0
    empty = [dict(d, annotations=[]) for d in dicts]
    metrics, _ = coco_evaluate(dataset_dicts_to_coco(empty), results, ("bbox",), (100,))
    assert math.isnan(metrics["bbox"]["AP"])


def test_perfect_detections_score_100():
    dicts, _ = small_case()
    coco_gt = dataset_dicts_to_coco(dicts)
    results = [
        {
            "image_id": a["image_id"],
            "category_id": 0,
            "score": 0.9,
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
        }
        for a in coco_gt["annotations"]
    ]
    metrics, _ = coco_evaluate(coco_gt, results, ("bbox", "segm"), (100, 1000))
    assert metrics["segm"]["AP"] == pytest.approx(100.0)
    assert metrics["bbox"]["AP75"] == pytest.approx(100.0)


def test_bad_annotations_name_the_problem():
    with pytest.raises(ValueError, match="size"):
        annotation_to_rle({"segmentation": _rle(np.ones((4, 4), bool))}, 5, 4)
    with pytest.raises(ValueError, match="img7.png"):
        dataset_dicts_to_coco(
            [
                {
                    "file_name": "img7.png",
                    "image_id": 0,
                    "height": 5,
                    "width": 5,
                    "annotations": [{"segmentation": _rle(np.ones((4, 4), bool)), "bbox": [0, 0, 4, 4]}],
                }
            ]
        )
    with pytest.raises(ValueError, match="max_dets"):
        coco_evaluate({"images": [], "annotations": []}, [], ("segm",), (0,))
