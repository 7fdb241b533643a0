"""GroupNorm on channels-last (NHWC) half-precision CUDA tensors, in Triton.

PyTorch's GroupNorm kernel reads NCHW: fed a channels-last tensor it makes a contiguous copy and hands back an
NCHW result, so a channels-last model pays a layout conversion at every GroupNorm layer, and an NCHW model
pays cuDNN's conversions around every half-precision convolution instead (15% of an H200's inference time at
batch 32, GroupNorm itself another 20%). Here each pixel's channels are read as one contiguous row, the
statistics of every group come from per-block partial means and squared deviations combined exactly (Chan's
parallel formula, fp32), and the output keeps the input's layout.

Inference only (no backward). :func:`nhwc_group_norm_usable` says when it applies; elsewhere PyTorch's own
GroupNorm runs. ``TRITON_INTERPRET=1``, set before Triton is first imported, runs the kernels on the CPU
(the tests).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["nhwc_group_norm", "nhwc_group_norm_usable"]

TILE_ELEMENTS = 8192  # elements per program (rows of C channels): registers, not shared memory, hold a tile


def _power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def nhwc_group_norm_usable(x: torch.Tensor, num_groups: int) -> bool:
    """A 4-D channels-last half-precision tensor (CUDA, or any device under ``TRITON_INTERPRET=1``) whose
    channels and groups are powers of two (Triton's block shapes), at most ``TILE_ELEMENTS`` channels."""
    if x.dim() != 4 or x.dtype not in (torch.float16, torch.bfloat16) or x.numel() == 0:
        return False
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    c = x.shape[1]
    if not (_power_of_two(c) and _power_of_two(num_groups) and c % num_groups == 0 and c <= TILE_ELEMENTS):
        return False
    return x.is_contiguous(memory_format=torch.channels_last) and _kernels() is not None


@functools.lru_cache(maxsize=1)
def _kernels():
    """The Triton kernels, made on first use (None without Triton): importing Triton costs a CPU-only run
    nothing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def partial_stats(x_ptr, mean_ptr, m2_ptr, hw, blocks, C: tl.constexpr, G: tl.constexpr,
                      BLOCK_HW: tl.constexpr):
        # one program per (image, block of BLOCK_HW pixels): each group's mean and sum of squared deviations
        n = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        rows = b * BLOCK_HW + tl.arange(0, BLOCK_HW)
        cols = tl.arange(0, C)
        inside = (rows < hw)[:, None]
        x = tl.load(x_ptr + n * hw * C + rows[:, None] * C + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        count = (tl.minimum(hw - b * BLOCK_HW, BLOCK_HW) * (C // G)).to(tl.float32)
        mean = tl.sum(tl.reshape(tl.sum(x, axis=0), (G, C // G)), axis=1) / count
        mean_c = tl.reshape(tl.broadcast_to(mean[:, None], (G, C // G)), (C,))
        d = tl.where(inside, x - mean_c[None, :], 0.0)
        m2 = tl.sum(tl.reshape(tl.sum(d * d, axis=0), (G, C // G)), axis=1)
        out = (n * blocks + b) * G + tl.arange(0, G)
        tl.store(mean_ptr + out, mean)
        tl.store(m2_ptr + out, m2)

    @triton.jit
    def combine(mean_ptr, m2_ptr, stats_ptr, hw, blocks, eps, C: tl.constexpr, G: tl.constexpr,
                BLOCK_HW: tl.constexpr, CHUNK: tl.constexpr):
        # one program per image: the blocks' partials combined exactly (all blocks hold BLOCK_HW pixels but
        # the last): mean = sum(c_b m_b) / sum(c_b), M2 = sum(M2_b) + sum(c_b (m_b - mean)^2)
        n = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, G)
        total = tl.zeros((G,), tl.float32)
        for start in range(0, blocks, CHUNK):
            b = start + tl.arange(0, CHUNK)
            valid = (b < blocks)[:, None]
            c = (tl.minimum(hw - b * BLOCK_HW, BLOCK_HW) * (C // G)).to(tl.float32)[:, None]
            m = tl.load(mean_ptr + (n * blocks + b[:, None]) * G + g[None, :], mask=valid, other=0.0)
            total += tl.sum(tl.where(valid, c * m, 0.0), axis=0)
        mean = total / (hw * (C // G)).to(tl.float32)
        m2 = tl.zeros((G,), tl.float32)
        for start in range(0, blocks, CHUNK):
            b = start + tl.arange(0, CHUNK)
            valid = (b < blocks)[:, None]
            c = (tl.minimum(hw - b * BLOCK_HW, BLOCK_HW) * (C // G)).to(tl.float32)[:, None]
            offs = (n * blocks + b[:, None]) * G + g[None, :]
            m = tl.load(mean_ptr + offs, mask=valid, other=0.0)
            part = tl.load(m2_ptr + offs, mask=valid, other=0.0)
            dm = m - mean[None, :]
            m2 += tl.sum(tl.where(valid, part + c * dm * dm, 0.0), axis=0)
        rstd = 1.0 / tl.sqrt(m2 / (hw * (C // G)).to(tl.float32) + eps)
        tl.store(stats_ptr + n * 2 * G + g, mean)
        tl.store(stats_ptr + n * 2 * G + G + g, rstd)

    @triton.jit
    def apply(x_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, hw, C: tl.constexpr, G: tl.constexpr, BLOCK_HW: tl.constexpr,
              RELU: tl.constexpr):
        # one program per (image, block of pixels): y = (x - mean) * rstd * w + b, in fp32, stored in y's dtype
        n = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        cols = tl.arange(0, C)
        g = tl.arange(0, G)
        mean = tl.reshape(tl.broadcast_to(tl.load(stats_ptr + n * 2 * G + g)[:, None], (G, C // G)), (C,))
        rstd = tl.reshape(tl.broadcast_to(tl.load(stats_ptr + n * 2 * G + G + g)[:, None], (G, C // G)), (C,))
        scale = rstd * tl.load(w_ptr + cols).to(tl.float32)
        shift = tl.load(b_ptr + cols).to(tl.float32) - mean * scale
        inside = (rows < hw)[:, None]
        offs = n * hw * C + rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)

    return partial_stats, combine, apply


def nhwc_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    relu: bool = False) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` (then ReLU when ``relu``) for a tensor that
    :func:`nhwc_group_norm_usable` accepts; the output is channels-last in ``x``'s dtype."""
    partial_stats, combine, apply = _kernels()
    n, c, h, w = x.shape
    hw = h * w
    block_hw = max(1, min(TILE_ELEMENTS // c, 1 << (hw - 1).bit_length()))
    blocks = -(-hw // block_hw)
    means = torch.empty((n, blocks, num_groups), dtype=torch.float32, device=x.device)
    m2s = torch.empty_like(means)
    stats = torch.empty((n, 2, num_groups), dtype=torch.float32, device=x.device)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    warps = 8 if block_hw * c >= 4096 else 4
    partial_stats[(n, blocks)](x, means, m2s, hw, blocks, C=c, G=num_groups, BLOCK_HW=block_hw, num_warps=warps)
    combine[(n,)](means, m2s, stats, hw, blocks, eps, C=c, G=num_groups, BLOCK_HW=block_hw,
                  CHUNK=min(64, 1 << (blocks - 1).bit_length()), num_warps=4)
    apply[(n, blocks)](x, y, stats, weight, bias, hw, C=c, G=num_groups, BLOCK_HW=block_hw, RELU=relu,
                       num_warps=warps)
    return y
