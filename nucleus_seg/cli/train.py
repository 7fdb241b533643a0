"""``nucleus-train``: train (or ``--eval-only`` evaluate) the nucleus Mask R-CNN with detectron2's launcher.

    nucleus-train --config-file configs/nucleus_R101_FPN_cpu_demo.yaml
    nucleus-train --config-file configs/nucleus_R101_FPN_scratch.yaml --num-gpus 8 SOLVER.IMS_PER_BATCH 16
    nucleus-train --config-file F --procs-per-gpu 2      # two training processes share each GPU (faster)
    nucleus-train --config-file F --resume               # continue an interrupted run from OUTPUT_DIR
    nucleus-train --config-file F --eval-only MODEL.WEIGHTS output/model_final.pth
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from detectron2.engine import default_argument_parser

from ..engine.job import DEFAULT_CONFIG, EXIT_DIVERGED, run
from .common import add_version

__all__ = ["DEFAULT_CONFIG", "EXIT_DIVERGED", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """detectron2's default_argument_parser plus ``--version`` and ``--procs-per-gpu``."""
    parser = default_argument_parser(epilog=__doc__)
    parser.prog = "nucleus-train"
    # detectron2's default port is fixed per user, so two trainings on one machine collided
    # (EADDRINUSE); on one machine a free port is found instead ("auto"); several machines name one
    parser.set_defaults(dist_url="auto")
    for action in parser._actions:
        if action.dest == "dist_url":
            action.help = ("tcp://HOST:PORT of machine 0 when training on several machines; default 'auto' "
                           "(a free local port, single machine only)")
    add_version(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an OUTPUT_DIR that holds an earlier run, deleting its checkpoints, "
                        "metrics and curves (without it, or --resume, such a folder is refused)")
    parser.add_argument("--procs-per-gpu", type=int, default=1, metavar="K",
                        help="training processes per GPU (world size = num-gpus x K x num-machines; gloo "
                        "instead of NCCL). Training is host-bound, so K=2 keeps the GPU busier; with "
                        "SOLVER.REFERENCE_WORLD_SIZE set, batch and LR scale with the world size")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 usage, 3 diverged, 130 interrupted)."""
    launched_at = time.time()
    args = build_parser().parse_args(argv)
    if args.procs_per_gpu < 1:
        print(f"nucleus-train: --procs-per-gpu must be >= 1, got {args.procs_per_gpu}", file=sys.stderr)
        return 2
    return run(args, launched_at)


if __name__ == "__main__":
    sys.exit(main())
