"""The ``nucleus-train`` job: config from file and overrides, launch over processes, train or evaluate.

detectron2's ``train_net.py`` pattern (``setup`` -> ``main`` under ``launch``) as library functions, so the
console script only parses arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from torch.multiprocessing import ProcessExitedException

from ..config import get_nucleus_cfg, resolve_config_path
from ..data.catalog import generate_synthetic_data, register_datasets_from_cfg
from ..data.io import ImageReadError
from ..data.mapper import AnnotationError
from ..modeling.precision import training_precision
from ..utils.dist import close_process_group, launch
from ..utils.files import atomic_write, check_writable, write_json
from ..utils.logs import setup_logging
from .checkpoint import NucleusCheckpointer, previous_run_files
from .hooks import FINAL_METRICS_FILE
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
    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
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
    checkpointer = NucleusCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
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


class UsageError(Exception):
    """Something wrong with the command line or the config: one line, exit status 2, before any process."""


def check_command_line(args: argparse.Namespace):
    """Everything the command line can get wrong, found before any process starts or model is built: the
    config (file, keys, values), dataset names, OUTPUT_DIR (writable; an earlier run there is refused unless
    ``--resume`` continues it or ``--overwrite`` deletes it). Returns the config."""
    if args.resume and getattr(args, "overwrite", False):
        raise UsageError("--resume continues the run in OUTPUT_DIR and --overwrite deletes it: choose one")
    if len(args.opts or []) % 2:
        raise UsageError(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    try:
        path = resolve_config_path(args.config_file or DEFAULT_CONFIG)
        cfg = get_nucleus_cfg(path, args.opts or [])
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - yacs/yaml raise KeyError, ValueError, AssertionError, ...
        reason = exc.args[0] if exc.args else exc
        raise UsageError(f"--config-file {args.config_file or DEFAULT_CONFIG}: {reason}") from exc
    try:
        register_datasets_from_cfg(cfg)
        if cfg.OUTPUT_DIR:
            check_writable(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    except (KeyError, ValueError, PermissionError) as exc:
        raise UsageError(exc.args[0] if exc.args else str(exc)) from exc
    previous = previous_run_files(cfg.OUTPUT_DIR) if cfg.OUTPUT_DIR and not args.eval_only else []
    if previous and getattr(args, "overwrite", False):
        for file in previous:
            file.unlink()
        logger.info("--overwrite: deleted the earlier run's %d files in %s", len(previous), cfg.OUTPUT_DIR)
    elif previous and not args.resume:
        names = ", ".join(f.name for f in previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise UsageError(f"OUTPUT_DIR {cfg.OUTPUT_DIR} already holds a training run ({names}): continue it with "
                         "--resume, or start afresh with --overwrite (deletes its checkpoints and metrics)")
    return cfg


def finished_training(output_dir: str | Path) -> bool:
    """A run in ``output_dir`` ran to its end (MAX_ITER or the time budget) and saved model_final.pth."""
    metrics = Path(output_dir) / FINAL_METRICS_FILE
    try:
        done = json.loads(metrics.read_text()).get("completed") is True
    except (OSError, ValueError):
        return False
    return done and (Path(output_dir) / "model_final.pth").is_file()


def run(args: argparse.Namespace, launched_at: float | None = None) -> int:
    """Launch :func:`main_worker` over ``args.num_gpus x args.procs_per_gpu`` processes per machine; returns
    the exit status (0 ok, 2 usage, 3 diverged, 130 interrupted)."""
    args.launched_at = launched_at or time.time()  # a time budget counts from here (see setup)
    setup_logging()
    try:
        cfg = check_command_line(args)
    except UsageError as exc:
        print(f"nucleus-train: error: {exc}", file=sys.stderr)
        return 2
    if args.resume and not args.eval_only and finished_training(cfg.OUTPUT_DIR):
        logger.info("Training in %s is complete (%s, model_final.pth): nothing to resume", cfg.OUTPUT_DIR,
                    FINAL_METRICS_FILE)
        return 0
    try:
        if args.num_gpus * args.procs_per_gpu > 1 and not args.eval_only:
            # once, with every core, before the ranks start (else each rank generates the same images)
            generate_synthetic_data(cfg)
        launch(main_worker, args.num_gpus, procs_per_gpu=args.procs_per_gpu, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 2
    except (ImageReadError, AnnotationError) as exc:  # a data file at fault; the message names it
        print(f"nucleus-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nInterrupted. Continue from the last checkpoint with: nucleus-train --config-file "
              f"{args.config_file or DEFAULT_CONFIG} --resume {' '.join(args.opts or [])}".rstrip(),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except ProcessExitedException as exc:
        if exc.exit_code == EXIT_DIVERGED:
            return EXIT_DIVERGED
        if args.eval_only or not finished_training(cfg.OUTPUT_DIR):
            raise
        # seen once on an H200 node: a rank died in interpreter teardown (oneMKL "Cannot load libtorch_cpu.so")
        # after every file was written; the training itself is complete and its outputs are whole
        logger.warning("A training process exited with status %s after training had finished; %s and "
                       "model_final.pth in %s are complete", exc.exit_code, FINAL_METRICS_FILE, cfg.OUTPUT_DIR)
    return 0
