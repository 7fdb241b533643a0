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

__all__ = ["compile_backbone", "is_compiled"]

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
