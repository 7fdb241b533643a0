"""``nucleus-eval``: score a model, the classical baseline, or any tool's label images against ground truth.

Three modes, same metrics and outputs (``metrics.json``, ``curves.png``, ``worst_NN_<name>.png``):

* model:    ``nucleus-eval --config-file F MODEL.WEIGHTS W [--dataset NAME ...] [--output OUT]``
  runs ``NucleusPredictor`` on each registered dataset (default: the config's DATASETS.TEST) and
  writes ``OUT/<dataset>/...``; COCO box/mask AP is included.
* baseline: ``nucleus-eval --baseline watershed [--config-file F] [--dataset NAME ...]`` does the same
  with Otsu + watershed instead of a model (all scores 1, so its COCO AP is only indicative).
* labels:   ``nucleus-eval --gt DIR --pred DIR [--images DIR] [--output OUT]`` scores label-image
  folders (TIFF/PNG, 8/16/32-bit ids) from StarDist, Cellpose, CellProfiler, ... matched by file stem
  (suffixes such as ``_labels``, ``_masks``, ``_cp_masks``, ``_pred`` ignored) and writes ``OUT/...``.
  Unmatched files are listed in the log and in metrics.json; nothing matched exits with status 1.

Exit status: 0 done, 1 bad or unmatched data, 2 bad command line.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger("nucleus_seg.eval")

LABEL_SUFFIXES = (".tif", ".tiff", ".png")
# Name endings that tools add to label files; stripped (repeatedly, any case) before matching stems.
STEM_SUFFIXES = (
    "_cp_masks",
    "_masks",
    "_mask",
    "_labels",
    "_label",
    "_predictions",
    "_prediction",
    "_pred",
    "_gt",
    "_segmentation",
    "_seg",
    "_instances",
)
_STEM_RE = re.compile("(" + "|".join(re.escape(s) for s in STEM_SUFFIXES) + ")$", re.IGNORECASE)


class EvalError(Exception):
    """Bad or unmatched data; the message says which files and what is wrong."""


# ----------------------------------------------------------------------------- label mode
def match_key(path: str | Path) -> str:
    """The name a file is matched by: its stem less ``.ome`` and tool suffixes (``a_cp_masks.png``: ``a``)."""
    stem = Path(path).name
    for suffix in sorted(LABEL_SUFFIXES + (".jpg", ".jpeg", ".bmp"), key=len, reverse=True):
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


def index_files(path: str | Path, suffixes: tuple[str, ...] = LABEL_SUFFIXES) -> dict[str, Path]:
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
    gt: str | Path, pred: str | Path, output: str | Path, images: str | Path | None = None, num_worst: int = 4
) -> dict:
    """Score predicted label images against ground-truth ones; write metrics.json and PNGs; return the report.

    Files pair up by :func:`match_key`; unpaired ones are logged and listed in the report, not scored.
    """
    from ..data.io import read_image, read_label_image
    from ..evaluation.evaluator import build_report, log_report, write_report
    from ..evaluation.matching import image_counts

    gt_files, pred_files = index_files(gt), index_files(pred)
    if not gt_files:
        raise EvalError(f"{gt}: no label images ({', '.join(LABEL_SUFFIXES)})")
    if not pred_files:
        raise EvalError(f"{pred}: no label images ({', '.join(LABEL_SUFFIXES)})")
    keys = sorted(set(gt_files) & set(pred_files))
    unmatched_gt = sorted(str(gt_files[k]) for k in set(gt_files) - set(pred_files))
    unmatched_pred = sorted(str(pred_files[k]) for k in set(pred_files) - set(gt_files))
    if not keys:
        gt_names = _preview([p.name for p in gt_files.values()])
        pred_names = _preview([p.name for p in pred_files.values()])
        raise EvalError(
            f"no file in {pred} matches a file in {gt} by name (after dropping suffixes like "
            f"{', '.join(STEM_SUFFIXES[:5])}); ground truth: {gt_names}; predictions: {pred_names}"
        )
    if unmatched_gt:
        logger.warning(
            "%d ground-truth files have no prediction (not scored): %s",
            len(unmatched_gt),
            _preview(unmatched_gt),
        )
    if unmatched_pred:
        logger.warning(
            "%d prediction files have no ground truth (not scored): %s",
            len(unmatched_pred),
            _preview(unmatched_pred),
        )
    records = []
    for key in keys:
        g, p = read_label_image(gt_files[key]), read_label_image(pred_files[key])
        if g.shape != p.shape:
            raise EvalError(
                f"{pred_files[key]} is {p.shape[0]}x{p.shape[1]} but its ground truth "
                f"{gt_files[key]} is {g.shape[0]}x{g.shape[1]}"
            )
        records.append({"image_id": key, "file_name": str(gt_files[key]), "counts": image_counts(g, p)})
    report = build_report(records, str(gt))
    report["pred"] = str(pred)
    report["unmatched_gt"] = unmatched_gt
    report["unmatched_pred"] = unmatched_pred
    log_report(report, logger)
    write_report(report, output)
    image_files = index_files(images, (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")) if images else {}

    def load(row: dict):
        key = row["image_id"]
        image = read_image(image_files[key]) if key in image_files else None
        return read_label_image(gt_files[key]), read_label_image(pred_files[key]), image

    _write_figures(report, Path(output), load, num_worst)
    return report


# ----------------------------------------------------------------------------- model / baseline mode
def _watershed_model(inputs: list[dict]) -> list[dict]:
    """The classical baseline as a detectron2-style model: raw image files in, Instances out."""
    from ..baseline import watershed_segment
    from ..data.io import read_image

    return [
        {"instances": label_to_instances(watershed_segment(read_image(inp["file_name"])))} for inp in inputs
    ]


def label_to_instances(label: np.ndarray):
    """detectron2 ``Instances`` (masks, boxes, score 1, class 0) of a label image, for the evaluators."""
    import torch
    from detectron2.structures import BitMasks, Instances

    from ..structures import label_image_to_masks

    _, masks = label_image_to_masks(label)
    masks = torch.from_numpy(masks)
    instances = Instances(tuple(label.shape))
    instances.pred_masks = masks
    instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
    instances.scores = torch.ones(len(masks))
    instances.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
    return instances


def _predictor_model(cfg) -> Callable[[list[dict]], list[dict]]:
    from ..data.io import read_image
    from ..engine.predictor import NucleusPredictor

    predictor = NucleusPredictor(cfg)

    def model(inputs: list[dict]) -> list[dict]:
        return predictor.predict_batch([read_image(inp["file_name"]) for inp in inputs])

    return model


def _register_eval_datasets(cfg, datasets: list[str]) -> None:
    """As the trainer does: synthetic sets regenerate with cfg.NUCLEUS.SYNTH.*, so training and evaluation
    see the same images; unknown names fail with the list of nucleus datasets."""
    from ..engine.trainer import register_datasets_from_cfg

    check = cfg.clone()
    check.defrost()
    check.DATASETS.TRAIN, check.DATASETS.TEST = (), tuple(datasets)
    try:
        register_datasets_from_cfg(check)
    except KeyError as exc:
        raise EvalError(str(exc.args[0])) from exc


def _input_batches(evaluator, batch: int) -> list[list[dict]]:
    """The evaluator's images as model inputs, ``batch`` per call; EvalError if there are none."""
    inputs = [{k: r[k] for k in ("file_name", "image_id", "height", "width")} for r in evaluator.dataset_dicts]
    if not inputs:
        raise EvalError(f"dataset {evaluator.dataset_name} has no images")
    return [inputs[i : i + batch] for i in range(0, len(inputs), batch)]


