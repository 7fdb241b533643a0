"""The packed suppression matrix of the batched NMS's fixed point in one Triton kernel.

``batched_nms_keep`` builds, per group of ``n`` boxes in visiting order, which earlier boxes overlap each box
past the threshold, 8 a byte. In PyTorch that is ~15 passes over float32 ``(G, n, n)`` IoU matrices (the RPN of
64 images: 320 groups of up to 2000 boxes, 5 GB a pass), the largest share of the elementwise kernels in Cascade
R-CNN's H200 profile (session 29). Here each program computes a tile of IoUs in registers and writes only the
bits, skipping tiles above the diagonal. Same arithmetic, so the same bits (tests under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools

import torch

from .triton_support import triton_runs_on

__all__ = ["suppression_bits", "suppression_bits_usable"]

BLOCK_J, BLOCK_B = 32, 8  # a program: 32 candidate boxes x 64 earlier boxes (8 bytes of bits)


@functools.lru_cache(maxsize=1)
def _kernel():
    try:
        from ._nms_kernels import suppression_bits_kernel
    except ImportError:
        return None
    return suppression_bits_kernel


def suppression_bits_usable(boxes: torch.Tensor) -> bool:
    """``(G, n, 4)`` float32 boxes where Triton runs (CUDA, or the interpreter in tests)."""
    return boxes.dim() == 3 and boxes.dtype == torch.float32 and triton_runs_on(boxes) and _kernel() is not None


def suppression_bits(boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(G, n, ceil(n / 8))`` uint8: bit b of byte k in row j is set when box ``8k + b`` comes before box j
    (``8k + b < j``) and their IoU, computed in float32 as torchvision's kernel does, exceeds ``threshold``."""
    g, n, _ = boxes.shape
    n_bytes = (n + 7) // 8
    out = torch.zeros((g, n, n_bytes), dtype=torch.uint8, device=boxes.device)
    if g and n:
        grid = (g, -(-n // BLOCK_J), -(-n_bytes // BLOCK_B))
        _kernel()[grid](boxes.contiguous(), out, n, n_bytes, float(threshold), BLOCK_J=BLOCK_J, BLOCK_B=BLOCK_B,
                        enable_fp_fusion=False)
    return out
