"""``NucleusTrainer``: detectron2's DefaultTrainer with the nucleus mapper, evaluator and extra hooks."""

from __future__ import annotations

import logging
import os
import time
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .hooks import BudgetReached, FinalMetrics, TimeBudget, TrainingCurves
from .precision import cpu_has_native_bfloat16, training_amp_dtype, use_half_group_norm

__all__ = ["NucleusTrainer", "prepare_cfg", "register_datasets_from_cfg", "generate_synthetic_data",
           "divergence_message",
           "best_metric_key"]

logger = logging.getLogger(__name__)

SYNTH_PREFIX = "nucleus_synth_"
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
    cuda = torch.cuda.is_available()
    if cfg.MODEL.DEVICE.startswith("cuda") and not cuda:
        logger.warning("CUDA is not available: MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and (not cuda or cfg.MODEL.DEVICE == "cpu"):
        if cfg.NUCLEUS.TRAIN.AMP_DTYPE == "bfloat16" and cpu_has_native_bfloat16():
            logger.info("Mixed precision on CPU: bfloat16 autocast (this CPU has AMX/AVX512-BF16)")
        else:
            logger.info("SOLVER.AMP.ENABLED -> False: mixed precision training needs CUDA or a CPU with native "
                        "bfloat16 and NUCLEUS.TRAIN.AMP_DTYPE bfloat16 (MODEL.DEVICE=%s)", cfg.MODEL.DEVICE)
            cfg.SOLVER.AMP.ENABLED = False
    if not cfg.DATASETS.TRAIN:
        logger.info("DATASETS.TRAIN is empty: training on the synthetic default %s", DEFAULT_TRAIN)
        cfg.DATASETS.TRAIN = DEFAULT_TRAIN
    if frozen:
        cfg.freeze()
    return cfg


def generate_synthetic_data(cfg: CfgNode) -> None:
    """Generate the config's synthetic datasets now, once, with every core.

    Called before launching several local processes: otherwise each one generates the same images at once
    (safe, the first complete copy wins, but N times the CPU work while the GPU waits).
    """
    from detectron2.data import DatasetCatalog

    register_datasets_from_cfg(cfg)
    for name in dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)):
        if name.startswith(SYNTH_PREFIX):
            DatasetCatalog.get(name)


def register_datasets_from_cfg(cfg: CfgNode) -> None:
    """(Re)register the synthetic datasets with cfg.NUCLEUS.SYNTH.* if the config uses them, then
    check that every configured dataset name exists, naming the missing one."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n.startswith(SYNTH_PREFIX) for n in names):
        from ..data import register_synth_datasets

        s = cfg.NUCLEUS.SYNTH
        register_synth_datasets(num_train=s.NUM_TRAIN, num_val=s.NUM_VAL, size=s.SIZE, style=s.STYLE,
                                seed=s.SEED, features=s.FEATURES)
    registered = set(DatasetCatalog.list())
    for key, group in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for name in group:
            if name not in registered and not _register_by_name(name, registered):
                nucleus = sorted(n for n in registered if n.startswith("nucleus_"))
                raise KeyError(
                    f"{key} names dataset {name!r}, which is not registered and is no existing folder or "
                    f"COCO JSON file (FOLDER or FOLDER@train / FOLDER@val; NAME@xZ rescales a dataset by Z). "
                    f"Register it with nucleus_seg.data.register_nucleus_dataset(name, folder) before "
                    f"training, or use one of {nucleus}"
                )


def _register_by_name(name: str, registered: set[str]) -> bool:
    """Register a dataset its name describes: a path, or ``NAME@xZ`` (NAME registered or a path)."""
    from ..data.builtin import register_zoomed_dataset, split_zoom

    base, zoom = split_zoom(name)
    if zoom is None:
        return register_path_dataset(name)
    if base not in registered and not register_path_dataset(base):
        return False
    register_zoomed_dataset(name, base, zoom)
    return True


def dataset_dirname(name: str) -> str:
    """A folder name for a dataset's outputs; path-named datasets must not write into their own path."""
    import re

    return re.sub(r"[^\w.@-]+", "_", name).strip("_") or "dataset"


