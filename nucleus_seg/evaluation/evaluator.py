"""``NucleusEvaluator``: DSB score, matching stats and COCO AP of a model on a registered dataset.

Per image, ``process()`` paints the predictions scoring at least ``score_thresh`` into one label image
(overlaps go to the higher score, as the Matterport sample's submission did), matches it against the
ground-truth label image and keeps only the match counts plus the detections as compressed RLE, so
memory per image is small. ``evaluate()`` gathers over processes (DDP) and the main process reports:

* ``nucleus``: DSB score and StarDist-style stats (see :mod:`nucleus_seg.evaluation.matching` for the
  definitions and the empty-image rules), rates averaged over images, counts summed;
* ``bbox`` / ``segm``: COCO AP over all detections (not only those above ``score_thresh``), at each
  cap of ``max_dets`` (:mod:`nucleus_seg.evaluation.coco`).

With ``output_dir`` it writes ``metrics.json`` (:func:`build_report` documents its keys).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

from ..structures import gt_label_image, masks_to_label_image, rles_to_label_image
from ..utils.files import write_json
from .coco import coco_evaluate, dataset_dicts_to_coco
from .matching import IOU_THRESHOLDS, aggregate_metrics, image_counts, image_metrics, iou_curve

logger = logging.getLogger(__name__)

#: Headline keys shown in the log table (all are in metrics.json and in the results dict).
SUMMARY_KEYS = (
    "dsb_score",
    "ap50",
    "ap75",
    "precision50",
    "recall50",
    "f1_50",
    "pq",
    "mean_matched_iou",
    "tp50",
    "fp50",
    "fn50",
    "n_images",
    "n_gt",
    "n_pred",
)


# ----------------------------------------------------------------------------- label images from RLE
def prediction_label_image(record: dict, score_thresh: float) -> np.ndarray:
    """The thresholded prediction label image of an evaluated image, rebuilt from its stored detections."""
    dets = [d for d in record["detections"] if d["score"] >= score_thresh]
    rles = [d["segmentation"] for d in dets]
    return rles_to_label_image(rles, record["height"], record["width"], [d["score"] for d in dets])


# ----------------------------------------------------------------------------- report
def build_report(
    records: Sequence[dict],
    name: str,
    score_thresh: float | None = None,
    coco_metrics: dict | None = None,
    pr_curves: dict | None = None,
) -> dict:
    """The content of metrics.json from per-image records (``file_name``, ``image_id``, ``counts``).

    Top level: ``dataset``, ``score_thresh``, the dataset numbers of ``aggregate_metrics`` (``dsb_score``,
    ``ap50``, ``f1_50``, ``pq``, ... as means over images; ``n_images``, ``n_gt``, ``n_pred``, ``tp50``,
    ... as sums), ``iou_curve`` (mean accuracy/precision/recall/F1 per IoU threshold), ``coco``
    (``{"bbox": {...}, "segm": {...}}`` or None), ``pr_curves`` and ``per_image`` (one row per image:
    ``file_name``, ``image_id`` and the same metric keys), sorted by file name.
    """
    records = sorted(records, key=lambda r: (str(r["file_name"]), str(r["image_id"])))
    rows = [
        {"file_name": str(r["file_name"]), "image_id": r["image_id"], **image_metrics(r["counts"])}
        for r in records
    ]
    summary = aggregate_metrics(
        [{k: v for k, v in row.items() if k not in ("file_name", "image_id")} for row in rows]
    )
    report = {"dataset": name, "score_thresh": score_thresh, "iou_thresholds": list(IOU_THRESHOLDS)}
    report.update(summary)
    report["iou_curve"] = iou_curve([r["counts"] for r in records])
    report["coco"] = coco_metrics
    report["pr_curves"] = pr_curves
    report["per_image"] = rows
    return report


def log_report(report: dict, log: logging.Logger = logger) -> None:
    """Tables of the headline numbers (and COCO AP) in the log, as detectron2's evaluators do."""
    log.info(
        "Nucleus metrics on %s (%d images):\n%s",
        report["dataset"],
        report["n_images"],
        create_small_table({k: report[k] for k in SUMMARY_KEYS}),
    )
    for iou_type, values in (report.get("coco") or {}).items():
        log.info("COCO %s AP on %s:\n%s", iou_type, report["dataset"], create_small_table(values))


def write_report(report: dict, output_dir: str | os.PathLike) -> str:
    """Write ``output_dir/metrics.json`` (strict JSON: undefined numbers are null); returns its path."""
    return str(write_json(os.path.join(output_dir, "metrics.json"), report))