def evaluate_datasets(
    cfg, datasets: list[str], output: str | Path, baseline: str | None = None, num_worst: int = 4
) -> dict[str, dict]:
    """Run the model (or baseline) and ``NucleusEvaluator`` on each dataset; returns their reports."""
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    from ..data.io import read_image
    from ..engine.trainer import dataset_dirname
    from ..evaluation.evaluator import NucleusEvaluator, gt_label_image, prediction_label_image

    _register_eval_datasets(cfg, datasets)
    model = _watershed_model if baseline == "watershed" else _predictor_model(cfg)
    batch = max(int(cfg.NUCLEUS.PREDICT.BATCH_SIZE), 1) if baseline is None else 1
    reports = {}
    for name in datasets:
        out_dir = Path(output) / dataset_dirname(name)
        evaluator = NucleusEvaluator.from_config(cfg, name, str(out_dir))
        results = inference_on_dataset(model, _input_batches(evaluator, batch), evaluator)
        print_csv_format(results)
        report = evaluator.report
        if baseline:
            report["baseline"] = baseline
        gt_by_id = evaluator.gt_by_id
        rec_by_id = {r["image_id"]: r for r in evaluator.records}

        def load(row: dict, gt_by_id=gt_by_id, rec_by_id=rec_by_id, thresh=evaluator.score_thresh):
            record = gt_by_id[row["image_id"]]
            return (
                gt_label_image(record),
                prediction_label_image(rec_by_id[row["image_id"]], thresh),
                read_image(record["file_name"]),
            )

        _write_figures(report, out_dir, load, num_worst)
        reports[name] = report
    return reports


