"""Scoring jobs: a model, the classical baseline or any tool's label images against ground truth.

One path for every model score: ``nucleus-eval``, ``nucleus-eval --tune`` and training-time evaluation all
run :class:`~nucleus_seg.inference.predictor.NucleusPredictor` (the config's diameter, TTA, AMP and score
threshold) over a registered dataset with :class:`~.evaluator.NucleusEvaluator`, so ``model_best.pth`` is
picked by the number users then get. Inputs are sharded over distributed ranks and gathered.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from detectron2.evaluation import inference_context, inference_on_dataset, print_csv_format
from detectron2.structures import BitMasks, Instances
from detectron2.utils import comm

from ..config import predict_batch_size
from ..data.catalog import dataset_dirname, register_datasets_from_cfg
from ..data.io import read_image, read_label_image, select_channel
from ..data.outlines import OUTLINE_STEM_ENDINGS, OUTLINE_SUFFIXES, is_outline_file, read_annotation
from ..inference.baseline import watershed_segment
from ..inference.predictor import NucleusPredictor
from ..structures import gt_label_image, label_image_to_masks
from ..utils.files import IMAGE_SUFFIXES, LABEL_SUFFIXES, check_writable, safe_name
from .evaluator import NucleusEvaluator, build_report, log_report, prediction_label_image, write_report
from .matching import image_counts
from .plots import plot_curves, plot_overlay, worst_rows

__all__ = [
    "DatasetEvaluation", "EvalError", "evaluate_datasets", "evaluate_label_folders", "index_files", "match_key",
    "predictor_model", "summary_line",
]

logger = logging.getLogger(__name__)

# Name endings that tools add to label files; stripped (repeatedly, any case) before matching stems.
STEM_SUFFIXES = (
    "_cp_masks", "_masks", "_mask", "_labels", "_label", "_predictions", "_prediction", "_pred", "_gt",
    "_segmentation", "_seg", "_instances", *OUTLINE_STEM_ENDINGS,
)
ANNOTATION_SUFFIXES = (*LABEL_SUFFIXES, *OUTLINE_SUFFIXES)  # label images, Fiji ROI sets, QuPath GeoJSON
_STEM_RE = re.compile("(" + "|".join(re.escape(s) for s in STEM_SUFFIXES) + ")$", re.IGNORECASE)

Model = Callable[[list[dict]], list[dict]]


class EvalError(Exception):
    """Bad or unmatched data; the message says which files and what is wrong."""


@dataclass
class DatasetEvaluation:
    """One dataset's evaluation: the evaluator's results (what detectron2's hooks read; empty off the main
    rank) and the full report written as metrics.json (None off the main rank)."""

    results: OrderedDict
    report: dict | None


# ----------------------------------------------------------------------------- label folders
def match_key(path: str | Path) -> str:
    """The name a file is matched by: its stem less ``.ome`` and tool suffixes (``a_cp_masks.png``: ``a``)."""
    stem = Path(path).name
    for suffix in sorted((*IMAGE_SUFFIXES, *OUTLINE_SUFFIXES), key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if stem.lower().endswith(".ome"):
        stem = stem[:-4]
    while True:
        shorter = _STEM_RE.sub("", stem)
        if shorter == stem or not shorter:
            return stem
        stem = shorter


def index_files(path: str | Path, suffixes: tuple[str, ...] = ANNOTATION_SUFFIXES) -> dict[str, Path]:
    """``{match key: file}`` for a folder (or one file); two files with the same key are an error."""
    path = Path(path)
    if path.is_file():
        return {match_key(path): path}
    if not path.is_dir():
        raise EvalError(f"{path}: no such file or folder")
    out: dict[str, Path] = {}
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.suffix.lower() not in suffixes or f.name.startswith("."):
            continue
        key = match_key(f)
        if key in out:
            raise EvalError(f"{out[key]} and {f} both match the name {key!r}; keep one of them in {path}")
        out[key] = f
    return out


def _preview(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def evaluate_label_folders(
    gt: str | Path, pred: str | Path, output: str | Path, images: str | Path | None = None, num_worst: int = 4,
    matched_only: bool = False,
) -> dict:
    """Score predicted label images against ground-truth ones; write metrics.json and PNGs; return the report.

    Files pair up by :func:`match_key`. A ground-truth image without a prediction scores as one where
    every nucleus was missed (``missing_pred`` in the report), unless ``matched_only`` (then it is left out,
    as a tool that skipped images would wish). Predictions without ground truth are listed
    (``unmatched_pred``) and not scored: nothing says what they should have found.
    """
    out = check_writable(output)
    gt_files, pred_files = index_files(gt), index_files(pred)
    if not gt_files:
        raise EvalError(f"{gt}: no label images or outline files ({', '.join(ANNOTATION_SUFFIXES)})")
    if not pred_files:
        raise EvalError(f"{pred}: no label images or outline files ({', '.join(ANNOTATION_SUFFIXES)})")
    matched = sorted(set(gt_files) & set(pred_files))
    missing_pred = sorted(str(gt_files[k]) for k in set(gt_files) - set(pred_files))
    unmatched_pred = sorted(str(pred_files[k]) for k in set(pred_files) - set(gt_files))
    if not matched:
        raise EvalError(
            f"no file in {pred} matches a file in {gt} by name (after dropping suffixes like "
            f"{', '.join(STEM_SUFFIXES[:5])}); ground truth: {_preview([p.name for p in gt_files.values()])}; "
            f"predictions: {_preview([p.name for p in pred_files.values()])}"
        )
    if missing_pred:
        logger.warning("%d ground-truth images have no prediction (%s): %s", len(missing_pred),
                       "left out" if matched_only else "scored as all nuclei missed", _preview(missing_pred))
    if unmatched_pred:
        logger.warning("%d prediction files have no ground truth (not scored): %s", len(unmatched_pred),
                       _preview(unmatched_pred))

    image_files = index_files(images, IMAGE_SUFFIXES) if images else {}

    def read_pair(key: str) -> tuple[np.ndarray, np.ndarray]:
        g_file, p_file = gt_files[key], pred_files.get(key)
        # outlines take the size of the image they were drawn on: the other side's label image, else --images
        label_file = next((f for f in (g_file, p_file) if f is not None and not is_outline_file(f)), None)
        first = read_label_image(label_file) if label_file is not None else None
        shape = first.shape if first is not None else _image_shape(g_file, key, image_files)
        g = first if label_file == g_file else read_annotation(g_file, shape)
        if p_file is None:
            return g, np.zeros_like(g)
        p = first if label_file == p_file else read_annotation(p_file, shape)
        if g.shape != p.shape:
            raise EvalError(f"{pred_files[key]} is {p.shape[0]}x{p.shape[1]} but its ground truth "
                            f"{gt_files[key]} is {g.shape[0]}x{g.shape[1]}")
        return g, p

    keys = matched if matched_only else sorted(gt_files)
    records = [{"image_id": key, "file_name": str(gt_files[key]), "counts": image_counts(*read_pair(key))}
               for key in keys]
    report = build_report(records, str(gt))
    report.update(pred=str(pred), missing_pred=missing_pred, unmatched_pred=unmatched_pred,
                  matched_only=matched_only)
    log_report(report, logger)
    write_report(report, out)

    def load(row: dict):
        key = row["image_id"]
        image = read_image(image_files[key]) if key in image_files else None
        return (*read_pair(key), image)

    write_figures(report, Path(output), load, num_worst)
    return report


def _image_shape(outlines: Path, key: str, image_files: dict[str, Path]) -> tuple[int, int]:
    """The size of the image ``outlines`` were drawn on, when the other side is outlines too (or missing)."""
    if key not in image_files:
        raise EvalError(f"{outlines}: outlines need the size of their image, and no label image or --images file "
                        f"matches {key!r}: pass --images with the images")
    return tuple(read_image(image_files[key]).shape[:2])


# ----------------------------------------------------------------------------- model / baseline
def label_to_instances(label: np.ndarray) -> Instances:
    """detectron2 ``Instances`` (masks, boxes, score 1, class 0) of a label image, for the evaluators."""
    _, masks = label_image_to_masks(label)
    masks = torch.from_numpy(masks)
    instances = Instances(tuple(label.shape))
    instances.pred_masks = masks
    instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
    instances.scores = torch.ones(len(masks))
    instances.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
    return instances


def watershed_model(inputs: list[dict], channel: int = -1) -> list[dict]:
    """The classical baseline as a detectron2-style model: raw image files in (their nuclear ``channel``, as
    INPUT.NORMALIZE.CHANNEL gives the model), Instances out."""
    return [{"instances": label_to_instances(watershed_segment(select_channel(read_image(inp["file_name"]), channel)))}
            for inp in inputs]


def predictor_model(cfg, model: torch.nn.Module | None = None) -> Model:
    """``NucleusPredictor`` as a detectron2-style model reading each input's ``file_name``; with ``model``,
    that (training) model is put in eval mode for each call and given back in the mode it was in."""
    predictor = NucleusPredictor(cfg, model=model)

    def run(inputs: list[dict]) -> list[dict]:
        with inference_context(predictor.model):
            return predictor.predict_batch([read_image(inp["file_name"]) for inp in inputs])

    return run


def _input_batches(evaluator: NucleusEvaluator, batch: int) -> list[list[dict]]:
    """This rank's share of the evaluator's images as model inputs, ``batch`` per call."""
    inputs = [{k: r[k] for k in ("file_name", "image_id", "height", "width")} for r in evaluator.dataset_dicts]
    if not inputs:
        raise EvalError(f"dataset {evaluator.dataset_name} has no images")
    mine = inputs[comm.get_rank()::comm.get_world_size()]
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]


def register_eval_datasets(cfg, datasets: list[str]) -> None:
    """As the trainer does: synthetic sets regenerate with cfg.NUCLEUS.SYNTH.*, so training and evaluation
    see the same images; unknown names fail with the list of nucleus datasets."""
    check = cfg.clone()
    check.defrost()
    check.DATASETS.TRAIN, check.DATASETS.TEST = (), tuple(datasets)
    try:
        register_datasets_from_cfg(check)
    except KeyError as exc:
        raise EvalError(str(exc.args[0])) from exc


def evaluate_datasets(
    cfg, datasets: list[str], output: str | Path | None, baseline: str | None = None, num_worst: int = 4,
    model: torch.nn.Module | None = None,
) -> dict[str, DatasetEvaluation]:
    """Run the model (or baseline) and ``NucleusEvaluator`` on each dataset; ``output/<dataset>/`` gets
    metrics.json, curves.png and the worst images' overlays (main rank). ``model`` scores a model already in
    memory (training) instead of ``MODEL.WEIGHTS``."""
    if output is not None and comm.is_main_process():
        check_writable(output)
    register_eval_datasets(cfg, datasets)
    channel = int(cfg.INPUT.NORMALIZE.CHANNEL)
    run_model = (partial(watershed_model, channel=channel) if baseline == "watershed"
                 else predictor_model(cfg, model))
    batch = predict_batch_size(cfg) if baseline is None else 1
    evaluations = {}
    for name in datasets:
        out_dir = None if output is None else Path(output) / dataset_dirname(name)
        evaluator = NucleusEvaluator.from_config(cfg, name, None if out_dir is None else str(out_dir))
        results = inference_on_dataset(run_model, _input_batches(evaluator, batch), evaluator)
        report = evaluator.report if comm.is_main_process() else None
        if report is not None:
            print_csv_format(results)
            if baseline:
                report["baseline"] = baseline
            if out_dir is not None:
                write_figures(report, out_dir, _dataset_loader(evaluator, channel), num_worst)
        evaluations[name] = DatasetEvaluation(results, report)
    return evaluations


def _dataset_loader(evaluator: NucleusEvaluator, channel: int = -1) -> Callable[[dict], tuple]:
    """``load(row) -> (gt, pred, image)`` of an evaluated dataset's per-image row, for the figures (the image as
    the model saw it: the nuclear ``channel`` of a composite)."""
    records = {r["image_id"]: r for r in evaluator.records}

    def load(row: dict):
        record = evaluator.gt_by_id[row["image_id"]]
        pred = prediction_label_image(records[row["image_id"]], evaluator.score_thresh)
        return gt_label_image(record), pred, select_channel(read_image(record["file_name"]), channel)

    return load


# ----------------------------------------------------------------------------- shared
def write_figures(report: dict, out_dir: Path, load: Callable, num_worst: int) -> None:
    """curves.png and overlays of the ``num_worst`` lowest-DSB images (``load(row) -> gt, pred, image``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(report, out_dir / "curves.png")
    for old in out_dir.glob("worst_[0-9][0-9]_*.png"):  # an earlier run's worst images, replaced as metrics.json is
        old.unlink()
    for rank, row in enumerate(worst_rows(report, num_worst), start=1):
        gt, pred, image = load(row)
        stem = safe_name(Path(str(row["file_name"])).stem, max_length=80)
        title = (f"{Path(str(row['file_name'])).name}: DSB {row['dsb_score']:.3f}, F1@0.5 {row['f1_50']:.3f} "
                 f"(TP {row['tp50']}, FP {row['fp50']}, FN {row['fn50']})")
        plot_overlay(gt, pred, out_dir / f"worst_{rank:02d}_{stem}.png", image=image, title=title)
    logger.info("Wrote %s/metrics.json, curves.png and %d worst-image overlays", out_dir,
                min(num_worst, len(report["per_image"])))


def summary_line(name: str, report: dict) -> str:
    """One line of the headline numbers, as the CLI prints them."""
    segm = (report.get("coco") or {}).get("segm") or {}
    coco = f" mask_AP={segm['AP']:.2f}" if segm.get("AP") is not None else ""
    return (
        f"{name}: dsb_score={report['dsb_score']:.4f} ap50={report['ap50']:.4f} f1_50={report['f1_50']:.4f} "
        f"pq={report['pq']:.4f} images={report['n_images']} gt={report['n_gt']} pred={report['n_pred']}{coco}"
    )