# ----------------------------------------------------------------------------- evaluator
class NucleusEvaluator(DatasetEvaluator):
    """DSB score, matching stats (IoU 0.5/0.75) and COCO box/mask AP on a registered nucleus dataset."""

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | None = None,
        score_thresh: float = 0.5,
        max_dets: tuple = (100, 1000),
        coco: bool = True,
        distributed: bool = True,
    ) -> None:
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.score_thresh = float(score_thresh)
        self.max_dets = tuple(int(m) for m in max_dets)
        self.coco = bool(coco)
        self.distributed = bool(distributed)
        if dataset_name not in DatasetCatalog.list():
            raise KeyError(
                f"dataset {dataset_name!r} is not registered (registered: {DatasetCatalog.list()})"
            )
        #: the dataset's dicts (ground truth), and the same keyed by image_id
        self.dataset_dicts: list[dict] = list(DatasetCatalog.get(dataset_name))
        self.gt_by_id: dict = {r.get("image_id", i): r for i, r in enumerate(self.dataset_dicts)}
        self.records: list[dict] = []  # per image, after evaluate() on the main process
        self.report: dict | None = None
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: str | None = None) -> NucleusEvaluator:
        """Evaluator with the thresholds of ``cfg.NUCLEUS.PREDICT.SCORE_THRESH`` and ``cfg.NUCLEUS.EVAL``."""
        return cls(
            dataset_name,
            output_dir,
            score_thresh=cfg.NUCLEUS.PREDICT.SCORE_THRESH,
            max_dets=tuple(cfg.NUCLEUS.EVAL.MAX_DETS),
            coco=cfg.NUCLEUS.EVAL.COCO,
        )

    def reset(self) -> None:
        self._records: list[dict] = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """Match each image's thresholded prediction label image to its GT; keep counts and RLEs only."""
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            record = self.gt_by_id.get(image_id)
            name = inp.get("file_name", image_id)
            if record is None:
                raise KeyError(f"{name}: image_id {image_id!r} is not in dataset {self.dataset_name!r}")
            instances = out["instances"].to("cpu")
            h, w = int(record["height"]), int(record["width"])
            if tuple(instances.image_size) != (h, w):
                raise ValueError(
                    f"{name}: predictions are {tuple(instances.image_size)} but the image is {(h, w)}; "
                    "predict at the original resolution"
                )
            if len(instances) and not instances.has("pred_masks"):
                raise ValueError(f"{name}: predictions have no pred_masks (is MODEL.MASK_ON off?)")
            scores = instances.scores.numpy() if len(instances) else np.zeros(0, np.float32)
            keep = np.flatnonzero(scores >= self.score_thresh)
            if len(keep):
                masks = instances.pred_masks[keep].numpy()
                masks = masks >= 0.5 if masks.dtype.kind == "f" else masks.astype(bool, copy=False)
                pred = masks_to_label_image(masks, scores[keep])
            else:
                pred = np.zeros((h, w), dtype=np.int32)
            counts = image_counts(gt_label_image(record), pred)
            dets = instances if self.coco else instances[keep]
            self._records.append(
                {
                    "image_id": image_id,
                    "file_name": str(record.get("file_name", name)),
                    "height": h,
                    "width": w,
                    "counts": counts,
                    "detections": instances_to_coco_json(dets, image_id) if len(dets) else [],
                }
            )

    def evaluate(self) -> OrderedDict:
        """Gather per-image records; on the main process compute, log and write the metrics."""
        if self.distributed:
            comm.synchronize()
            records = list(itertools.chain(*comm.gather(self._records, dst=0)))
            if not comm.is_main_process():
                return OrderedDict()
        else:
            records = self._records
        unique: dict = {}
        for r in records:  # a sampler may pad with repeats
            unique.setdefault(r["image_id"], r)
        records = list(unique.values())
        if not records:
            logger.warning("[NucleusEvaluator] %s: no predictions were processed", self.dataset_name)
            return OrderedDict()
        coco_metrics = pr_curves = None
        if self.coco:
            gt = dataset_dicts_to_coco([self.gt_by_id[r["image_id"]] for r in records])
            dets = [d for r in records for d in r["detections"]]
            coco_metrics, pr_curves = coco_evaluate(gt, dets, ("bbox", "segm"), self.max_dets)
        self.records = records
        self.report = build_report(records, self.dataset_name, self.score_thresh, coco_metrics, pr_curves)
        log_report(self.report)
        if self.output_dir:
            path = write_report(self.report, self.output_dir)
            logger.info("Wrote %s", path)
        results = OrderedDict()
        results["nucleus"] = {
            k: float(v)
            for k, v in self.report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "score_thresh"
        }
        for iou_type, values in (coco_metrics or {}).items():
            results[iou_type] = dict(values)
        return copy.deepcopy(results)


def build_nucleus_evaluator(cfg, dataset_name: str, output_dir: str | None = None) -> NucleusEvaluator:
    """``NucleusEvaluator.from_config`` as a plain function (for trainers' ``build_evaluator``)."""
    return NucleusEvaluator.from_config(cfg, dataset_name, output_dir)
