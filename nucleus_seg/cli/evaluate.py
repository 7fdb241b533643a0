"""``nucleus-eval``: score a model, the classical baseline, or any tool's label images against ground truth.

Three modes, same metrics and outputs (``metrics.json``, ``curves.png``, ``worst_NN_<name>.png``):

* model:    ``nucleus-eval --config-file F MODEL.WEIGHTS W [--dataset NAME ...] [--output OUT]``
  runs ``NucleusPredictor`` on each registered dataset (default: the config's DATASETS.TEST) and
  writes ``OUT/<dataset>/...``; COCO box/mask AP is included.
* baseline: ``nucleus-eval --baseline watershed [--config-file F] [--dataset NAME ...]`` does the same
  with Otsu + watershed instead of a model (all scores 1, so its COCO AP is only indicative).
* labels:   ``nucleus-eval --gt DIR --pred DIR [--images DIR] [--output OUT]`` scores label-image
  folders (TIFF/PNG, 8/16/32-bit ids) from StarDist, Cellpose, CellProfiler, ... or outlines (Fiji ROI sets,
  QuPath GeoJSON: the other side's label image, or ``--images``, gives their size) matched by file stem
  (suffixes such as ``_labels``, ``_masks``, ``_cp_masks``, ``_pred``, ``_rois`` ignored) and writes ``OUT/...``.
  A ground-truth image without a prediction scores as all nuclei missed and the exit status is 1
  (``--matched-only``: left out); predictions without ground truth are listed, not scored.

Exit status: 0 done, 1 bad or missing data (an unreadable file, missing predictions), 2 bad command line
(including an output folder that cannot be written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluation.runner import EvalError, evaluate_datasets, evaluate_label_folders, summary_line
from ..evaluation.tune import tune_inference
from ..utils.logs import setup_logging
from .common import add_version, load_config

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucleus-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Metric definitions: nucleus_seg/evaluation/matching.py. Outputs: metrics.json, curves.png, "
        "worst_NN_*.png.",
    )
    add_version(parser)
    parser.add_argument("--config-file", help="model config (YAML); KEY VALUE overrides follow as arguments")
    parser.add_argument("--dataset", action="append", help="registered dataset (repeatable; default DATASETS.TEST)")
    parser.add_argument("--baseline", choices=["watershed"], help="run the classical baseline instead of a model")
    parser.add_argument("--gt", help="ground-truth label image folder (or file; Fiji ROI sets and QuPath GeoJSON "
                        "too): label mode")
    parser.add_argument("--pred", help="predicted label image folder (or file; outline files too): label mode")
    parser.add_argument("--images", help="label mode: folder of the raw images, as overlay backgrounds (and the "
                        "size of outlines compared with outlines)")
    parser.add_argument("--matched-only", action="store_true",
                        help="label mode: score only images that have both ground truth and a prediction "
                        "(default: a missing prediction scores as all nuclei missed, and the exit status is 1)")
    parser.add_argument("--output", help="output folder (default: OUTPUT_DIR/eval, or ./output/eval)")
    parser.add_argument("--num-worst", type=int, default=None,
                        help="overlay PNGs of this many worst images (default NUCLEUS.EVAL.NUM_WORST_OVERLAYS)")
    parser.add_argument(
        "--tune", metavar="DIR",
        help="model mode: pick the diameter rescale, flip TTA and score threshold that score best on the "
        "(first) --dataset; writes DIR/tuned.yaml (use it as --config-file) and DIR/tune.json",
    )
    parser.add_argument("opts", nargs="*", default=[], help="config overrides, e.g. MODEL.WEIGHTS model.pth")
    return parser


def _check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Whether this is label mode; a mix of modes is a usage error."""
    label_mode = args.gt is not None or args.pred is not None
    if label_mode:
        if not (args.gt and args.pred):
            parser.error("label mode needs both --gt and --pred")
        if args.config_file or args.baseline or args.dataset or args.opts:
            parser.error("--gt/--pred score label images; --config-file, --baseline, --dataset and overrides "
                         "belong to the model and baseline modes")
    elif not args.config_file and not args.baseline:
        parser.error("give --config-file (model), --baseline watershed, or --gt and --pred (label images)")
    if args.tune and args.baseline:
        parser.error("--tune picks model inference settings; it does not apply to --baseline")
    return label_mode


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    label_mode = _check_mode(parser, args)
    setup_logging()
    try:
        if label_mode:
            output = Path(args.output or "output/eval")
            report = evaluate_label_folders(args.gt, args.pred, output, args.images,
                                            4 if args.num_worst is None else args.num_worst, args.matched_only)
            print(summary_line(str(args.pred), report))
            if report["missing_pred"] and not args.matched_only:
                print(f"nucleus-eval: {len(report['missing_pred'])} of {report['n_images']} ground-truth images "
                      "have no prediction and were scored as all nuclei missed (listed in metrics.json as "
                      "missing_pred; --matched-only leaves them out)", file=sys.stderr)
                return 1
            return 0
        cfg = load_config(parser, args.config_file or "Base-Nucleus-RCNN-FPN.yaml", args.opts)
        if not args.baseline and not cfg.MODEL.WEIGHTS:
            parser.error("no MODEL.WEIGHTS given: pass MODEL.WEIGHTS path/to/model_final.pth")
        datasets = args.dataset or list(cfg.DATASETS.TEST)
        if not datasets:
            parser.error("no dataset: pass --dataset NAME or set DATASETS.TEST in the config")
        if args.tune:
            best = tune_inference(cfg, datasets[0], args.tune)["best"]
            print(f"tuned on {datasets[0]}: diameter={best['train_diameter'] or 'as is'} tta={best['tta']} "
                  f"score_thresh={best['score_thresh']} dsb_score={best['dsb_score']:.4f}; "
                  f"config: {Path(args.tune) / 'tuned.yaml'}")
            return 0
        output = Path(args.output or Path(cfg.OUTPUT_DIR) / "eval")
        num_worst = cfg.NUCLEUS.EVAL.NUM_WORST_OVERLAYS if args.num_worst is None else args.num_worst
        for name, evaluation in evaluate_datasets(cfg, datasets, output, args.baseline, num_worst).items():
            print(summary_line(name, evaluation.report))
        return 0
    except PermissionError as exc:  # the output folder, found before any compute
        print(f"nucleus-eval: error: {exc}", file=sys.stderr)
        return 2
    except (EvalError, OSError, ValueError) as exc:  # ImageReadError is a ValueError naming its file
        print(f"nucleus-eval: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
