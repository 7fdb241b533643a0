"""TimeBudget shrinks MAX_ITER to fit a wall-clock budget and rescales the LR schedule with it.

Runs detectron2's real SimpleTrainer, LR scheduler and PeriodicCheckpointer on a tiny model, with a
step made deliberately slow so the budget decides.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import SimpleTrainer, hooks
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from nucleus_seg.engine.hooks import BudgetReached, FinalMetrics, TimeBudget


class _Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, batch):
        time.sleep(0.01)
        return {"loss": (self.w * batch).sum() ** 2}


def _loader():
    while True:
        yield torch.ones(1)


def _trainer(tmp_path, max_iter):
    model = _Slow()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steps = MultiStepParamScheduler([1.0, 0.1], milestones=[max_iter // 2], num_updates=max_iter)
    sched = LRMultiplier(opt, WarmupParamScheduler(steps, 0.1, 0.0), max_iter)
    trainer = SimpleTrainer(model, _loader(), opt)
    trainer.scheduler = sched
    ckpt = DetectionCheckpointer(model, str(tmp_path))
    trainer.register_hooks([hooks.LRScheduler(opt, sched), hooks.PeriodicCheckpointer(ckpt, 10**6, max_iter)])
    return trainer, opt


def test_budget_shrinks_schedule_and_saves_final(tmp_path):
    trainer, opt = _trainer(tmp_path, max_iter=10_000)
    trainer.register_hooks([TimeBudget(minutes=0.5 / 60, measure_from=2, measure_iters=5),
                            FinalMetrics(str(tmp_path))])
    with pytest.raises(BudgetReached):
        trainer.train(0, 10_000)
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    # the budget's schedule ran to its end: a normal finish, not an error
    assert final["completed"] and final["stopped_by"] == "time_budget" and final["error"] is None
    stopped = trainer.iter + 1
    assert 7 <= stopped < 200  # ~0.5 s of ~10 ms steps, not 10k
    assert trainer.max_iter == stopped
    assert (tmp_path / "model_final.pth").is_file()
    # the decay milestone (half of MAX_ITER) moved with the schedule: the last LR is the decayed one
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_no_shrink_when_the_budget_suffices(tmp_path):
    trainer, _ = _trainer(tmp_path, max_iter=12)
    trainer.register_hooks([TimeBudget(minutes=10, measure_from=2, measure_iters=5)])
    trainer.train(0, 12)  # ends normally, no BudgetReached
    assert trainer.iter == 12 and trainer.max_iter == 12


def test_budget_counting_from_launch_includes_time_before_the_loop(tmp_path, caplog):
    """A budget already spent before the first step (data generation, set-up) stops after that step."""
    trainer, _ = _trainer(tmp_path, max_iter=10_000)
    trainer.register_hooks([TimeBudget(minutes=1 / 60, measure_from=2, measure_iters=5,
                                       started_at=time.time() - 5.0)])
    with caplog.at_level("INFO", logger="nucleus_seg.engine.hooks"), pytest.raises(BudgetReached):
        trainer.train(0, 10_000)
    assert trainer.iter + 1 == 1 == trainer.max_iter  # at once, not after the measuring window
    assert (tmp_path / "model_final.pth").is_file()
    assert "spent before the first step" in caplog.text and "spent before training" in caplog.text


class _Slowing(_Slow):
    """Steps that get slower as training goes (as Mask R-CNN's do when it starts finding nuclei)."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def forward(self, batch):
        self.steps += 1
        time.sleep(0.004 + 0.0004 * self.steps)
        return {"loss": (self.w * batch).sum() ** 2}


def test_a_run_that_slows_down_still_ends_within_its_budget(tmp_path):
    """The speed measured early (iterations 2-7) would overrun by ~2x; measured again every window, it does not."""
    model = _Slowing()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = LRMultiplier(opt, WarmupParamScheduler(MultiStepParamScheduler([1.0, 0.1], milestones=[5000],
                                                                           num_updates=10_000), 0.1, 0.0), 10_000)
    trainer = SimpleTrainer(model, _loader(), opt)
    trainer.scheduler = sched
    trainer.register_hooks([hooks.LRScheduler(opt, sched),
                            hooks.PeriodicCheckpointer(DetectionCheckpointer(model, str(tmp_path)), 10**6, 10_000),
                            TimeBudget(minutes=3 / 60, measure_from=2, measure_iters=5)])
    start = time.perf_counter()
    with pytest.raises(BudgetReached):
        trainer.train(0, 10_000)
    assert time.perf_counter() - start < 3 * 1.15
    assert (tmp_path / "model_final.pth").is_file()
