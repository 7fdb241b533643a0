"""The backbone (ResNet + FPN) replayed as a CUDA graph at inference.

At batch 32 an R101-FPN GN backbone launches ~700 kernels, and on an H200 the small ones (res4/res5, 32 px and
16 px feature maps) finish faster than Python can launch the next: the host's launch cost showed as idle GPU
(session 23's ``profile_infer.py --gaps``). A graph replays the whole backbone from one launch. Its shapes do not
depend on the detections, so one graph serves every batch of the same input shape; the ROI heads stay eager.

A graph is captured the second time an input shape is seen on a stream (a shape seen once, e.g. one odd-sized
image, is not worth a capture), at most ``GRAPHS_KEPT`` per backbone (least recently used dropped). Each graph's
outputs are overwritten by its next replay, which is safe because the next replay on the same stream runs after
everything queued behind the previous one; each stream (``NUCLEUS.PREDICT.STREAMS``) has its own graphs.
Training, gradients, the CPU and autocast changes run the eager backbone.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

__all__ = ["GRAPHS_KEPT", "graph_backbone", "is_graphed"]

GRAPHS_KEPT = 4  # per backbone: each holds a private memory pool the size of one forward's activations


class _GraphedForward:
    """``backbone.forward`` replaced: eager when it must be, else a replay of the graph for this input."""

    def __init__(self, eager):
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


def graph_backbone(model: torch.nn.Module) -> None:
    """Replay ``model.backbone`` as CUDA graphs at inference (see the module's docstring); idempotent."""
    if not is_graphed(model):
        model.backbone.forward = _GraphedForward(model.backbone.forward)


def is_graphed(model: torch.nn.Module) -> bool:
    return isinstance(vars(model.backbone).get("forward"), _GraphedForward)
