"""Mixed-precision training without host waits: detectron2's AMPTrainer, losses logged one step late."""

from __future__ import annotations

import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["QueuedAMPTrainer"]


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
        # no weight cache: CUDA graphs cannot record it (NUCLEUS.TRAIN.CUDA_GRAPHS), and nearly every weight is
        # cast once per step anyway; the casts themselves, and so every result, are the same
        with torch.autocast(self.device_type, dtype=self.precision, cache_enabled=False):
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
