"""TorchScript export: the network traced through detectron2's ``TracingAdapter``; it loads with
``torch.jit.load`` after ``import torchvision`` (for the nms and roi_align ops), no detectron2."""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils.files import atomic_path
from .network import network_adapter, quiet_tracing


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str | Path) -> torch.jit.ScriptModule:
    """Trace ``model``'s network on ``example`` and save it to ``path`` (atomically)."""
    adapter = network_adapter(model, example)
    with quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(adapter, (example,), check_trace=False)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp))
    return traced


def run_torchscript(module: torch.jit.ScriptModule):
    """``image -> four arrays`` for :func:`~nucleus_seg.export.network.check_export`."""
    def run(image: torch.Tensor):
        with torch.no_grad():
            return [t.numpy() for t in module(image)]

    return run
