"""Evaluation: DSB score and matching stats on label images, COCO AP, ``NucleusEvaluator``, plots."""

from .coco import coco_evaluate, dataset_dicts_to_coco
from .evaluator import (
    NucleusEvaluator,
    build_nucleus_evaluator,
    build_report,
    gt_label_image,
    prediction_label_image,
    rles_to_label_image,
    write_report,
)
from .matching import (
    IOU_THRESHOLDS,
    ImageCounts,
    Overlap,
    aggregate_metrics,
    dsb_score,
    image_counts,
    image_metrics,
    label_overlap,
    match_counts,
    match_pairs,
    matching_stats,
    rates,
)

__all__ = [
    "IOU_THRESHOLDS",
    "ImageCounts",
    "NucleusEvaluator",
    "Overlap",
    "aggregate_metrics",
    "build_nucleus_evaluator",
    "build_report",
    "coco_evaluate",
    "dataset_dicts_to_coco",
    "dsb_score",
    "gt_label_image",
    "image_counts",
    "image_metrics",
    "label_overlap",
    "match_counts",
    "match_pairs",
    "matching_stats",
    "prediction_label_image",
    "rates",
    "rles_to_label_image",
    "write_report",
]