TUNE_DIAMETERS = (0.0, 28.0)  # 0: no rescale; else TRAIN_DIAMETER with DIAMETER "auto"
TUNE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TUNE_TTA_MARGIN = 0.005  # flip TTA costs 4x: it is chosen only if it beats the best single pass by more


def tune_diameters(cfg) -> tuple[float, ...]:
    """Inference diameters worth trying: a model trained with SCALE_TO_DIAMETER knows one size band, from
    its own diameter up to the top of its scale jitter; larger nuclei put more stride-4 feature cells across
    each boundary, so the upper half of the band is where masks may get sharper. Others: as is, or 28 px."""
    if not cfg.INPUT.NUCLEUS.SCALE_TO_DIAMETER:
        return TUNE_DIAMETERS
    own, top = float(cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER), max(float(cfg.INPUT.NUCLEUS.SCALE_RANGE[1]), 1.0)
    return tuple(sorted({round(own * f, 1) for f in (1.0, (1.0 + top) / 2, top)}))


def tune_inference(
    cfg, dataset: str, output: str | Path, diameters: tuple[float, ...] | None = None,
    tta: tuple[bool, ...] = (False, True), thresholds: tuple[float, ...] = TUNE_THRESHOLDS,
) -> dict:
    """Pick the inference settings (model scale, flip TTA, score threshold) that maximise the DSB score on
    ``dataset``, as Cellpose's size model and StarDist's threshold optimisation do on validation data.

    Writes ``output/tune.json`` (every setting's score) and ``output/tuned.yaml`` (``cfg`` with the chosen
    ``NUCLEUS.PREDICT`` keys; pass it as ``--config-file``). Each scale/TTA pair is one inference pass;
    thresholds are applied to its stored detections.
    """
    import json
    import time

    from detectron2.evaluation import inference_on_dataset

    from ..evaluation.evaluator import NucleusEvaluator, build_report, gt_label_image, prediction_label_image
    from ..evaluation.matching import image_counts

    if diameters is None:
        diameters = tune_diameters(cfg)
    _register_eval_datasets(cfg, [dataset])
    rows: list[dict] = []
    gt_cache: dict = {}

    def run_pass(diameter: float, flips: bool) -> None:
        trial = cfg.clone()
        trial.defrost()
        trial.NUCLEUS.PREDICT.DIAMETER = -1.0 if diameter > 0 else 0.0
        if diameter > 0:
            trial.NUCLEUS.PREDICT.TRAIN_DIAMETER = float(diameter)
        trial.NUCLEUS.PREDICT.TTA = bool(flips)
        trial.NUCLEUS.PREDICT.SCORE_THRESH = float(min(thresholds))
        trial.NUCLEUS.EVAL.COCO = False
        evaluator = NucleusEvaluator.from_config(trial, dataset, None)
        batches = _input_batches(evaluator, max(int(trial.NUCLEUS.PREDICT.BATCH_SIZE), 1))
        start = time.perf_counter()
        inference_on_dataset(_predictor_model(trial), batches, evaluator)
        seconds = time.perf_counter() - start
        for thresh in thresholds:
            records = []
            for r in evaluator.records:
                if r["image_id"] not in gt_cache:
                    gt_cache[r["image_id"]] = gt_label_image(evaluator.gt_by_id[r["image_id"]])
                records.append(dict(r, counts=image_counts(gt_cache[r["image_id"]], prediction_label_image(r, thresh))))
            report = build_report(records, dataset, thresh)
            rows.append({"train_diameter": float(diameter), "tta": bool(flips), "score_thresh": float(thresh),
                         "dsb_score": report["dsb_score"], "ap50": report["ap50"], "f1_50": report["f1_50"],
                         "seconds": round(seconds, 2)})

    if False in tta:
        for diameter in diameters:
            run_pass(diameter, False)
    if True in tta:
        run_pass(max(rows, key=lambda r: r["dsb_score"])["train_diameter"] if rows else diameters[0], True)
    best = max(rows, key=lambda r: r["dsb_score"])
    single = max((r for r in rows if not r["tta"]), key=lambda r: r["dsb_score"], default=None)
    if best["tta"] and single is not None and best["dsb_score"] - single["dsb_score"] <= TUNE_TTA_MARGIN:
        best = single
    tuned = cfg.clone()
    tuned.defrost()
    tuned.NUCLEUS.PREDICT.DIAMETER = -1.0 if best["train_diameter"] > 0 else 0.0
    if best["train_diameter"] > 0:
        tuned.NUCLEUS.PREDICT.TRAIN_DIAMETER = best["train_diameter"]
    tuned.NUCLEUS.PREDICT.TTA = best["tta"]
    tuned.NUCLEUS.PREDICT.SCORE_THRESH = best["score_thresh"]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuned.yaml").write_text(tuned.dump())
    result = {"dataset": dataset, "best": best, "rows": rows}
    (out / "tune.json").write_text(json.dumps(result, indent=1) + "\n")
    for r in sorted(rows, key=lambda r: -r["dsb_score"])[:10]:
        logger.info("tune %s: diameter %s tta %s thresh %.2f -> dsb %.4f (%.1f s)", dataset,
                    r["train_diameter"] or "as is", r["tta"], r["score_thresh"], r["dsb_score"], r["seconds"])
    return result


