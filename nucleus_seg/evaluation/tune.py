"""Picking inference settings on validation data: the model's input scale, flip TTA, the score threshold and
whether boundaries move to their own edge (``NUCLEUS.PREDICT.BOUNDARY_LEVEL``).

As Cellpose's size model and StarDist's threshold optimisation do, on validation data only. Each scale/TTA
pair is one inference pass, run with the image-based steps off; every threshold is then scored on that pass's
stored detections, with ``MIN_SIGNIFICANCE`` and each boundary level applied to the label image at that
threshold as the predictor applies them (the scale estimate does not depend on the output threshold, so a row
is exactly what its config then scores).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from detectron2.evaluation import inference_on_dataset

from ..config import predict_batch_size
from ..data.io import normalize_from_cfg, read_image
from ..inference.postprocess import finish_labels, needs_image
from ..inference.tiling import LabelPrediction
from ..structures import gt_label_image
from ..utils.files import atomic_write, write_json
from .evaluator import NucleusEvaluator, build_report, prediction_label_image
from .matching import image_counts
from .runner import _input_batches, predictor_model, register_eval_datasets

__all__ = ["TUNE_BOUNDARY_LEVEL", "TUNE_DIAMETERS", "TUNE_THRESHOLDS", "TUNE_TTA_MARGIN", "tune_boundary_levels",
           "tune_diameters", "tune_inference"]

logger = logging.getLogger(__name__)

TUNE_DIAMETERS = (0.0, 28.0)  # 0: no rescale; else TRAIN_DIAMETER with DIAMETER "auto"
TUNE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TUNE_TTA_MARGIN = 0.005  # flip TTA costs 4x: it is chosen only if it beats the best single pass by more
TUNE_BOUNDARY_LEVEL = 0.4  # tried beside 0 when the config leaves BOUNDARY_LEVEL off (chosen on synthetic fields)


def tune_diameters(cfg) -> tuple[float, ...]:
    """Inference diameters worth trying: a model trained with SCALE_TO_DIAMETER knows one size band, from
    its own diameter up to the top of its scale jitter; larger nuclei put more stride-4 feature cells across
    each boundary, so the upper half of the band is where masks may get sharper. Others: as is, or 28 px."""
    if not cfg.INPUT.NUCLEUS.SCALE_TO_DIAMETER:
        return TUNE_DIAMETERS
    own, top = float(cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER), max(float(cfg.INPUT.NUCLEUS.SCALE_RANGE[1]), 1.0)
    return tuple(sorted({round(own * f, 1) for f in (1.0, (1.0 + top) / 2, top)}))


def tune_boundary_levels(cfg) -> tuple[float, ...]:
    """Off, and the config's level (or ``TUNE_BOUNDARY_LEVEL`` when it has none)."""
    level = float(cfg.NUCLEUS.PREDICT.BOUNDARY_LEVEL)
    return (0.0, level if level > 0 else TUNE_BOUNDARY_LEVEL)


def _with_settings(cfg, diameter: float, tta: bool, score_thresh: float, boundary_level: float | None = None):
    """``cfg`` predicting at ``diameter`` (0: as is; else it is TRAIN_DIAMETER with "auto"), TTA, threshold
    (and boundary level, when given)."""
    trial = cfg.clone()
    trial.defrost()
    trial.NUCLEUS.PREDICT.DIAMETER = -1.0 if diameter > 0 else 0.0
    if diameter > 0:
        trial.NUCLEUS.PREDICT.TRAIN_DIAMETER = float(diameter)
    trial.NUCLEUS.PREDICT.TTA = bool(tta)
    trial.NUCLEUS.PREDICT.SCORE_THRESH = float(score_thresh)
    if boundary_level is not None:
        trial.NUCLEUS.PREDICT.BOUNDARY_LEVEL = float(boundary_level)
    return trial


