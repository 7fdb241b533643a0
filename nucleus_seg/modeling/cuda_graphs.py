"""The backbone's forward and backward in training as CUDA graphs (``NUCLEUS.TRAIN.CUDA_GRAPHS``).

On one H200 a training step of R101-FPN at batch 8 held 79 ms of GPU work in 212 ms: the host could not
launch the backbone's small kernels (~1,500 per step, forward and backward, through Python and the autograd
engine) as fast as the GPU ran them. Training crops are all one size (``INPUT.NUCLEUS.CROP_SIZE``), so the
backbone sees one input shape; :func:`torch.cuda.make_graphed_callables` records its forward and its backward
once and replays each as one launch, with the same parameters, the same arithmetic and the same gradients.

Anything else runs the eager backbone: evaluation and other no-grad calls, another input shape, the CPU.
Captured at the first training step of each shape (a few seconds), at most ``MAX_SHAPES`` shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

__all__ = ["MAX_SHAPES", "graph_backbone_in_training", "is_graphed"]

logger = logging.getLogger(__name__)

MAX_SHAPES = 2  # each shape holds its own activations for the backward pass


class _Features(torch.nn.Module):
    """The backbone as graphs want it: tensors in, a tuple of tensors out (in ``names`` order)."""

    def __init__(self, backbone: torch.nn.Module, forward: Callable, names: list[str]):
        super().__init__()
        self.backbone = backbone
        self._forward, self.names = forward, names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self._forward(images)
        return tuple(features[name] for name in self.names)


def _autocast_key() -> tuple:
    """What of autocast a graph bakes in (its casts are recorded with it)."""
    if not torch.is_autocast_enabled("cuda"):
        return (None,)
    return (torch.get_autocast_dtype("cuda"),)


def graph_backbone_in_training(model: torch.nn.Module) -> None:
    """Replace, on this model instance, ``model.backbone.forward`` by one that replays CUDA graphs in training.

    The training step must run autocast with ``cache_enabled=False`` (graphs cannot record autocast's weight
    cache); :class:`~nucleus_seg.engine.amp.QueuedAMPTrainer` does. Parameters are updated in place by the
    optimizer and by checkpoint loading, so the graphs always read the current weights.
    """
    if is_graphed(model):
        return
    backbone = model.backbone
    eager = backbone.forward
    graphs: dict[tuple, Callable] = {}

    def forward(images: torch.Tensor):
        if not (backbone.training and torch.is_grad_enabled() and images.is_cuda):
            return eager(images)
        key = (tuple(images.shape), images.dtype, images.device, *_autocast_key())
        graphed = graphs.get(key)
        if graphed is None:
            if len(graphs) >= MAX_SHAPES:
                return eager(images)
            names = list(backbone.output_shape())
            graphed = torch.cuda.make_graphed_callables(_Features(backbone, eager, names), (images.detach().clone(),))
            graphs[key] = graphed = _named(graphed, names)
            logger.info("backbone captured as CUDA graphs for training input %s", tuple(images.shape))
        return graphed(images)

    backbone.forward = forward
    backbone._nucleus_graphs = graphs


def _named(graphed: torch.nn.Module, names: list[str]) -> Callable:
    def call(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(names, graphed(images)))

    return call


def is_graphed(model: torch.nn.Module) -> bool:
    return hasattr(model.backbone, "_nucleus_graphs")