def register_path_dataset(name: str) -> bool:
    """Command-line users name data by path: ``/data/stage1_train``, ``/data/stage1_train@val`` (a DSB
    split), ``/data/lab`` (label images) or ``/data/nuclei.json`` register under that very name."""
    from pathlib import Path

    from ..data import register_nucleus_dataset

    root, at, split = name.rpartition("@") if "@" in name else (name, "", "")
    if not at or split not in ("train", "val"):
        root, split = name, ""
    if not Path(root).exists():
        return False
    register_nucleus_dataset(name, root, split=split or None)
    return True


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


def clip_grad_norm_per_param_(params: list[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> None:
    """detectron2's CLIP_TYPE "norm" (each parameter's gradient clipped to ``max_norm`` on its own, the
    same arithmetic as ``clip_grad_norm_`` per tensor) in a few foreach kernels instead of ~6 launches
    and a Python round trip per parameter: ~2,500 launches per step for R101-FPN."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads, norm_type))
    coefs = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))


def _with_fast_norm_clipping(optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float):
    """Give ``optimizer`` a step that clips per parameter first, as detectron2's clipping wrapper does."""
    base = type(optimizer)

    def step(self, closure=None):
        clip_grad_norm_per_param_([p for g in self.param_groups for p in g["params"]], max_norm, norm_type)
        return base.step(self, closure)

    optimizer.__class__ = type(base.__name__ + "WithFastGradientClip", (base,), {"step": step})
    return optimizer


class QueuedAMPTrainer(AMPTrainer):
    """detectron2's AMPTrainer without its two host waits per step.

    AMPTrainer reads every loss with ``.item()`` right after queueing the backward pass, and float16's
    GradScaler reads its inf check before the optimizer step: each time the host idles until the GPU
    drains, and the next step's Python work (RPN, ROI sampling) starts late. Here bfloat16 needs no
    scaler, and the losses are copied to pinned memory after the forward pass and logged (and checked
    for NaN/Inf) one step later, when they are long on the host. The last step is logged at once.
    """

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype = torch.bfloat16):
        scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler, precision=precision)
        self.device_type = next(model.parameters()).device.type  # "cuda"; "cpu" in tests (bfloat16)
        self.last_step = False
        self._pending: tuple | None = None

    def run_step(self) -> None:
        assert self.model.training, "[QueuedAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values())
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        ready = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = values
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self.flush_metrics()
        self._pending = (self.iter, data_time, list(loss_dict), host, ready)
        if self.last_step:
            self.flush_metrics()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict.get("grad_scaler"):  # saved by a bfloat16 run (no scaler); float16 starts afresh
            state_dict = {k: v for k, v in state_dict.items() if k != "grad_scaler"}
            SimpleTrainer.load_state_dict(self, state_dict)
            return
        super().load_state_dict(state_dict)

    def flush_metrics(self) -> None:
        """Log the queued step's losses (raises FloatingPointError on NaN/Inf, as detectron2 does)."""
        if self._pending is None:
            return
        step, data_time, names, host, ready = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()
        self._write_metrics(dict(zip(names, host.unbind())), data_time, iter=step)


class _UntaggedCheckpointer(DetectionCheckpointer):
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
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = super().build_model(cfg)
        if cfg.NUCLEUS.TRAIN.HALF_GROUP_NORM:
            use_half_group_norm(model)
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if not (clip.ENABLED and clip.CLIP_TYPE == "norm"):
            return super().build_optimizer(cfg, model)
        unclipped = cfg.clone()
        unclipped.defrost()
        unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
        return _with_fast_norm_clipping(super().build_optimizer(unclipped, model), clip.CLIP_VALUE, clip.NORM_TYPE)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        from ..data.mapper import NucleusDatasetMapper

        register_datasets_from_cfg(cfg)
        return build_detection_train_loader(cfg, mapper=NucleusDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        from ..data.mapper import NucleusDatasetMapper

        register_datasets_from_cfg(cfg)
        mapper = NucleusDatasetMapper(cfg, is_train=False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        from ..evaluation import NucleusEvaluator

        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_dirname(dataset_name))
        return NucleusEvaluator.from_config(cfg, dataset_name, output_folder)

    def build_hooks(self) -> list:
        ret = super().build_hooks()
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
