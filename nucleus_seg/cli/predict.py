"""``nucleus-predict``: segment nuclei in image files and write label images, overlays and tables.

    nucleus-predict --config-file F --input FILE|DIR|GLOB [...] --output DIR [--diameter D|auto|Dum]
                    [--tile N] [--overlap N] [--batch N] [--score-thresh S] [--channel C]
                    [--formats labels,overlay,csv,rois,geojson,submission,coco] [--exclude-edges]
                    [--min-area PX] [--resume] [KEY VALUE ...]

Per image: ``OUT/<stem>_labels.tif`` (uint16 ImageJ TIFF; uint32 past 65535 nuclei),
``OUT/<stem>_overlay.png`` (outlines on the normalised image), ``OUT/<stem>_measurements.csv``; on request
``OUT/<stem>_rois.zip`` (ImageJ ROI set: Fiji's ROI Manager) and ``OUT/<stem>_nuclei.geojson`` (QuPath).
Per run: ``OUT/submission.csv`` (Kaggle DSB-2018) and ``OUT/coco_results.json``, built from every
image's label image, those skipped by ``--resume`` included. Images larger than the tile (after
the diameter rescale) are predicted tile by tile. A stack (time-lapse, z-stack) is predicted plane by
plane (``<stem>_t03_*`` files), its label images also as one stack, ``<stem>_labels.tif``. An unreadable image
is reported and skipped; the run goes on and exits with status 1 listing the failures. Status 2: bad command line.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..config import check_predict_settings
from ..inference.batch import DEFAULT_FORMATS, FORMATS, predict_to_folder
from ..inference.scale import parse_diameter, parse_diameter_um
from ..inference.tiling import NucleusFilter
from ..utils.logs import setup_logging
from .common import console_parser, load_config, split_overrides

__all__ = ["build_parser", "main"]

FLAG_KEYS = {"--tile": "TILE_SIZE", "--overlap": "TILE_OVERLAP", "--batch": "BATCH_SIZE",
             "--score-thresh": "SCORE_THRESH", "--diameter": "DIAMETER"}


def build_parser() -> argparse.ArgumentParser:
    parser = console_parser("nucleus-predict", __doc__, epilog_from=2)
    parser.add_argument("--config-file", help="YAML config (a bundled one by name, or a path)")
    parser.add_argument("--input", nargs="+", default=[], metavar="FILE|DIR|GLOB",
                        help="image files, folders (their images, not recursive) or quoted glob patterns")
    parser.add_argument("--output", help="output folder (created)")
    parser.add_argument("--diameter", help="nucleus diameter in px, 'auto' to estimate, 0 for no rescale "
                        "(default: NUCLEUS.PREDICT.DIAMETER), or in micrometres ('8um': each image's px from the "
                        "pixel size in its TIFF metadata)")
    parser.add_argument("--tile", type=int, help="tile size in model px (default: NUCLEUS.PREDICT.TILE_SIZE)")
    parser.add_argument("--overlap", type=int, help="tile overlap in model px; should exceed the largest "
                        "nucleus (default: NUCLEUS.PREDICT.TILE_OVERLAP)")
    parser.add_argument("--batch", type=int, help="images or tiles per forward pass (NUCLEUS.PREDICT.BATCH_SIZE; "
                        "default: 16 on a GPU, 8 on the CPU)")
    parser.add_argument("--score-thresh", type=float, help="keep nuclei scoring at least this "
                        "(NUCLEUS.PREDICT.SCORE_THRESH)")
    parser.add_argument("--channel", type=int, help="the channel holding the nuclei in multi-channel images, from "
                        "0 (INPUT.NORMALIZE.CHANNEL; default -1: the brightest colour channel at each pixel, wrong "
                        "for a composite with a cytoplasm or membrane stain)")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma list of {', '.join(FORMATS)} (default: {','.join(DEFAULT_FORMATS)}; rois: an "
                        "ImageJ ROI set for Fiji's ROI Manager, geojson: detections for QuPath)")
    parser.add_argument("--exclude-edges", action="store_true",
                        help="leave nuclei touching an image's border out of every output (cut by it, they would "
                        "bias measurements)")
    parser.add_argument("--min-area", type=int, default=0,
                        help="leave nuclei of fewer pixels than this out of every output (fragments; default 0: keep "
                        "all)")
    parser.add_argument("--resume", action="store_true",
                        help="skip images whose outputs exist (per-run files are still rebuilt from all)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per machine; images are "
                        "sharded across all of them, each written once (CPU: gloo processes)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 when several machines")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.WEIGHTS model_final.pth")
    return parser


def _configure(parser: argparse.ArgumentParser, args: argparse.Namespace, opts: list[str]):
    """The config with the command line's prediction settings applied."""
    cfg = load_config(parser, args.config_file, opts)
    pred_cfg = cfg.NUCLEUS.PREDICT
    if args.diameter is not None:
        try:
            # in micrometres: each image's px is set from its pixel size (predict_to_folder's diameter_um)
            diameter = 0.0 if parse_diameter_um(args.diameter) else parse_diameter(args.diameter)
        except ValueError as exc:
            parser.error(f"--diameter: {exc}")
        pred_cfg.DIAMETER = -1.0 if diameter is None else diameter
    if args.min_area < 0:
        parser.error(f"--min-area {args.min_area}: a number of pixels, 0 or more")
    if args.channel is not None:
        if args.channel < -1:
            parser.error(f"--channel {args.channel}: a channel index from 0, or -1 for every channel")
        cfg.INPUT.NORMALIZE.CHANNEL = args.channel
    for value, key in ((args.tile, "TILE_SIZE"), (args.overlap, "TILE_OVERLAP"), (args.batch, "BATCH_SIZE"),
                       (args.score_thresh, "SCORE_THRESH")):
        if value is not None:
            pred_cfg[key] = value
    try:
        check_predict_settings(cfg)
    except ValueError as exc:
        message = str(exc)
        for flag, key in FLAG_KEYS.items():
            message = message.replace(f"NUCLEUS.PREDICT.{key} ", f"{flag} (NUCLEUS.PREDICT.{key}) ")
        parser.error(message)
    # Only nuclei >= SCORE_THRESH reach any output: letting the box head drop the rest earlier gives
    # the same nuclei (NMS only ever suppresses a box by a higher-scoring one) for less mask-head work. The
    # "auto" diameter counts nuclei from DIAMETER_SCORE_THRESH up: those must survive too (above it, the
    # estimate silently differed from the Python API's and napari's).
    floor = float(pred_cfg.SCORE_THRESH)
    if pred_cfg.DIAMETER == -1:
        floor = min(floor, float(pred_cfg.DIAMETER_SCORE_THRESH))
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = max(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, floor - 1e-6)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # flags may also follow the KEY VALUE overrides
    inputs, opts = split_overrides(list(args.input), list(args.opts or []))
    if not args.config_file:
        parser.error("--config-file is required")
    if not inputs:
        parser.error("--input is required (files, folders or glob patterns)")
    if not args.output:
        parser.error("--output is required")
    formats = {f.strip() for f in args.formats.split(",") if f.strip()}
    if not formats or formats - set(FORMATS):
        parser.error(f"--formats: unknown {sorted(formats - set(FORMATS))}; choose from {', '.join(FORMATS)}")
    setup_logging()
    started = time.perf_counter()
    cfg = _configure(parser, args, opts)
    try:
        files, run = predict_to_folder(cfg, inputs, args.output, sorted(formats), args.resume, args.num_gpus,
                                       args.num_machines, args.machine_rank, args.dist_url,
                                       NucleusFilter(args.exclude_edges, args.min_area),
                                       parse_diameter_um(args.diameter))
    except (ValueError, PermissionError) as exc:  # found before any compute: clashing inputs, unwritable output
        parser.error(str(exc))
    written = sum(1 for f in files if f.stem in run.written)
    seconds = time.perf_counter() - started
    print(f"nucleus-predict: {written} of {len(files)} images have outputs in {args.output} ({seconds:.1f} s, "
          f"{written / seconds:.2f} images/s)", file=sys.stderr)
    if run.failures:
        print(f"nucleus-predict: {len(run.failures)} failed:", file=sys.stderr)
        for reason in run.failures:
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
