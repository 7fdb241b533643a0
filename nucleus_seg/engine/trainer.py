"""``NucleusTrainer``: detectron2's DefaultTrainer with the nucleus mapper, evaluation through the predictor
users run, and hooks that leave curves, final metrics and a time budget."""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..data.catalog import dataset_dirname, register_datasets_from_cfg
from ..data.mapper import NucleusDatasetMapper
from ..evaluation.evaluator import NucleusEvaluator
from ..evaluation.runner import evaluate_datasets
from ..modeling.compile import compile_backbone, is_compiled
from ..modeling.cuda_graphs import graph_backbone_in_training
from ..modeling.fast_inference import batch_rpn_proposals
from ..modeling.ignore import ignore_regions_in_losses
from ..modeling.precision import cpu_has_native_bfloat16, training_amp_dtype, use_half_group_norm
from ..modeling.roi_align import use_nucleus_roi_align
from ..modeling.training_targets import batch_anchor_labels, batch_roi_sampling
from ..utils.env import usable_device
from ..utils.files import atomic_write
from .amp import QueuedAMPTrainer
from .checkpoint import NucleusCheckpointer, PeriodicCheckpointer
from .hooks import BudgetReached, DivergenceGuard, FinalMetrics, TimeBudget, TrainingCurves, WeightAverage
from .optim import with_fast_norm_clipping

__all__ = ["NucleusTrainer", "best_metric_key", "divergence_message", "prepare_cfg", "set_mask_loss_weight"]

logger = logging.getLogger(__name__)

DEFAULT_TRAIN = ("nucleus_synth_train",)


def prepare_cfg(cfg: CfgNode) -> CfgNode:
    """Adapt a config to this machine and fill defaults; returns a copy, logging every change.

    detectron2's AMPTrainer asserts CUDA, and its default MODEL.DEVICE "cuda" fails on CPU-only
    machines, so both are switched off here instead of failing after the model is built; AMP stays on
    for CPUs with native bfloat16 (QueuedAMPTrainer runs there).
    """
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.DEVICE = usable_device(cfg.MODEL.DEVICE)
    on_cpu = cfg.MODEL.DEVICE == "cpu"
    if cfg.SOLVER.AMP.ENABLED and on_cpu and (cfg.NUCLEUS.TRAIN.AMP_DTYPE != "bfloat16"
                                              or not cpu_has_native_bfloat16()):
        logger.info("SOLVER.AMP.ENABLED -> False: mixed precision training needs CUDA or a CPU with native "
                    "bfloat16 and NUCLEUS.TRAIN.AMP_DTYPE bfloat16 (MODEL.DEVICE=%s)", cfg.MODEL.DEVICE)
        cfg.SOLVER.AMP.ENABLED = False
    if not cfg.DATASETS.TRAIN:
        logger.info("DATASETS.TRAIN is empty: training on the synthetic default %s", DEFAULT_TRAIN)
        cfg.DATASETS.TRAIN = DEFAULT_TRAIN
    if frozen:
        cfg.freeze()
    return cfg


def best_metric_key(cfg: CfgNode) -> str:
    """Storage key of the metric the best checkpoint is chosen by.

    EvalHook flattens one dataset's results as "nucleus/dsb_score" and several datasets' as
    "<dataset>/nucleus/dsb_score"; the first test dataset decides.
    """
    metric = cfg.NUCLEUS.TRAIN.BEST_METRIC
    return metric if len(cfg.DATASETS.TEST) == 1 else f"{cfg.DATASETS.TEST[0]}/{metric}"


def divergence_message(cfg: CfgNode, exc: BaseException) -> str:
    """What to tell a person whose training produced a non-finite loss, most likely cause first."""
    frozen_bn = cfg.MODEL.RESNETS.NORM == "FrozenBN"
    no_weights = not cfg.MODEL.WEIGHTS
    causes = []
    if frozen_bn and no_weights:
        causes.append(
            "MODEL.RESNETS.NORM is FrozenBN but MODEL.WEIGHTS is empty: frozen batch-norm with random "
            "statistics cannot train from scratch. Use configs/nucleus_R101_FPN_scratch.yaml (GroupNorm) "
            "or point MODEL.WEIGHTS at ImageNet-pretrained R-101 weights."
        )
    lr = cfg.SOLVER.BASE_LR
    causes.append(
        f"the learning rate is too high (SOLVER.BASE_LR={lr:g}): lower it, e.g. SOLVER.BASE_LR {lr / 10:g}, "
        f"and keep a warm-up (SOLVER.WARMUP_ITERS={cfg.SOLVER.WARMUP_ITERS}) and gradient clipping "
        f"(SOLVER.CLIP_GRADIENTS.ENABLED={cfg.SOLVER.CLIP_GRADIENTS.ENABLED})."
    )
    if not frozen_bn:
        causes.append(
            "if it persists, start from configs/nucleus_R101_FPN_scratch.yaml, which trains from scratch."
        )
    lines = [f"Training diverged: {str(exc).splitlines()[0]}", "Likely causes and remedies:"]
    lines += [f"  {i}. {c}" for i, c in enumerate(causes, 1)]
    lines.append(f"Resume after fixing with --resume (checkpoints in {cfg.OUTPUT_DIR}) or start afresh.")
    return "\n".join(lines)