# ----------------------------------------------------------------------------- shared
def _write_figures(report: dict, out_dir: Path, load: Callable, num_worst: int) -> None:
    """curves.png and overlays of the ``num_worst`` lowest-DSB images (``load(row) -> gt, pred, image``)."""
    from ..evaluation.plots import plot_curves, plot_overlay, worst_rows

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(report, out_dir / "curves.png")
    for rank, row in enumerate(worst_rows(report, num_worst), start=1):
        gt, pred, image = load(row)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(row["file_name"])).stem)[:80]
        title = (
            f"{Path(str(row['file_name'])).name}: DSB {row['dsb_score']:.3f}, F1@0.5 {row['f1_50']:.3f} "
            f"(TP {row['tp50']}, FP {row['fp50']}, FN {row['fn50']})"
        )
        plot_overlay(gt, pred, out_dir / f"worst_{rank:02d}_{stem}.png", image=image, title=title)
    logger.info(
        "Wrote %s/metrics.json, curves.png and %d worst-image overlays",
        out_dir,
        min(num_worst, len(report["per_image"])),
    )


def _one_line(name: str, report: dict) -> str:
    segm = (report.get("coco") or {}).get("segm") or {}
    coco = f" mask_AP={segm['AP']:.2f}" if segm.get("AP") is not None else ""
    return (
        f"{name}: dsb_score={report['dsb_score']:.4f} ap50={report['ap50']:.4f} f1_50={report['f1_50']:.4f} "
        f"pq={report['pq']:.4f} images={report['n_images']} gt={report['n_gt']} pred={report['n_pred']}{coco}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucleus-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Metric definitions: nucleus_seg/evaluation/matching.py. Outputs: metrics.json, curves.png, "
        "worst_NN_*.png.",
    )
    parser.add_argument("--config-file", help="model config (YAML); KEY VALUE overrides follow as arguments")
    parser.add_argument(
        "--dataset", action="append", help="registered dataset (repeatable; default DATASETS.TEST)"
    )
    parser.add_argument(
        "--baseline", choices=["watershed"], help="run the classical baseline instead of a model"
    )
    parser.add_argument("--gt", help="ground-truth label image folder (or file): label mode")
    parser.add_argument("--pred", help="predicted label image folder (or file): label mode")
    parser.add_argument("--images", help="label mode: folder of the raw images, as overlay backgrounds")
    parser.add_argument("--output", help="output folder (default: OUTPUT_DIR/eval, or ./output/eval)")
    parser.add_argument(
        "--num-worst",
        type=int,
        default=None,
        help="overlay PNGs of this many worst images (default NUCLEUS.EVAL.NUM_WORST_OVERLAYS)",
    )
    parser.add_argument(
        "--tune", metavar="DIR",
        help="model mode: pick the diameter rescale, flip TTA and score threshold that score best on the "
        "(first) --dataset; writes DIR/tuned.yaml (use it as --config-file) and DIR/tune.json",
    )
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides, e.g. MODEL.WEIGHTS model.pth")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.version:
        from ..utils.env import version_report

        print(version_report())
        return 0
    from detectron2.utils.logger import setup_logger

    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="nucleus_seg")
    label_mode = args.gt is not None or args.pred is not None
    if label_mode:
        if not (args.gt and args.pred):
            parser.error("label mode needs both --gt and --pred")
        if args.config_file or args.baseline or args.dataset or args.opts:
            parser.error(
                "--gt/--pred score label images; --config-file, --baseline, --dataset and overrides "
                "belong to the model and baseline modes"
            )
    elif not args.config_file and not args.baseline:
        parser.error("give --config-file (model), --baseline watershed, or --gt and --pred (label images)")
    try:
        if label_mode:
            output = Path(args.output or "output/eval")
            num_worst = 4 if args.num_worst is None else args.num_worst
            report = evaluate_label_folders(args.gt, args.pred, output, args.images, num_worst)
            print(_one_line(str(args.pred), report))
            return 0
        from .. import data as _  # noqa: F401  (registers the built-in datasets)
        from ..config import get_nucleus_cfg

        try:
            cfg = get_nucleus_cfg(args.config_file or "Base-Nucleus-RCNN-FPN.yaml", args.opts)
        except (FileNotFoundError, KeyError, ValueError, AssertionError) as exc:  # yacs asserts
            parser.error(f"config: {exc}")
        if not args.baseline and not cfg.MODEL.WEIGHTS:
            parser.error("no MODEL.WEIGHTS given: pass MODEL.WEIGHTS path/to/model_final.pth")
        datasets = args.dataset or list(cfg.DATASETS.TEST)
        if not datasets:
            parser.error("no dataset: pass --dataset NAME or set DATASETS.TEST in the config")
        if args.tune:
            if args.baseline:
                parser.error("--tune picks model inference settings; it does not apply to --baseline")
            result = tune_inference(cfg, datasets[0], args.tune)
            best = result["best"]
            print(f"tuned on {datasets[0]}: diameter={best['train_diameter'] or 'as is'} tta={best['tta']} "
                  f"score_thresh={best['score_thresh']} dsb_score={best['dsb_score']:.4f}; "
                  f"config: {Path(args.tune) / 'tuned.yaml'}")
            return 0
        output = Path(args.output or Path(cfg.OUTPUT_DIR) / "eval")
        num_worst = cfg.NUCLEUS.EVAL.NUM_WORST_OVERLAYS if args.num_worst is None else args.num_worst
        reports = evaluate_datasets(cfg, datasets, output, args.baseline, num_worst)
        for name, report in reports.items():
            print(_one_line(name, report))
        return 0
    except (EvalError, OSError, ValueError) as exc:  # ImageReadError is a ValueError naming its file
        print(f"nucleus-eval: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
