"""The ``nucleus-train`` job: config from file and overrides, launch over processes, train or evaluate.

detectron2's ``train_net.py`` pattern (``setup`` -> ``main`` under ``launch``) as library functions, so the
console script only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng

from ..config import get_nucleus_cfg, resolve_config_path
from ..data.catalog import generate_synthetic_data
from ..modeling.precision import training_precision
from ..utils.dist import close_process_group, launch
from ..utils.files import atomic_write, write_json
from ..utils.logs import setup_logging
from .trainer import NucleusTrainer, divergence_message, prepare_cfg

__all__ = ["DEFAULT_CONFIG", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "main_worker", "run", "setup"]

logger = logging.getLogger("nucleus_seg.train")

DEFAULT_CONFIG = "nucleus_R101_FPN_scratch.yaml"
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EVAL_METRICS_FILE = "eval_metrics.json"


def _resolve_config(path: str | None) -> str:
    """``--config-file`` (default: the scratch config) as a path default_setup can copy."""
    try:
        return str(resolve_config_path(path or DEFAULT_CONFIG))
    except FileNotFoundError as exc:
        raise SystemExit(f"nucleus-train: {exc}") from exc


def setup(args: argparse.Namespace):
    """Config from file + KEY VALUE overrides, adapted to this machine; logging (terminal: short lines;
    OUTPUT_DIR/log.txt: everything), config.yaml saved, seeds set: what detectron2's default_setup does,
    without its ~1,000-line terminal dump."""
    args.config_file = _resolve_config(args.config_file)
    if len(args.opts or []) % 2:
        raise SystemExit(f"nucleus-train: config overrides must be KEY VALUE pairs, got {args.opts}")
    cfg = get_nucleus_cfg(args.config_file, args.opts or [])
    rank = comm.get_rank()
    setup_logging(cfg.OUTPUT_DIR or None, rank)
    cfg = prepare_cfg(cfg)
    cfg.freeze()
    logger.debug("Environment info:\n%s", collect_env_info())
    logger.debug("Command line arguments: %s", args)
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        atomic_write(Path(cfg.OUTPUT_DIR) / "config.yaml", cfg.dump())
        logger.debug("Running with full config:\n%s", cfg.dump())
        logger.info("nucleus-train: %s, %s, %d process(es); outputs in %s (config.yaml, model.txt, log.txt)",
                    _device_line(cfg), training_precision(cfg), comm.get_world_size(), cfg.OUTPUT_DIR)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not args.eval_only:
        torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    if getattr(args, "launched_at", None) and not cfg.NUCLEUS.TRAIN.TIME_BUDGET_START:
        # after config.yaml is saved, so a reused config never carries a stale start
        cfg.defrost()
        cfg.NUCLEUS.TRAIN.TIME_BUDGET_START = args.launched_at
        cfg.freeze()
    return cfg


def _device_line(cfg) -> str:
    if cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available():
        return f"device {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"device CPU ({torch.get_num_threads()} threads)"


def _evaluate_only(cfg, args: argparse.Namespace) -> dict:
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
        path = write_json(Path(cfg.OUTPUT_DIR) / EVAL_METRICS_FILE,
                          {"weights": cfg.MODEL.WEIGHTS, "datasets": list(cfg.DATASETS.TEST), "results": results})
        logger.info("Evaluation results written to %s", path)
    return results


def main_worker(args: argparse.Namespace):
    """One process of the (possibly distributed) job: what detectron2's ``launch`` runs."""
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
        close_process_group()
    return result


def run(args: argparse.Namespace, launched_at: float | None = None) -> int:
    """Launch :func:`main_worker` over ``args.num_gpus x args.procs_per_gpu`` processes per machine; returns
    the exit status (0 ok, 2 usage, 3 diverged, 130 interrupted)."""
    args.launched_at = launched_at or time.time()  # a time budget counts from here (see setup)
    try:
        if args.num_gpus * args.procs_per_gpu > 1 and not args.eval_only and len(args.opts or []) % 2 == 0:
            # once, with every core, before the ranks start (else each rank generates the same images)
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
