"""What the Triton inference kernels (``nhwc_group_norm``, ``nhwc_roi_align``) share: the half-precision dtypes
they take and where they can run. Its own module because ``precision`` imports both kernels."""

from __future__ import annotations

import os

import torch

__all__ = ["HALF_DTYPES", "is_power_of_two", "triton_runs_on"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def triton_runs_on(x: torch.Tensor) -> bool:
    """A CUDA tensor, or any under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter: the tests), outside a
    ``torch.compile`` region: there inductor fuses PyTorch's own ops, and dynamo cannot trace these kernels
    (their helper functions: "NameError: group_stats is not defined" with torch 2.11 on the H200)."""
    if torch.compiler.is_compiling():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def is_power_of_two(v: int) -> bool:
    """Triton's block shapes are powers of two."""
    return v > 0 and v & (v - 1) == 0
