"""Training hooks that leave something for a person to look at: curve PNGs and a final metrics JSON."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.engine.hooks import PeriodicCheckpointer
from detectron2.utils import comm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..utils.files import atomic_path, write_json

__all__ = [
    "BudgetReached", "DivergenceGuard", "FinalMetrics", "TimeBudget", "TrainingCurves", "WeightAverage",
    "plot_training_curves", "read_metrics",
]

logger = logging.getLogger(__name__)

CURVE_FILES = {"loss": "training_loss.png", "lr": "training_lr.png", "eval": "training_eval.png"}
FINAL_METRICS_FILE = "final_metrics.json"
EVAL_SUFFIXES = ("dsb_score", "/AP", "/AP50", "/AP75", "f1@0.5")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of detectron2's metrics.json, one per iteration, sorted.

    A resumed run appends to the same file and may repeat iterations after its last checkpoint: the
    later record wins. A line cut off by a crash is skipped.
    """
    by_iter: dict[int, dict] = {}
    path = Path(path)
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "iteration" in record:
            by_iter.setdefault(int(record["iteration"]), {}).update(record)
    return [by_iter[i] for i in sorted(by_iter)]


def _series(records: list[dict], key: str, history: dict | None) -> tuple[list[int], list[float]]:
    """One curve: metrics.json points before this run's in-memory history, then that history."""
    recent = sorted((history or {}).get(key, []))
    first = recent[0][0] if recent else math.inf
    points = [(int(r["iteration"]), r[key]) for r in records if key in r and r["iteration"] < first]
    points += recent
    points = [(i, float(v)) for i, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
    return [i for i, _ in points], [v for _, v in points]


def _running_median(values: list[float], window: int = 20) -> list[float]:
    v = np.asarray(values, dtype=float)
    return [float(np.median(v[max(0, i - window + 1):i + 1])) for i in range(v.size)]


def plot_training_curves(
    metrics_json: str | os.PathLike, output_dir: str | os.PathLike, history: dict | None = None
) -> list[Path]:
    """Write loss, learning-rate and (if evaluated) metric curves as PNGs; returns the files written.

    ``history`` ({key: [(iteration, value), ...]}, e.g. from the EventStorage) gives every iteration
    of the current run; metrics.json (written every 20 iterations) fills in earlier runs after
    ``--resume``. Losses are drawn raw (faint) and as a 20-iteration running median. Uses matplotlib's
    object API with the Agg canvas: no global backend switch, works headless.
    """
    records = read_metrics(metrics_json)
    keys = sorted({k for r in records for k in r} | set(history or {}))
    output_dir = Path(output_dir)
    loss_keys = (["total_loss"] if "total_loss" in keys else []) + [k for k in keys if k.startswith("loss_")]
    eval_keys = [k for k in keys if k.endswith(EVAL_SUFFIXES)]
    panels = [("loss", loss_keys, "loss (log scale)", True),
              ("lr", ["lr"] if "lr" in keys else [], "learning rate", False),
              ("eval", eval_keys, "evaluation", False)]
    written = []
    for name, plot_keys, ylabel, is_loss in panels:
        lines = [(k, *_series(records, k, history)) for k in plot_keys]
        lines = [line for line in lines if line[1]]
        if not lines:
            continue
        fig = Figure(figsize=(8, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for j, (key, xs, ys) in enumerate(lines):
            color = f"C{j % 10}"
            marker = "o" if len(xs) < 20 else None
            if is_loss and len(xs) >= 5:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ys = _running_median(ys)
            ax.plot(xs, ys, label=key, color=color, linewidth=2.0 if key == "total_loss" else 1.2,
                    marker=marker, markersize=3)
        if is_loss and all(y > 0 for _, _, ys in lines for y in ys):
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = output_dir / CURVE_FILES[name]
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        written.append(path)
    return written


class TrainingCurves(HookBase):
    """Redraw the curve PNGs every ``period`` iterations and after training: this run's every
    iteration from the EventStorage, earlier runs (before ``--resume``) from metrics.json.

    Register it after detectron2's PeriodicWriter so the JSON is flushed first.
    """

    def __init__(self, output_dir: str, period: int):
        self._output_dir = output_dir
        self._period = int(period)

    def _draw(self) -> None:
        if not comm.is_main_process():
            return
        storage = self.trainer.storage
        history = {k: [(int(i), float(v)) for v, i in buf.values()] for k, buf in storage.histories().items()
                   if k in ("total_loss", "lr") or k.startswith("loss_") or k.endswith(EVAL_SUFFIXES)}
        try:
            plot_training_curves(os.path.join(self._output_dir, "metrics.json"), self._output_dir, history)
        except Exception:  # a plot must never kill a training run
            logger.exception("Could not draw training curves")

    def after_step(self) -> None:
        if self._period > 0 and (self.trainer.iter + 1) % self._period == 0:
            self._draw()

    def after_train(self) -> None:
        self._draw()


class FinalMetrics(HookBase):
    """Write ``final_metrics.json`` when training stops (also on failure): where it stopped, why,
    the last smoothed losses, the last evaluation and the best checkpoint."""

    def __init__(self, output_dir: str, best_checkpointer=None):
        self._output_dir = output_dir
        self._best = best_checkpointer
        self._start = time.perf_counter()

    def before_train(self) -> None:
        self._start = time.perf_counter()

    def after_train(self) -> None:
        if not comm.is_main_process():
            return
        trainer = self.trainer
        storage = trainer.storage
        latest = storage.latest_with_smoothing_hint(20)
        losses = {k: float(v) for k, (v, _) in latest.items() if k == "total_loss" or k.startswith("loss_")}
        exc = sys.exc_info()[1]  # after_train runs in TrainerBase.train's `finally`
        budget = isinstance(exc, BudgetReached)  # the time budget's schedule ran to its end: a normal finish
        report = {
            "completed": (trainer.iter >= trainer.max_iter and exc is None) or budget,
            "stopped_by": "time_budget" if budget else "max_iter" if exc is None else "error",
            "error": None if exc is None or budget else f"{type(exc).__name__}: {exc}",
            "iteration": int(min(trainer.iter, trainer.max_iter)),
            "start_iter": int(trainer.start_iter),
            "max_iter": int(trainer.max_iter),
            "wall_time_s": round(time.perf_counter() - self._start, 1),
            "losses": losses,
            "lr": float(latest["lr"][0]) if "lr" in latest else None,
            "eval": getattr(trainer, "_last_eval_results", None) or {},
            "best": None,
        }
        if self._best is not None and self._best.best_metric is not None:
            report["best"] = {"metric": self._best._val_metric, "value": float(self._best.best_metric),
                              "iteration": int(self._best.best_iter), "checkpoint": "model_best.pth"}
        path = Path(self._output_dir) / FINAL_METRICS_FILE
        write_json(path, report)
        logger.info("Final metrics written to %s", path)


class DivergenceGuard(HookBase):
    """Stop a run whose loss explodes while staying finite, as detectron2 stops one whose loss is NaN.

    With ``SOLVER.BASE_LR 1e3`` the total loss reached 2.6e14 by iteration 9 and training went on to save
    a "completed" model. Here a logged total loss above ``ceiling``, or above ``factor`` x the median of
    the earlier ones, ``patience`` times in a row raises the same ``FloatingPointError`` as NaN does, so
    ``nucleus-train`` prints the same diagnosis and exits with the same status.
    """

    def __init__(self, factor: float = 100.0, ceiling: float = 1e4, patience: int = 3, history: int = 50,
                 warmup: int = 10):
        self.factor, self.ceiling, self.patience = float(factor), float(ceiling), int(patience)
        self.history, self.warmup = int(history), int(warmup)
        self._checked = -1
        self._strikes = 0

    def after_step(self) -> None:
        storage = self.trainer.storage
        if self.patience <= 0 or "total_loss" not in storage.histories():
            return
        logged = storage.history("total_loss").values()  # [(value, iteration)], logged one step late
        value, iteration = logged[-1]
        if iteration <= self._checked:
            return
        self._checked = iteration
        earlier = [v for v, _ in logged[-self.history - 1:-1]]
        median = float(np.median(earlier)) if len(earlier) >= self.warmup else None
        too_high = value > self.ceiling or (median is not None and value > self.factor * max(median, 1e-6))
        self._strikes = self._strikes + 1 if too_high else 0
        if self._strikes >= self.patience:
            against = f"{value / max(median, 1e-6):.3g}x its running median {median:.3g}" if median else (
                f"above {self.ceiling:g}")
            raise FloatingPointError(f"Loss is {value:.3g} at iteration {iteration}, {against}, {self.patience} "
                                     "logged steps in a row: training diverged")


class BudgetReached(BaseException):
    """Raised by :class:`TimeBudget` to end training early. A BaseException, so detectron2's train loop
    does not log it as a failure; its ``finally`` still runs every hook's ``after_train``."""


class TimeBudget(HookBase):
    """Fit the whole schedule into a wall-clock budget: after ``measure_iters`` steps, shrink MAX_ITER
    to what the measured speed allows and rescale the LR schedule to it, so warm-up and decay steps
    still happen (a run cut off mid-schedule would never decay its LR).

    ``started_at`` (a ``time.time()``) makes the budget count from then instead of from the first step, so
    data generation and model set-up before the loop are inside it: ``nucleus-train`` passes its own
    start, and "N minutes" means launch to ``model_final``.

    Needs to sit after the PeriodicCheckpointer, which saves ``model_final`` at the new last iteration.
    """

    def __init__(self, minutes: float, measure_from: int = 20, measure_iters: int = 50,
                 started_at: float | None = None):
        self._budget = minutes * 60.0
        self._started_at = started_at
        self._measure_from = measure_from
        self._measure_iters = measure_iters
        self._decided = False
        self._shrunk = False

    def before_train(self) -> None:
        before_loop = time.time() - self._started_at if self._started_at else 0.0
        self._start = time.perf_counter() - before_loop
        if before_loop > 0:
            logger.info("Time budget %.1f min counts from launch: %.1f min spent before the first step "
                        "(data, model set-up)", self._budget / 60, before_loop / 60)
        self._first_iter = self.trainer.iter

    def after_step(self) -> None:
        trainer = self.trainer
        done = trainer.iter + 1 - self._first_iter
        # a budget already spent before the loop stops now, not after the measuring window (~1 min on an
        # H100); one collective at the first step, so every rank stops at the same iteration
        if done == 1 and self._started_at and any(
            comm.all_gather(time.perf_counter() - self._start >= self._budget)
        ):
            logger.warning("Time budget %.1f min was spent before training could use it; stopping at "
                           "iteration %d", self._budget / 60, trainer.iter + 1)
            self._decided = self._shrunk = True
            self._shrink(trainer.iter + 1)
        if done == self._measure_from:
            self._t_from = time.perf_counter()
        first = done == self._measure_from + self._measure_iters
        # steps often slow down as training goes (more detections, more ROI work): the speed is measured again
        # every window and the schedule shrunk again where it would overrun (it never grows back)
        again = self._decided and done > self._measure_from + self._measure_iters and (
            done - self._measure_from) % self._measure_iters == 0 and trainer.iter + 1 < trainer.max_iter
        if (not self._decided and first) or again:
            self._decided = True
            now = time.perf_counter()
            per_iter = (now - self._t_from) / self._measure_iters
            self._t_from = now
            left = self._budget - (now - self._start)
            new_max = min(trainer.max_iter, trainer.iter + 1 + max(0, int(left / per_iter)))
            new_max = min(comm.all_gather(new_max))  # every rank must stop at the same iteration
            if left <= 0 and first:
                logger.warning("Time budget %.1f min was spent before training could use it; stopping at "
                               "iteration %d", self._budget / 60, new_max)
            if new_max < trainer.max_iter:
                logger.info(
                    "Time budget %.1f min at %.3f s/iter: MAX_ITER %d -> %d, LR schedule rescaled to it",
                    self._budget / 60, per_iter, trainer.max_iter, new_max,
                )
                self._shrink(new_max)
                self._shrunk = True
        if self._shrunk and trainer.iter + 1 >= trainer.max_iter:
            raise BudgetReached(trainer.iter + 1)

    def _shrink(self, new_max: int) -> None:
        trainer = self.trainer
        trainer.max_iter = new_max
        scheduler = getattr(trainer, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "_max_iter"):
            scheduler._max_iter = new_max  # LRMultiplier: schedule position = iter / _max_iter
        for hook in trainer._hooks:
            if isinstance(hook, PeriodicCheckpointer):
                hook.max_iter = new_max
                if new_max == trainer.iter + 1:  # this step is the last: the hook's save for it has passed
                    for average in (h for h in trainer._hooks if isinstance(h, WeightAverage)):
                        average.apply()
                    if hasattr(hook, "save_final"):  # nucleus_seg's (weights-only option, no duplicate)
                        hook.save_final(trainer.iter)
                    else:
                        hook.checkpointer.save(f"{hook.file_prefix}_final", iteration=trainer.iter)
            for writer in getattr(hook, "_writers", ()):  # PeriodicWriter's CommonMetricPrinter: the ETA
                if hasattr(writer, "_max_iter"):
                    writer._max_iter = new_max


class WeightAverage(HookBase):
    """An exponential moving average of the weights, put into the model at the last step (before
    ``model_final.pth`` is saved and the final evaluation runs).

    A short schedule ends while SGD still jitters around the minimum; the average of the last ~1/(1-decay)
    steps sits nearer it. The decay ramps up as ``decay * (1 - exp(-step / ramp))`` so early steps, far
    from any minimum, are forgotten quickly. Every floating-point entry of the state dict is averaged, other
    entries are copied. The average is part of the hook's state, which detectron2 saves with the trainer in
    every full checkpoint, so ``--resume`` continues it.

    Needs to sit before the PeriodicCheckpointer and the EvalHook.
    """

    def __init__(self, decay: float, ramp: float = 100.0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"NUCLEUS.TRAIN.EMA_DECAY must be in (0, 1) to average (0 turns it off), got {decay}")
        self.decay, self.ramp = float(decay), float(ramp)
        self.updates = 0
        self.average: dict[str, torch.Tensor] = {}
        self.applied = False

    @property
    def _model(self) -> torch.nn.Module:
        return getattr(self.trainer.model, "module", self.trainer.model)  # DDP's wrapped model

    def before_train(self) -> None:
        if not self.average:  # a resumed run has it from the checkpoint
            self.average = {k: v.detach().clone() for k, v in self._model.state_dict().items()}

    @torch.no_grad()
    def after_step(self) -> None:
        if self.applied:
            return
        self.updates += 1
        decay = self.decay * (1.0 - math.exp(-self.updates / self.ramp))
        averages, currents = [], []
        for k, v in self._model.state_dict().items():
            if v.is_floating_point():
                averages.append(self.average[k])
                currents.append(v)
            else:
                self.average[k].copy_(v)
        if averages:
            torch._foreach_lerp_(averages, currents, 1.0 - decay)
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self.apply()

    def apply(self) -> None:
        """Put the average into the model (once): the weights that are saved and evaluated from now on."""
        if self.applied:
            return
        self._model.load_state_dict(self.average)
        self.applied = True
        logger.info("Weights averaged over the last ~%d steps (EMA decay %g) put into the model",
                    round(1 / (1 - self.decay)), self.decay)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.average = {k: v.clone() for k, v in state["average"].items()}
