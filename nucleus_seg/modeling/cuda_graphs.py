"""The backbone's forward and backward in training as CUDA graphs (``NUCLEUS.TRAIN.CUDA_GRAPHS``).

On one H200 a training step of R101-FPN at batch 8 held 79 ms of GPU work in 212 ms: the host could not
launch the backbone's small kernels (~1,500 per step, forward and backward, through Python and the autograd
engine) as fast as the GPU ran them. Training crops are all one size (``INPUT.NUCLEUS.CROP_SIZE``), so the
backbone sees one input shape; :func:`torch.cuda.make_graphed_callables` records its forward and its backward
once and replays each as one launch, with the same parameters, the same arithmetic and the same gradients.

Captured once when the trainer is built (a few seconds), for the batch shape training crops give; anything else
runs the eager backbone: evaluation and other no-grad calls, another shape (with a warning), the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

__all__ = ["graph_backbone_in_training", "is_graphed"]

logger = logging.getLogger(__name__)


class _Features(torch.nn.Module):
    """The backbone as graphs want it: tensors in, a tuple of tensors out (in ``names`` order)."""

    def __init__(self, backbone: torch.nn.Module, forward: Callable, names: list[str]):
        super().__init__()
        self.backbone = backbone
        self._forward, self.names = forward, names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self._forward(images)
        return tuple(features[name] for name in self.names)


def graph_backbone_in_training(model: torch.nn.Module, batch_shape: tuple[int, ...],
                               autocast_dtype: torch.dtype | None) -> None:
    """Record ``model.backbone``'s forward and backward for training batches of ``batch_shape`` now, and make its
    ``forward`` replay them for such batches in training (on this model instance).

    Called before DistributedDataParallel wraps the model: a capture inside DDP's forward fails (its gradient
    hooks). The training step must run autocast at ``autocast_dtype`` (None: no autocast) without its weight
    cache, as :class:`~nucleus_seg.engine.amp.QueuedAMPTrainer` does. Parameters are changed in place (by the
    optimizer, checkpoint loading, weight averaging), so the graphs always read the current weights.
    """
    if is_graphed(model):
        return
    backbone = model.backbone
    eager = backbone.forward
    names = list(backbone.output_shape())
    device = next(backbone.parameters()).device
    sample = torch.zeros(batch_shape, device=device)
    was_training = backbone.training
    backbone.train()
    try:
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None,
                            cache_enabled=False):
            graphed = torch.cuda.make_graphed_callables(_Features(backbone, eager, names), (sample,))
    except (RuntimeError, torch.AcceleratorError) as exc:  # e.g. out of memory: training goes on, eagerly
        logger.warning("NUCLEUS.TRAIN.CUDA_GRAPHS: capturing the backbone failed (%s); it runs eagerly",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        torch.cuda.synchronize()
        return
    finally:
        backbone.train(was_training)
    key = (tuple(batch_shape), autocast_dtype)
    logger.info("backbone forward and backward captured as CUDA graphs for training batches of %s",
                tuple(batch_shape))
    warned = []

    def forward(images: torch.Tensor):
        if not (backbone.training and torch.is_grad_enabled() and images.is_cuda):
            return eager(images)
        now = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        if (tuple(images.shape), now) != key or images.dtype != sample.dtype:
            if not warned:
                warned.append(True)
                logger.warning("training batch %s (autocast %s) is not the one captured as CUDA graphs, %s (%s): "
                               "such batches run the eager backbone", tuple(images.shape), now, key[0], key[1])
            return eager(images)
        return dict(zip(names, graphed(images)))

    backbone.forward = forward
    backbone._nucleus_graphs = key


def is_graphed(model: torch.nn.Module) -> bool:
    return hasattr(model.backbone, "_nucleus_graphs")
