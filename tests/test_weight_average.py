"""WeightAverage: the EMA of the weights goes into the model at the last step, so model_final.pth holds it.

detectron2's real SimpleTrainer, checkpointer and PeriodicCheckpointer on a tiny model whose weights change at
every step (a loss pulling them towards a target that moves with the model's own step counter, so a resumed
run sees the same targets as an uninterrupted one).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase, SimpleTrainer, hooks

from nucleus_seg.engine.hooks import BudgetReached, TimeBudget, WeightAverage


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # not averaged: copied

    def forward(self, _batch):
        self.steps += 1
        target = torch.sin(self.steps + torch.arange(6.0)).reshape(2, 3)
        return {"loss": ((self.linear.weight - target) ** 2).sum() + self.linear.bias.abs().sum()}


def _loader():
    while True:
        yield None


class _Record(HookBase):
    """The raw weights after every step (registered before the average, so it sees them first)."""

    def __init__(self):
        self.weights = []

    def after_step(self):
        self.weights.append({k: v.clone() for k, v in self.trainer.model.state_dict().items()})


def _trainer(tmp_path, decay, max_iter):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = _Tiny()
    trainer = SimpleTrainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.3))
    checkpointer = DetectionCheckpointer(model, str(tmp_path), trainer=trainer)
    average = WeightAverage(decay, ramp=2.0)  # saved as part of the trainer's state (its hooks')
    record = _Record()
    trainer.register_hooks([record, average, hooks.PeriodicCheckpointer(checkpointer, 3, max_iter)])
    return trainer, checkpointer, average, record


def _expected(initial, steps, decay, ramp=2.0):
    avg = {k: v.clone() for k, v in initial.items()}
    for n, weights in enumerate(steps, start=1):
        d = decay * (1 - math.exp(-n / ramp))
        for k, v in weights.items():
            avg[k] = avg[k] * d + v * (1 - d) if v.is_floating_point() else v.clone()
    return avg


def test_the_average_is_what_the_model_and_model_final_hold_at_the_end(tmp_path):
    trainer, _, _, record = _trainer(tmp_path, decay=0.8, max_iter=8)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(0, 8)
    want = _expected(initial, record.weights, 0.8)
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    for key, value in want.items():
        torch.testing.assert_close(trainer.model.state_dict()[key], value)
        torch.testing.assert_close(final[key], value)
    # and it is not simply the last raw weights: the steps moved them
    assert not torch.allclose(want["linear.weight"], record.weights[-1]["linear.weight"], atol=1e-3)
    assert int(final["steps"]) == 8  # integer buffers are copied, not averaged


def test_a_resumed_run_ends_with_the_same_average_as_an_uninterrupted_one(tmp_path):
    whole, *_ = _trainer(tmp_path / "whole", decay=0.8, max_iter=8)
    whole.train(0, 8)

    class Stop(HookBase):
        def before_step(self):
            if self.trainer.iter == 6:
                raise KeyboardInterrupt

    cut, *_ = _trainer(tmp_path / "cut", decay=0.8, max_iter=8)
    cut.register_hooks([Stop()])
    with pytest.raises(KeyboardInterrupt):
        cut.train(0, 8)  # checkpoint model_0000005.pth (iterations 0-5 done) holds the average so far
    resumed, checkpointer, average, _ = _trainer(tmp_path / "cut", decay=0.8, max_iter=8)
    start = checkpointer.resume_or_load("", resume=True)["iteration"] + 1
    assert start == 6 and average.updates == 6
    resumed.train(start, 8)
    assert average.applied and average.updates == 8
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)


def test_a_time_budget_that_ends_training_at_once_still_saves_the_average(tmp_path):
    trainer, _, average, record = _trainer(tmp_path, decay=0.8, max_iter=10_000)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.register_hooks([TimeBudget(minutes=1 / 60, measure_from=2, measure_iters=5,
                                       started_at=time.time() - 5.0)])
    with pytest.raises(BudgetReached):
        trainer.train(0, 10_000)
    assert trainer.max_iter == 1 and average.applied
    want = _expected(initial, record.weights[:1], 0.8)
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    torch.testing.assert_close(final["linear.weight"], want["linear.weight"])
    assert not torch.allclose(final["linear.weight"], record.weights[0]["linear.weight"])


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1])
def test_a_decay_that_cannot_average_is_named(decay):
    with pytest.raises(ValueError, match="NUCLEUS.TRAIN.EMA_DECAY"):
        WeightAverage(decay)
