"""``torch.compile`` of the backbone (ResNet + FPN), the part of the model whose shapes do not depend on the
detections.

Profiled on an H100 (batch 32, 512 px, fp16), eager GroupNorm was 19% of the GPU time and the layout
conversions cuDNN inserts around each convolution another 15%; inductor fuses each GroupNorm with its ReLU
and the residual add, and lays the convolutions out channels-last without the conversions. The ROI heads
(a number of boxes that changes with every batch) stay eager.

Off by default (``NUCLEUS.PREDICT.COMPILE``, ``NUCLEUS.TRAIN.COMPILE``): the first batch of each new input
size pays the compilation (about a minute for R101-FPN), which only long runs win back.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["compile_backbone", "compile_heads", "heads_compiled", "is_compiled"]

logger = logging.getLogger(__name__)


def compile_backbone(model: torch.nn.Module, *, backend: str = "inductor", fullgraph: bool = False) -> None:
    """Compile ``model.backbone``'s forward in place (parameters, state dict and checkpoints unchanged).

    ``dynamic=None``: a second input size recompiles once with symbolic sizes instead of once per size.
    ``fullgraph`` True raises where dynamo would split the backbone (the tests use it to prove it does not).
    """
    if is_compiled(model):
        return
    backbone = model.backbone
    backbone.forward = torch.compile(backbone.forward, backend=backend, fullgraph=fullgraph, dynamic=None)
    backbone._nucleus_compiled = True
    logger.info("backbone compiled with torch.compile (%s): the first batch of each input size is slow", backend)


def is_compiled(model: torch.nn.Module) -> bool:
    return bool(getattr(model.backbone, "_nucleus_compiled", False))


def _box_heads(heads: torch.nn.Module) -> list[torch.nn.Module]:
    head = getattr(heads, "box_head", None)
    return list(head) if isinstance(head, torch.nn.ModuleList) else [] if head is None else [head]


def compile_heads(model: torch.nn.Module, *, backend: str = "inductor", fullgraph: bool = False) -> None:
    """Compile the ROI heads' convolution towers in place: each box head (Cascade: one per stage) and the
    mask head's layers, with symbolic ROI counts (``dynamic=True``: one graph for any number of boxes).

    At 400 detections per image these towers run on ~32,000 proposals and ~13,000 masks per batch of 32,
    each conv followed by an eager GroupNorm and ReLU; inductor fuses those. Post-processing (NMS, mask
    pasting) stays eager.
    """
    heads = getattr(model, "roi_heads", None)
    if heads is None or heads_compiled(model):
        return
    for head in _box_heads(heads):
        head.forward = torch.compile(head.forward, backend=backend, fullgraph=fullgraph, dynamic=True)
    mask_head = getattr(heads, "mask_head", None)
    if mask_head is not None and hasattr(mask_head, "layers"):
        mask_head.layers = torch.compile(mask_head.layers, backend=backend, fullgraph=fullgraph, dynamic=True)
    heads._nucleus_compiled = True
    logger.info("ROI heads compiled with torch.compile (%s)", backend)


def heads_compiled(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "roi_heads", None), "_nucleus_compiled", False))
