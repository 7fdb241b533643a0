"""The backbone replayed as CUDA graphs: in training (``NUCLEUS.TRAIN.CUDA_GRAPHS``) and at inference
(``NUCLEUS.PREDICT.CUDA_GRAPHS``).

Training. On one H200 a training step of R101-FPN at batch 8 held 79 ms of GPU work in 212 ms: the host could not
launch the backbone's small kernels (~1,500 per step, forward and backward, through Python and the autograd
engine) as fast as the GPU ran them. Training crops are all one size (``INPUT.NUCLEUS.CROP_SIZE``), so the
backbone sees one input shape; :func:`torch.cuda.make_graphed_callables` records its forward and its backward
once and replays each as one launch, with the same parameters, the same arithmetic and the same gradients.

Captured once when the trainer is built (a few seconds), for the batch shape training crops give; anything else
runs the eager backbone: evaluation and other no-grad calls, another shape (with a warning), the CPU.

Inference. A graph is captured the second time an input shape is seen on a stream (a shape seen once, e.g. one
odd-sized image, is not worth a capture), at most ``GRAPHS_KEPT`` per backbone (least recently used dropped). Each
graph's outputs are overwritten by its next replay, which is safe because the next replay on the same stream runs
after everything queued behind the previous one; each stream (``NUCLEUS.PREDICT.STREAMS``) has its own graphs.
Gradients, the CPU and autocast changes run the eager backbone. At batch 32-64 of 512 px images on an H200 the
GPU was the limit and graphs gained nothing (session 24); they are an option for host-bound runs (tiles at
batch 16 in ``nucleus-predict``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

__all__ = ["GRAPHS_KEPT", "graph_backbone_at_inference", "graph_backbone_in_training", "is_graphed_at_inference",
           "is_graphed_in_training"]

logger = logging.getLogger(__name__)

GRAPHS_KEPT = 4  # inference graphs per backbone, each with a private memory pool of one forward's activations


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
    if is_graphed_in_training(model):
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
    except RuntimeError as exc:  # CUDA errors too (e.g. out of memory): training goes on, eagerly
        logger.warning("NUCLEUS.TRAIN.CUDA_GRAPHS: capturing the backbone failed (%s); it runs eagerly",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        torch.cuda.synchronize()
        return
    finally:
        backbone.train(was_training)
    key = (tuple(batch_shape), sample.dtype, autocast_dtype)
    logger.info("backbone forward and backward captured as CUDA graphs for training batches of %s",
                tuple(batch_shape))
    warned = []

    def forward(images: torch.Tensor):
        if not (backbone.training and torch.is_grad_enabled() and images.is_cuda):
            return eager(images)
        now = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        batch = (tuple(images.shape), images.dtype, now)
        if batch != key:
            if not warned:
                warned.append(True)
                logger.warning("training batch %s (%s, autocast %s) is not the one captured as CUDA graphs, %s (%s, "
                               "autocast %s): such batches run the eager backbone", *batch, *key)
            return eager(images)
        return dict(zip(names, graphed(images)))

    backbone.forward = forward
    backbone._nucleus_graphs = key


def is_graphed_in_training(model: torch.nn.Module) -> bool:
    return hasattr(model.backbone, "_nucleus_graphs")


# torch.cuda.graph synchronises the device as it begins a capture: with two streams' threads capturing at once
# (nucleus-predict's tile batches, NUCLEUS.PREDICT.STREAMS 2), one's synchronisation broke the other's capture and
# 25 of 256 images failed (session 26, one H200)
_CAPTURING = threading.Lock()


class _InferenceForward:
    """``backbone.forward`` at inference: eager when it must be, else a replay of the graph for this input."""

    def __init__(self, eager: Callable):
        self.eager = eager
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict]] = OrderedDict()
        self.seen: set[tuple] = set()
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor):
        if torch.is_grad_enabled() or not x.is_cuda or torch.cuda.is_current_stream_capturing():
            return self.eager(x)
        stream = torch.cuda.current_stream(x.device)
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, stream.cuda_stream,
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        with self.lock:
            entry = self.graphs.get(key)
            if entry is not None:
                self.graphs.move_to_end(key)
            first = entry is None and key not in self.seen
            self.seen.add(key)
        if first:
            return self.eager(x)
        if entry is None:
            entry = self._capture(x, stream)
            with self.lock:
                self.graphs[key] = entry
                while len(self.graphs) > GRAPHS_KEPT:
                    self.graphs.popitem(last=False)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return dict(static_out)

    def _capture(self, x: torch.Tensor, stream: torch.cuda.Stream):
        with _CAPTURING:  # one capture at a time in the process: see _CAPTURING
            return self._capture_alone(x, stream)

    def _capture_alone(self, x: torch.Tensor, stream: torch.cuda.Stream):
        static_in = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):  # settle cuDNN's choices and Triton's compilations off the capture
            self.eager(static_in)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another stream's forward (NUCLEUS.PREDICT.STREAMS 2) may run on another thread meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.eager(static_in)
        return graph, static_in, static_out


def graph_backbone_at_inference(model: torch.nn.Module) -> None:
    """Replay ``model.backbone`` as CUDA graphs at inference (see the module's docstring); idempotent."""
    if not is_graphed_at_inference(model):
        model.backbone.forward = _InferenceForward(model.backbone.forward)


def is_graphed_at_inference(model: torch.nn.Module) -> bool:
    return isinstance(vars(model.backbone).get("forward"), _InferenceForward)