def _score_pass(cfg, dataset: str, diameter: float, tta: bool, thresholds: tuple[float, ...],
                gt_cache: dict, levels: tuple[float, ...] = (0.0,)) -> list[dict]:
    """One inference pass at the lowest threshold, the image-based steps off; one row per threshold and
    boundary level, scored on its detections with the steps applied at that threshold."""
    trial = _with_settings(cfg, diameter, tta, min(thresholds))
    trial.NUCLEUS.EVAL.COCO = False
    min_significance = float(trial.NUCLEUS.PREDICT.MIN_SIGNIFICANCE)
    min_edge = float(trial.NUCLEUS.PREDICT.MIN_EDGE_SIGNIFICANCE)
    trial.NUCLEUS.PREDICT.MIN_SIGNIFICANCE = 0.0
    trial.NUCLEUS.PREDICT.MIN_EDGE_SIGNIFICANCE = 0.0
    trial.NUCLEUS.PREDICT.BOUNDARY_LEVEL = 0.0
    evaluator = NucleusEvaluator.from_config(trial, dataset, None)
    batches = _input_batches(evaluator, predict_batch_size(trial))
    start = time.perf_counter()
    inference_on_dataset(predictor_model(trial), batches, evaluator)
    seconds = time.perf_counter() - start
    norms: dict = {}
    rows = []
    for thresh in thresholds:
        for level in levels:
            records = []
            for r in evaluator.records:
                if r["image_id"] not in gt_cache:
                    gt_cache[r["image_id"]] = gt_label_image(evaluator.gt_by_id[r["image_id"]])
                labels = prediction_label_image(r, thresh)
                if needs_image(min_significance, level, min_edge):
                    if r["image_id"] not in norms:
                        norms[r["image_id"]] = normalize_from_cfg(read_image(r["file_name"]), trial)
                    scores = [d["score"] for d in r["detections"] if d["score"] >= thresh]
                    shown = LabelPrediction(labels, np.asarray(scores, np.float32), np.zeros((len(scores), 4)))
                    labels = finish_labels(shown, norms[r["image_id"]], min_significance, level, min_edge).labels
                records.append(dict(r, counts=image_counts(gt_cache[r["image_id"]], labels)))
            report = build_report(records, dataset, thresh)
            rows.append({"train_diameter": float(diameter), "tta": bool(tta), "score_thresh": float(thresh),
                         "boundary_level": float(level), "dsb_score": report["dsb_score"], "ap50": report["ap50"],
                         "f1_50": report["f1_50"], "seconds": round(seconds, 2)})
    return rows


def tune_inference(
    cfg, dataset: str, output: str | Path, diameters: tuple[float, ...] | None = None,
    tta: tuple[bool, ...] = (False, True), thresholds: tuple[float, ...] = TUNE_THRESHOLDS,
    boundary_levels: tuple[float, ...] | None = None,
) -> dict:
    """Pick the inference settings (model scale, flip TTA, score threshold, boundary level) that maximise the DSB
    score on ``dataset``. Writes ``output/tune.json`` (every setting's score) and ``output/tuned.yaml`` (``cfg`` with
    the chosen ``NUCLEUS.PREDICT`` keys; pass it as ``--config-file``)."""
    if diameters is None:
        diameters = tune_diameters(cfg)
    if boundary_levels is None:
        boundary_levels = tune_boundary_levels(cfg)
    register_eval_datasets(cfg, [dataset])
    rows: list[dict] = []
    gt_cache: dict = {}
    if False in tta:
        for diameter in diameters:
            rows += _score_pass(cfg, dataset, diameter, False, thresholds, gt_cache, boundary_levels)
    if True in tta:
        diameter = max(rows, key=lambda r: r["dsb_score"])["train_diameter"] if rows else diameters[0]
        rows += _score_pass(cfg, dataset, diameter, True, thresholds, gt_cache, boundary_levels)
    best = max(rows, key=lambda r: r["dsb_score"])
    single = max((r for r in rows if not r["tta"]), key=lambda r: r["dsb_score"], default=None)
    if best["tta"] and single is not None and best["dsb_score"] - single["dsb_score"] <= TUNE_TTA_MARGIN:
        best = single
    tuned = _with_settings(cfg, best["train_diameter"], best["tta"], best["score_thresh"], best["boundary_level"])
    out = Path(output)
    atomic_write(out / "tuned.yaml", tuned.dump())
    result = {"dataset": dataset, "best": best, "rows": rows}
    write_json(out / "tune.json", result)
    for r in sorted(rows, key=lambda r: -r["dsb_score"])[:10]:
        logger.info("tune %s: diameter %s tta %s thresh %.2f boundary %g -> dsb %.4f (%.1f s)", dataset,
                    r["train_diameter"] or "as is", r["tta"], r["score_thresh"], r["boundary_level"], r["dsb_score"],
                    r["seconds"])
    return result
