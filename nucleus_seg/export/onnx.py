"""ONNX export (opset >= 16): the same traced network through torch's TorchScript-based exporter.

torchvision's nms and roi_align (detectron2's ROIAlign wraps the latter) become ONNX NonMaxSuppression and
RoiAlign (half_pixel, the ``aligned=True`` detectron2 uses), so onnxruntime's CPU provider runs the whole
graph; image height, width and the detection count are dynamic axes. torch.export's exporter (the new
default) cannot follow the data-dependent detection counts, so the legacy one is used.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..utils.files import atomic_path
from .network import OUTPUT_NAMES, ExportError, network_adapter, quiet_tracing

MIN_OPSET = 16  # RoiAlign's coordinate_transformation_mode (aligned boxes) arrived in opset 16
DEFAULT_OPSET = 17


def _group_norm_explicit(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm with every reshape size spelt out. torch exports GroupNorm as a reshape to
    (N, groups, -1), which onnxruntime cannot resolve when N is 0 (no detection above the score floor
    reaches the mask head): the graph then fails instead of returning nothing."""
    n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    grouped = x.reshape(n, self.num_groups, c // self.num_groups, h, w)
    mean = grouped.mean(dim=(2, 3, 4), keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    out = ((grouped - mean) / torch.sqrt(var + self.eps)).reshape(n, c, h, w)
    return out * self.weight[None, :, None, None] + self.bias[None, :, None, None]


@contextmanager
def _empty_safe_heads(model: torch.nn.Module) -> Iterator[None]:
    """The RoI heads' GroupNorms (their batch is the detection count, possibly 0) as
    :func:`_group_norm_explicit` while exporting; the backbone's (batch 1) keep torch's own."""
    swapped = [m for m in getattr(model, "roi_heads", torch.nn.Module()).modules()
               if type(m) is torch.nn.GroupNorm and m.affine]
    for module in swapped:
        module.forward = types.MethodType(_group_norm_explicit, module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace ``model``'s network on ``example`` into an ONNX file at ``path`` (atomically)."""
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: RoiAlign with aligned boxes needs opset >= {MIN_OPSET}")
    adapter = network_adapter(model, example)
    dynamic = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in OUTPUT_NAMES}}
    with quiet_tracing(), _empty_safe_heads(model), atomic_path(path) as tmp:
        torch.onnx.export(adapter, (example,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)


def run_onnx(path: str | Path):
    """``image -> four arrays`` through onnxruntime's CPU provider (imported here: an optional extra)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor):
        return session.run(None, {"image": np.ascontiguousarray(image.numpy(), dtype=np.float32)})

    return run
