"""QueuedAMPTrainer logs every step's losses exactly once, under that step's number, one step late;
the last step at once; NaN losses still stop training. Run with bfloat16 autocast on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.utils.events import EventStorage

from nucleus_seg.engine.amp import QueuedAMPTrainer


class TwoLosses(torch.nn.Module):
    """A regression with two loss terms; remembers what each step returned (test-side sync only)."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.returned: list[float] = []
        self.nan_at = nan_at

    def forward(self, batch):
        x, y = batch
        err = self.linear(x).float().squeeze(1) - y
        losses = {"loss_a": err.abs().mean(), "loss_b": (err**2).mean()}
        if self.nan_at is not None and len(self.returned) == self.nan_at:
            losses["loss_b"] = losses["loss_b"] * float("nan")
        self.returned.append(sum(v.item() for v in losses.values()))
        return losses


def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield x, x.sum(dim=1)


def run(model: TwoLosses, iters: int) -> EventStorage:
    trainer = QueuedAMPTrainer(model, batches(), torch.optim.SGD(model.parameters(), lr=0.05))
    with EventStorage(0) as storage:
        for it in range(iters):
            storage.iter = trainer.iter = it
            trainer.last_step = it == iters - 1
            trainer.run_step()
    return storage


def test_every_step_logged_once_under_its_own_number():
    model = TwoLosses()
    storage = run(model, 6)
    logged = storage.history("total_loss").values()
    assert [it for _, it in logged] == list(range(6))  # the last one too, without a later step
    assert [v for v, _ in logged] == pytest.approx(model.returned, rel=1e-6)
    assert model.returned[-1] < model.returned[0]  # bfloat16 autocast still trains
    assert [it for _, it in storage.history("loss_b").values()] == list(range(6))


def test_nan_loss_raises_with_its_iteration():
    model = TwoLosses(nan_at=2)
    with pytest.raises(FloatingPointError, match="iteration=2"):
        run(model, 6)
    assert len(model.returned) == 4  # found while step 3 ran (one step late), not later
    assert math.isnan(model.returned[2])


def test_bfloat16_needs_no_grad_scaler_float16_keeps_it(recwarn):
    model = TwoLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not QueuedAMPTrainer(model, batches(), opt).grad_scaler.is_enabled()
    fp16 = QueuedAMPTrainer(model, batches(), opt, precision=torch.float16)
    assert fp16.grad_scaler.is_enabled() == torch.cuda.is_available()  # GradScaler disables itself on CPU
