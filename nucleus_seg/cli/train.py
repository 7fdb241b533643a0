"""``nucleus-train``: train (or ``--eval-only`` evaluate) the nucleus Mask R-CNN with detectron2's launcher.

    nucleus-train --config-file configs/nucleus_R101_FPN_cpu_demo.yaml
    nucleus-train --config-file configs/nucleus_R101_FPN_scratch.yaml --num-gpus 8 SOLVER.IMS_PER_BATCH 16
    nucleus-train --config-file F --procs-per-gpu 2      # two training processes share each GPU (faster)
    nucleus-train --config-file F --resume               # continue an interrupted run from OUTPUT_DIR
    nucleus-train --config-file F --eval-only MODEL.WEIGHTS output/model_final.pth
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "setup", "main_worker", "main", "DEFAULT_CONFIG", "EXIT_DIVERGED"]

DEFAULT_CONFIG = "nucleus_R101_FPN_scratch.yaml"
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EVAL_METRICS_FILE = "eval_metrics.json"

logger = logging.getLogger("nucleus_seg.train")


def build_parser() -> argparse.ArgumentParser:
    """detectron2's default_argument_parser plus ``--version``."""
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser(epilog=__doc__)
    parser.prog = "nucleus-train"
    # detectron2's default port is fixed per user, so two trainings on one machine collided
    # (EADDRINUSE); on one machine a free port is found instead ("auto"); several machines name one
    parser.set_defaults(dist_url="auto")
    for action in parser._actions:
        if action.dest == "dist_url":
            action.help = ("tcp://HOST:PORT of machine 0 when training on several machines; default 'auto' "
                           "(a free local port, single machine only)")
    parser.add_argument("--version", action="store_true", help="print versions (nucleus_seg, detectron2, "
                        "torch, CUDA) and exit")
    parser.add_argument("--procs-per-gpu", type=int, default=1, metavar="K",
                        help="training processes per GPU (world size = num-gpus x K x num-machines; gloo "
                        "instead of NCCL). Training is host-bound, so K=2 keeps the GPU busier; with "
                        "SOLVER.REFERENCE_WORLD_SIZE set, batch and LR scale with the world size")
    return parser


def _resolve_config(path: str) -> str:
    """``--config-file`` (default: the scratch config) as a path default_setup can copy."""
    from ..config import resolve_config_path

    try:
        return str(resolve_config_path(path or DEFAULT_CONFIG))
    except FileNotFoundError as exc:
        raise SystemExit(f"nucleus-train: {exc}") from exc


def setup(args: argparse.Namespace):
    """Config from file + KEY VALUE overrides, adapted to this machine, then detectron2's default_setup
    (logging to OUTPUT_DIR/log.txt, config.yaml saved, seeding)."""
    from detectron2.engine import default_setup
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    from ..config import get_nucleus_cfg
    from ..engine.trainer import prepare_cfg

    args.config_file = _resolve_config(args.config_file)
    if len(args.opts or []) % 2:
        raise SystemExit(f"nucleus-train: config overrides must be KEY VALUE pairs, got {args.opts}")
    cfg = get_nucleus_cfg(args.config_file, args.opts or [])
    # nucleus_seg's own log lines (device/AMP changes below, divergence advice) go where detectron2's go
    setup_logger(cfg.OUTPUT_DIR or None, distributed_rank=comm.get_rank(), name="nucleus_seg",
                 abbrev_name="nucleus")
    cfg = prepare_cfg(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    if getattr(args, "launched_at", None) and not cfg.NUCLEUS.TRAIN.TIME_BUDGET_START:
        # after default_setup saved config.yaml, so a reused config never carries a stale start
        cfg.defrost()
        cfg.NUCLEUS.TRAIN.TIME_BUDGET_START = args.launched_at
        cfg.freeze()
    return cfg


def _evaluate_only(cfg, args: argparse.Namespace) -> dict:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils import comm

    from ..engine.trainer import NucleusTrainer

    if not cfg.MODEL.WEIGHTS and not args.resume:
        raise SystemExit("nucleus-train --eval-only evaluates MODEL.WEIGHTS, which is empty: add "
                         "MODEL.WEIGHTS path/to/model_final.pth (or --resume for OUTPUT_DIR's last "
                         "checkpoint)")
    if not cfg.DATASETS.TEST:
        raise SystemExit("nucleus-train --eval-only: DATASETS.TEST is empty, nothing to evaluate on")
    model = NucleusTrainer.build_model(cfg)
    checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    results = NucleusTrainer.test(cfg, model)
    if comm.is_main_process():
        from ..engine.hooks import _jsonable

        path = Path(cfg.OUTPUT_DIR) / EVAL_METRICS_FILE
        path.write_text(json.dumps({"weights": cfg.MODEL.WEIGHTS, "datasets": list(cfg.DATASETS.TEST),
                                    "results": _jsonable(results)}, indent=1))
        logger.info("Evaluation results written to %s", path)
    return results


def main_worker(args: argparse.Namespace):
    """One process of the (possibly distributed) job: what detectron2's ``launch`` runs."""
    from ..engine.trainer import NucleusTrainer, divergence_message

    cfg = setup(args)
    if args.eval_only:
        return _evaluate_only(cfg, args)
    trainer = NucleusTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    try:
        result = trainer.train()
    except FloatingPointError as exc:
        logger.error(divergence_message(trainer.cfg, exc))
        raise SystemExit(EXIT_DIVERGED) from exc
    if args.num_gpus * args.num_machines * args.procs_per_gpu > 1:
        from ..utils.dist import close_process_group

        close_process_group()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 3 diverged, 130 interrupted)."""
    launched_at = time.time()
    args = build_parser().parse_args(argv)
    if args.version:
        from ..utils.env import version_report

        print(version_report())
        return 0
    from ..utils.dist import launch

    if args.procs_per_gpu < 1:
        print(f"nucleus-train: --procs-per-gpu must be >= 1, got {args.procs_per_gpu}", file=sys.stderr)
        return 2
    args.launched_at = launched_at  # a time budget counts from here (see setup)
    try:
        if args.num_gpus * args.procs_per_gpu > 1 and not args.eval_only and len(args.opts or []) % 2 == 0:
            from ..config import get_nucleus_cfg
            from ..engine.trainer import generate_synthetic_data

            generate_synthetic_data(get_nucleus_cfg(_resolve_config(args.config_file), args.opts or []))
        launch(main_worker, args.num_gpus, procs_per_gpu=args.procs_per_gpu, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nInterrupted. Continue from the last checkpoint with: nucleus-train --config-file "
              f"{args.config_file or DEFAULT_CONFIG} --resume {' '.join(args.opts or [])}".rstrip(),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