def set_mask_loss_weight(model: torch.nn.Module, weight: float) -> None:
    """Scale the mask head's loss by ``weight``; at 0 its parameters are frozen too (weight decay alone would
    otherwise shrink them)."""
    if weight < 0:
        raise ValueError(f"NUCLEUS.TRAIN.MASK_LOSS_WEIGHT {weight}: a loss weight is >= 0")
    if weight == 1.0:
        return
    head = getattr(getattr(model, "roi_heads", None), "mask_head", None)
    if head is None or not hasattr(head, "loss_weight"):
        raise ValueError(f"NUCLEUS.TRAIN.MASK_LOSS_WEIGHT {weight}: this model has no mask head with a loss weight")
    head.loss_weight = float(weight)
    if weight == 0:
        head.requires_grad_(False)


def capture_backbone_graphs(cfg: CfgNode, model: torch.nn.Module, world: int) -> None:
    """NUCLEUS.TRAIN.CUDA_GRAPHS: the backbone's graphs for this process's training batches (its share of
    SOLVER.IMS_PER_BATCH, square crops of INPUT.NUCLEUS.CROP_SIZE padded as ImageList pads them), captured
    before DDP wraps the model."""
    if is_compiled(model):
        logger.info("NUCLEUS.TRAIN.CUDA_GRAPHS: the backbone is compiled (NUCLEUS.TRAIN.COMPILE), not captured")
        return
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("NUCLEUS.TRAIN.CUDA_GRAPHS: CUDA graphs need a GPU; the backbone runs eagerly here")
        return
    divisor = max(1, int(model.backbone.size_divisibility))
    side = -(-int(cfg.INPUT.NUCLEUS.CROP_SIZE) // divisor) * divisor
    shape = (cfg.SOLVER.IMS_PER_BATCH // world, len(cfg.MODEL.PIXEL_MEAN), side, side)
    graph_backbone_in_training(model, shape, training_amp_dtype(cfg) if cfg.SOLVER.AMP.ENABLED else None)


class _UntaggedCheckpointer(NucleusCheckpointer):
    """Saves without moving the ``last_checkpoint`` tag, so model_best never becomes what --resume loads."""

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        pass


class NucleusTrainer(DefaultTrainer):
    """DefaultTrainer with NucleusDatasetMapper, NucleusEvaluator, best-checkpoint keeping, curve PNGs
    and final_metrics.json; AMP and device adapted to the machine (see :func:`prepare_cfg`)."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__, except that DDP gets no device_ids on CPU: detectron2 always passes
        # the local rank, which DistributedDataParallel refuses for CPU modules (gloo, e.g. in CI).
        cfg = prepare_cfg(cfg)
        register_datasets_from_cfg(cfg)
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        world = comm.get_world_size()
        cfg = DefaultTrainer.auto_scale_workers(cfg, world)
        if cfg.SOLVER.IMS_PER_BATCH % world:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} does not divide over the {world} training "
                f"processes (GPUs x --procs-per-gpu x machines): use a multiple of {world}, or "
                f"SOLVER.REFERENCE_WORLD_SIZE 1 to scale batch and LR with the process count")
        model = self.build_model(cfg)
        if cfg.NUCLEUS.TRAIN.CUDA_GRAPHS:
            capture_backbone_graphs(cfg, model, world)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # this process's device, not detectron2's local rank: with --procs-per-gpu several ranks share one
        device_ids = None if cfg.MODEL.DEVICE == "cpu" else [torch.cuda.current_device()]
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = QueuedAMPTrainer(model, data_loader, optimizer, precision=training_amp_dtype(cfg))
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = NucleusCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        """detectron2's model (GroupNorm in half precision if configured); its architecture is written to
        OUTPUT_DIR/model.txt instead of the terminal."""
        model = super().build_model(cfg)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            atomic_write(Path(cfg.OUTPUT_DIR) / "model.txt", f"{model}\n")
        if cfg.NUCLEUS.TRAIN.HALF_GROUP_NORM:
            use_half_group_norm(model)
        use_nucleus_roi_align(model)  # float32 boxes under autocast; the sparse backward on the CPU
        if cfg.NUCLEUS.TRAIN.BATCHED_PROPOSALS:
            batch_rpn_proposals(model)
        if cfg.NUCLEUS.TRAIN.BATCHED_ANCHOR_LABELS:
            batch_anchor_labels(model)
        if cfg.NUCLEUS.TRAIN.BATCHED_ROI_SAMPLING:
            batch_roi_sampling(model)
        if cfg.INPUT.NUCLEUS.CROWD_AS_IGNORE:
            ignore_regions_in_losses(model)
        set_mask_loss_weight(model, cfg.NUCLEUS.TRAIN.MASK_LOSS_WEIGHT)
        if cfg.NUCLEUS.TRAIN.COMPILE:
            compile_backbone(model)
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if not (clip.ENABLED and clip.CLIP_TYPE == "norm"):
            return super().build_optimizer(cfg, model)
        unclipped = cfg.clone()
        unclipped.defrost()
        unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
        return with_fast_norm_clipping(super().build_optimizer(unclipped, model), clip.CLIP_VALUE, clip.NORM_TYPE)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        register_datasets_from_cfg(cfg)
        return build_detection_train_loader(cfg, mapper=NucleusDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """detectron2's test loader with the nucleus mapper (for custom loops; :meth:`test` reads files)."""
        register_datasets_from_cfg(cfg)
        return build_detection_test_loader(cfg, dataset_name, mapper=NucleusDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_dirname(dataset_name))
        return NucleusEvaluator.from_config(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None) -> OrderedDict:
        """Score ``model`` on every DATASETS.TEST the way ``nucleus-eval`` scores a checkpoint: through
        ``NucleusPredictor`` with the config's diameter, TTA, AMP and threshold (detectron2's raw test loop
        skipped all of those, so ``model_best.pth`` was chosen by a different number than users get).
        Writes ``OUTPUT_DIR/inference/<dataset>/`` (metrics.json, curves, worst overlays). Custom
        ``evaluators`` get detectron2's own loop."""
        if evaluators is not None:
            return super().test(cfg, model, evaluators)
        if isinstance(model, DistributedDataParallel):
            model = model.module
        evaluations = evaluate_datasets(cfg, list(cfg.DATASETS.TEST), Path(cfg.OUTPUT_DIR) / "inference",
                                        num_worst=cfg.NUCLEUS.EVAL.NUM_WORST_OVERLAYS, model=model)
        results = OrderedDict((name, e.results) for name, e in evaluations.items())
        return list(results.values())[0] if len(results) == 1 else results

    def build_hooks(self) -> list:
        ret = super().build_hooks()
        train = self.cfg.NUCLEUS.TRAIN
        ret = [PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, keep=train.CHECKPOINT_KEEP,
                                    final_only=train.FINAL_ONLY) if isinstance(h, hooks.PeriodicCheckpointer) else h
               for h in ret]
        for hook in ret:
            if isinstance(hook, hooks.PeriodicWriter):
                hook._period = max(1, int(train.LOG_PERIOD))  # a first progress line early on slow machines
        guard = train.DIVERGENCE
        ret.insert(0, DivergenceGuard(guard.FACTOR, guard.CEILING, guard.PATIENCE))
        if train.EMA_DECAY > 0:  # first: the average is in the model before the final save and evaluation
            ret.insert(0, WeightAverage(train.EMA_DECAY))
        best = None
        if comm.is_main_process() and len(self.cfg.DATASETS.TEST):
            best = hooks.BestCheckpointer(
                self.cfg.TEST.EVAL_PERIOD,
                _UntaggedCheckpointer(self.model, self.cfg.OUTPUT_DIR),
                best_metric_key(self.cfg),
                mode="max",
            )
            at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)) + 1
            ret.insert(at, best)
        # after PeriodicWriter, so metrics.json is flushed before it is plotted
        period = self.cfg.SOLVER.CHECKPOINT_PERIOD
        ret += [TrainingCurves(self.cfg.OUTPUT_DIR, period), FinalMetrics(self.cfg.OUTPUT_DIR, best)]
        if self.cfg.NUCLEUS.TRAIN.TIME_BUDGET_MINUTES > 0:  # after PeriodicCheckpointer (saves model_final)
            ret.append(TimeBudget(self.cfg.NUCLEUS.TRAIN.TIME_BUDGET_MINUTES,
                                  started_at=self.cfg.NUCLEUS.TRAIN.TIME_BUDGET_START or None))
        return ret

    def run_step(self) -> None:
        self._trainer.last_step = self.iter >= self.max_iter - 1  # log it before the hooks read it
        super().run_step()

    def after_train(self) -> None:
        if isinstance(self._trainer, QueuedAMPTrainer):
            self._trainer.flush_metrics()
        super().after_train()

    def train(self):
        try:
            return super().train()
        except BudgetReached as stop:
            logger.info("Stopped at iteration %s: the time budget's rescaled schedule is complete", stop)
            return getattr(self, "_last_eval_results", None)
