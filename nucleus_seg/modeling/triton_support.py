"""What the Triton inference kernels (``nhwc_group_norm``, ``nhwc_roi_align``) share: the half-precision dtypes
they take and where they can run. Its own module because ``precision`` imports both kernels."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["HALF_DTYPES", "is_power_of_two", "triton_runs_on"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Triton compiles for NVIDIA GPUs from Volta on; on an older card (a GTX 10xx, a P100) its compiler fails, so
# there the kernels give way to PyTorch's own ops (the same results, slower)
TRITON_MIN_CAPABILITY = (7, 0)


def triton_runs_on(x: torch.Tensor) -> bool:
    """A tensor on a CUDA GPU Triton compiles for, or any under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter:
    the tests), outside a ``torch.compile`` region: there inductor fuses PyTorch's own ops, and dynamo cannot
    trace these kernels (their helper functions: "NameError: group_stats is not defined" with torch 2.11 on the
    H200)."""
    if torch.compiler.is_compiling():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return x.is_cuda and _triton_compiles_for(x.device.index if x.device.index is not None else -1)


@functools.cache
def _triton_compiles_for(device_index: int) -> bool:
    """Whether CUDA device ``device_index`` (-1: the current one) is one Triton compiles for."""
    device = torch.cuda.current_device() if device_index < 0 else device_index
    return tuple(torch.cuda.get_device_capability(device)) >= TRITON_MIN_CAPABILITY


def is_power_of_two(v: int) -> bool:
    """Triton's block shapes are powers of two."""
    return v > 0 and v & (v - 1) == 0
