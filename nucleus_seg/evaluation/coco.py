"""COCO box and mask AP for nuclei, via faster-coco-eval's C++ matcher, at up to 1000+ detections.

detectron2 without ``detectron2._C`` falls back to pycocotools' pure-Python COCOeval, which takes
seconds per image when images hold hundreds of nuclei; COCO's default cap of 100 detections also
truncates dense fields. Here AP is reported at every cap in ``max_dets`` (``AP@100``, ``AP@1000``) so
the cap's effect is visible.

All instances are one class (nucleus): category ids are normalised to 1 on both sides.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import BoxMode
from faster_coco_eval import COCO, COCOeval_faster

from ..structures import annotation_to_rle

logger = logging.getLogger(__name__)

NUCLEUS_CATEGORY = {"id": 1, "name": "nucleus"}
_AREA_KEYS = {"small": "APs", "medium": "APm", "large": "APl"}


def _xywh(annotation: dict) -> list[float]:
    bbox = annotation["bbox"]
    mode = annotation.get("bbox_mode", BoxMode.XYWH_ABS)
    return [float(v) for v in BoxMode.convert(list(map(float, bbox)), mode, BoxMode.XYWH_ABS)]


def dataset_dicts_to_coco(dataset_dicts: Iterable[dict]) -> dict:
    """COCO ground-truth dict (images, annotations with RLE masks and areas) from detectron2 dataset dicts."""
    images, annotations = [], []
    for index, record in enumerate(dataset_dicts):
        image_id = record.get("image_id", index)
        h, w = int(record["height"]), int(record["width"])
        images.append(
            {"id": image_id, "height": h, "width": w, "file_name": str(record.get("file_name", ""))}
        )
        for ann in record.get("annotations", []):
            try:
                rle = annotation_to_rle(ann, h, w)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{record.get('file_name', image_id)}: bad annotation ({exc})") from exc
            rle = dict(rle)
            if isinstance(rle["counts"], bytes):
                rle["counts"] = rle["counts"].decode("ascii")
            bbox = _xywh(ann) if "bbox" in ann else mask_util.toBbox(rle).tolist()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": NUCLEUS_CATEGORY["id"],
                    "segmentation": rle,
                    "area": float(mask_util.area(rle)),
                    "bbox": bbox,
                    "iscrowd": int(ann.get("iscrowd", 0)),
                }
            )
    return {"images": images, "annotations": annotations, "categories": [dict(NUCLEUS_CATEGORY)]}


def _summarize(precision: np.ndarray, recall: np.ndarray, params) -> dict[str, float]:
    """detectron2-style numbers (x100; NaN where undefined) from COCOeval's accumulated arrays."""
    iou = np.asarray(params.iouThrs)
    max_dets = list(params.maxDets)
    area = list(params.areaRngLbl)

    def mean(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean() * 100) if valid.size else float("nan")

    a_all = area.index("all")
    t50 = int(np.argmin(np.abs(iou - 0.5)))
    t75 = int(np.argmin(np.abs(iou - 0.75)))
    out = {
        "AP": mean(precision[:, :, :, a_all, -1]),
        "AP50": mean(precision[t50, :, :, a_all, -1]),
        "AP75": mean(precision[t75, :, :, a_all, -1]),
    }
    for label, key in _AREA_KEYS.items():
        if label in area:
            out[key] = mean(precision[:, :, :, area.index(label), -1])
    for m_index, m in enumerate(max_dets):
        out[f"AP@{m}"] = mean(precision[:, :, :, a_all, m_index])
    for m_index, m in enumerate(max_dets):
        out[f"AR@{m}"] = mean(recall[:, :, a_all, m_index])
    return out


def coco_evaluate(
    coco_gt: dict,
    results: Sequence[dict],
    iou_types: Sequence[str] = ("bbox", "segm"),
    max_dets: Sequence[int] = (100, 1000),
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """COCO AP of detection ``results`` (COCO result dicts with score, bbox and RLE segmentation).

    Returns ``(metrics, pr_curves)``: ``metrics[iou_type]`` holds AP, AP50, AP75, APs/m/l at the largest
    cap, and ``AP@m``/``AR@m`` for every cap ``m``; ``pr_curves[iou_type]`` holds precision at IoU 0.5
    and 0.75 against COCO's 101 recall points (largest cap), for the precision-recall plot.
    Without detections, AP is 0 when there is ground truth; without ground truth it is NaN.
    """
    max_dets = sorted(int(m) for m in max_dets)
    if not max_dets or max_dets[0] < 1:
        raise ValueError(f"max_dets must be positive detection caps, got {max_dets}")
    gt = copy.deepcopy(coco_gt)
    gt.setdefault("categories", [dict(NUCLEUS_CATEGORY)])
    for ann in gt.get("annotations", []):
        ann["category_id"] = NUCLEUS_CATEGORY["id"]
    gt["categories"] = [dict(NUCLEUS_CATEGORY)]
    n_gt = sum(1 for a in gt.get("annotations", []) if not a.get("iscrowd", 0))
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"unknown COCO iou type {iou_type!r} (bbox, segm)")
        dets = []
        for r in results:
            d = dict(r, category_id=NUCLEUS_CATEGORY["id"])
            if iou_type == "segm":
                # as detectron2: without the box, the mask's area (not the box's) decides small/medium/large
                d.pop("bbox", None)
                if "segmentation" not in d:
                    continue
            dets.append(d)
        if not dets:
            value = 0.0 if n_gt else float("nan")
            keys = ["AP", "AP50", "AP75", *_AREA_KEYS.values()]
            keys += [f"AP@{m}" for m in max_dets] + [f"AR@{m}" for m in max_dets]
            metrics[iou_type] = {k: value for k in keys}
            continue
        coco_gt_api = COCO(gt)
        coco_dt_api = coco_gt_api.loadRes(dets)
        evaluator = COCOeval_faster(coco_gt_api, coco_dt_api, iou_type, print_function=logger.debug)
        evaluator.params.maxDets = max_dets
        evaluator.evaluate()
        evaluator.accumulate()
        precision = np.asarray(evaluator.eval["precision"])
        recall = np.asarray(evaluator.eval["recall"])
        metrics[iou_type] = _summarize(precision, recall, evaluator.params)
        a_all = list(evaluator.params.areaRngLbl).index("all")
        iou = np.asarray(evaluator.params.iouThrs)
        curves[iou_type] = {
            "recall": np.asarray(evaluator.params.recThrs).tolist(),
            "precision50": precision[int(np.argmin(np.abs(iou - 0.5))), :, 0, a_all, -1].tolist(),
            "precision75": precision[int(np.argmin(np.abs(iou - 0.75))), :, 0, a_all, -1].tolist(),
        }
    return metrics, curves
