"""``nucleus-adapt``: fit a trained model to your own images without a single label (self-training).

    nucleus-adapt --config-file output/model/config.yaml --images 'lab/*.tif' --output adapted/ \\
                  MODEL.WEIGHTS output/model/model_final.pth [--minutes 5] [--num-gpus 1]

Then use ``adapted/config.yaml`` (it points at ``adapted/model_final.pth``) with nucleus-predict or
nucleus-eval. ``adapted/adapt_report.json`` says what each round learnt from; ``adapted/before_after.png``
shows a few images before and after. How it works: ``nucleus_seg.engine.adapt``. Status 2: bad command
line or unreadable image; 1: nothing to adapt to.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.io import ImageReadError
from ..engine.adapt import AdaptError, AdaptSettings, adapt, earlier_adaptation
from ..inference.batch import expand_inputs
from ..inference.predictor import CheckpointMismatch
from ..utils.files import check_writable
from ..utils.logs import setup_logging
from .common import console_parser, load_config, split_overrides

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    defaults = AdaptSettings()
    parser = console_parser("nucleus-adapt", __doc__)
    parser.add_argument("--config-file", help="the model's YAML config (the config.yaml saved beside it)")
    parser.add_argument("--images", nargs="+", default=[], metavar="FILE|DIR|GLOB",
                        help="your unlabelled images: files, folders or quoted glob patterns")
    parser.add_argument("--output", help="output folder (created; an earlier adaptation there is refused "
                        "unless --overwrite)")
    parser.add_argument("--minutes", type=float, default=defaults.minutes,
                        help="time for pseudo-labelling and training, all rounds (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help="teacher -> student rounds (default %(default)s)")
    parser.add_argument("--iters", type=int, default=0,
                        help="iterations per round instead of the time budget (e.g. a CPU trial)")
    parser.add_argument("--synthetic", type=int, default=defaults.synthetic,
                        help="synthetic images mixed in so the model does not forget (default %(default)s; 0: none)")
    parser.add_argument("--confident", type=float, default=defaults.confident,
                        help="score a nucleus needs to become a pseudo-label (default %(default)s)")
    parser.add_argument("--overlays", type=int, default=defaults.overlays,
                        help="images shown in before_after.png (default %(default)s)")
    parser.add_argument("--num-gpus", type=int, default=1, help="training processes (GPUs)")
    parser.add_argument("--procs-per-gpu", type=int, default=1, help="training processes per GPU")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier adaptation in --output")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.WEIGHTS model_final.pth")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    images, opts = split_overrides(list(args.images), list(args.opts or []))
    for flag, value in (("--config-file", args.config_file), ("--output", args.output)):
        if not value:
            parser.error(f"{flag} is required")
    if not images:
        parser.error("--images is required (files, folders or glob patterns)")
    if args.minutes <= 0 or args.rounds < 1 or args.iters < 0 or args.synthetic < 0 or args.num_gpus < 1 \
            or args.procs_per_gpu < 1 or not 0 < args.confident <= 1:
        parser.error("--minutes must be > 0, --rounds, --num-gpus and --procs-per-gpu >= 1, --iters and "
                     "--synthetic >= 0, --confident in (0, 1]")
    cfg = load_config(parser, args.config_file, opts)
    if not cfg.MODEL.WEIGHTS:
        parser.error("MODEL.WEIGHTS is empty: name the trained model to adapt (MODEL.WEIGHTS model_final.pth)")
    files, problems = expand_inputs(images)
    if problems:
        parser.error("; ".join(problems))
    try:
        check_writable(args.output, "--output")
    except (ValueError, PermissionError) as exc:
        parser.error(str(exc))
    earlier = earlier_adaptation(Path(args.output))
    if earlier and not args.overwrite:
        parser.error(f"--output {args.output} already holds an adaptation ({earlier[0].name}): choose another "
                     "folder or add --overwrite")
    setup_logging(args.output)
    settings = AdaptSettings(minutes=args.minutes, rounds=args.rounds, iters=args.iters, synthetic=args.synthetic,
                             confident=args.confident, overlays=args.overlays, num_gpus=args.num_gpus,
                             procs_per_gpu=args.procs_per_gpu)
    try:
        report = adapt(cfg, files, args.output, settings, overwrite=args.overwrite)
    except (ImageReadError, CheckpointMismatch, FileNotFoundError) as exc:  # a file at fault, named
        print(f"nucleus-adapt: error: {exc}", file=sys.stderr)
        return 2
    except AdaptError as exc:
        print(f"nucleus-adapt: error: {exc}", file=sys.stderr)
        return 1
    print(f"nucleus-adapt: adapted model {report['weights']} ({report['minutes']:.1f} min); use "
          f"--config-file {Path(args.output) / 'config.yaml'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
