"""Evaluation: the DSB score and matching statistics (:mod:`.matching`), COCO AP (:mod:`.coco`), the
``NucleusEvaluator`` (:mod:`.evaluator`), scoring jobs (:mod:`.runner`), tuning (:mod:`.tune`) and figures."""

from .coco import coco_evaluate, dataset_dicts_to_coco
from .evaluator import (
    NucleusEvaluator,
    build_nucleus_evaluator,
    build_report,
    prediction_label_image,
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
from .runner import evaluate_datasets, evaluate_label_folders
from .tune import tune_inference

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
    "evaluate_datasets",
    "evaluate_label_folders",
    "image_counts",
    "image_metrics",
    "label_overlap",
    "match_counts",
    "match_pairs",
    "matching_stats",
    "prediction_label_image",
    "rates",
    "tune_inference",
    "write_report",
]
