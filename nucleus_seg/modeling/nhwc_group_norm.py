"""GroupNorm on channels-last (NHWC) half-precision CUDA tensors, in Triton.

PyTorch's GroupNorm kernel reads NCHW: fed a channels-last tensor it makes a contiguous copy and hands back an
NCHW result, so a channels-last model pays a layout conversion at every GroupNorm layer, and an NCHW model
pays cuDNN's conversions around every half-precision convolution instead (15% of an H200's inference time at
batch 32, GroupNorm itself another 20%). Here each pixel's channels are read as one contiguous row, the
statistics of every group come from per-block sums of the values shifted by the group's first value (fp32,
added in a fixed order, so every run gives the same result), and the output keeps the input's layout.

Inference only (no backward). :func:`nhwc_group_norm_usable` says when it applies; elsewhere PyTorch's own
GroupNorm runs. ``TRITON_INTERPRET=1``, set before Triton is first imported, runs the kernels on the CPU
(the tests).
"""

from __future__ import annotations

import functools

import torch

from .triton_support import HALF_DTYPES, is_power_of_two, triton_runs_on

__all__ = ["nhwc_group_norm", "nhwc_group_norm_usable"]

TILE_ELEMENTS = 8192  # elements per program (rows of C channels): registers, not shared memory, hold a tile
# the statistics kernel: elements per step (it keeps two fp32 accumulators of this size) and programs to aim for
# over the batch. benchmarks/group_norm_kernels.py on one H200 (session 24), an R101-FPN GN model's GroupNorm layers
# at batch 32 (512 px, 2000 box-head and 400 mask-head ROIs per image): 27.9 ms at 2048/1024, 32.2 at 4096/1024,
# 34.2 at 4096/4096, 55.0 with one tile per program (session 23's kernel); PyTorch's NCHW GroupNorm 52.7
STATS_TILE_ELEMENTS = 2048
STATS_PROGRAMS = 1024
# statistics parts per image up to which each normalisation program adds them up itself (the same arithmetic as
# the combine kernel, so the same result): one launch less per layer, whose host cost idled the GPU (session 24's
# Cascade profile charged 80 ms per 64 images to these launches); past it the combine kernel runs once per image
FOLD_PARTS = 16


def nhwc_group_norm_usable(x: torch.Tensor, num_groups: int) -> bool:
    """A 4-D channels-last half-precision tensor (CUDA, or any device under ``TRITON_INTERPRET=1``) whose
    channels and groups are powers of two (Triton's block shapes), at most ``TILE_ELEMENTS`` channels."""
    if x.dim() != 4 or x.dtype not in HALF_DTYPES or x.numel() == 0 or not triton_runs_on(x):
        return False
    c = x.shape[1]
    if not (is_power_of_two(c) and is_power_of_two(num_groups) and c % num_groups == 0 and c <= TILE_ELEMENTS):
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
    def partial_stats(x_ptr, s1_ptr, s2_ptr, hw, parts, iters, C: tl.constexpr, G: tl.constexpr,
                      BLOCK_HW: tl.constexpr):
        # one program per (image, part of ``iters`` blocks of BLOCK_HW pixels): each group's sum and sum of
        # squares of x - pivot, the pivot being the group's first value in the image (shifted data: no
        # cancellation when the mean is far from zero). The tiles are added element-wise in registers and
        # reduced across threads once at the end: reducing every tile across warps made this kernel 4.7x
        # slower than the normalisation over the same data (one H200, session 23)
        n = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        cols = tl.arange(0, C)
        g = tl.arange(0, G)
        pivot = tl.load(x_ptr + n * hw * C + g * (C // G)).to(tl.float32)
        pivot_c = tl.reshape(tl.broadcast_to(pivot[:, None], (G, C // G)), (C,))
        acc1 = tl.zeros((BLOCK_HW, C), tl.float32)
        acc2 = tl.zeros((BLOCK_HW, C), tl.float32)
        for i in range(iters):
            rows = (p * iters + i) * BLOCK_HW + tl.arange(0, BLOCK_HW)
            inside = (rows < hw)[:, None]
            x = tl.load(x_ptr + n * hw * C + rows[:, None] * C + cols[None, :], mask=inside, other=0.0)
            d = tl.where(inside, x.to(tl.float32) - pivot_c[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        s1 = tl.sum(tl.reshape(tl.sum(acc1, axis=0), (G, C // G)), axis=1)
        s2 = tl.sum(tl.reshape(tl.sum(acc2, axis=0), (G, C // G)), axis=1)
        out = (n * parts + p) * G + g
        tl.store(s1_ptr + out, s1)
        tl.store(s2_ptr + out, s2)

    @triton.jit
    def group_stats(x_ptr, s1_ptr, s2_ptr, n, hw, parts, eps, C: tl.constexpr, G: tl.constexpr,
                    CHUNK: tl.constexpr):
        # image n's groups: the parts' sums added in a fixed order (the same result every run and in every
        # program), then mean = pivot + S1 / count and variance = S2 / count - (S1 / count)^2
        g = tl.arange(0, G)
        s1 = tl.zeros((G,), tl.float32)
        s2 = tl.zeros((G,), tl.float32)
        for start in range(0, parts, CHUNK):
            b = start + tl.arange(0, CHUNK)
            valid = (b < parts)[:, None]
            offs = (n * parts + b[:, None]) * G + g[None, :]
            s1 += tl.sum(tl.load(s1_ptr + offs, mask=valid, other=0.0), axis=0)
            s2 += tl.sum(tl.load(s2_ptr + offs, mask=valid, other=0.0), axis=0)
        count = (hw * (C // G)).to(tl.float32)
        shift = s1 / count
        pivot = tl.load(x_ptr + n * hw * C + g * (C // G)).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / count - shift * shift, 0.0) + eps)
        return pivot + shift, rstd

    # Triton looks a kernel's callees up among its module's globals, not in this function's closure
    globals()["group_stats"] = group_stats

    @triton.jit
    def combine(x_ptr, s1_ptr, s2_ptr, stats_ptr, hw, parts, eps, C: tl.constexpr, G: tl.constexpr,
                CHUNK: tl.constexpr):
        # one program per image: its groups' mean and rstd, for the normalisation kernel to read
        n = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, G)
        mean, rstd = group_stats(x_ptr, s1_ptr, s2_ptr, n, hw, parts, eps, C, G, CHUNK)
        tl.store(stats_ptr + n * 2 * G + g, mean)
        tl.store(stats_ptr + n * 2 * G + G + g, rstd)

    @triton.jit
    def apply(x_ptr, y_ptr, stats_ptr, s1_ptr, s2_ptr, w_ptr, b_ptr, hw, parts, eps, C: tl.constexpr,
              G: tl.constexpr, BLOCK_HW: tl.constexpr, RELU: tl.constexpr, FOLDED: tl.constexpr,
              CHUNK: tl.constexpr):
        # one program per (image, block of pixels): y = (x - mean) * rstd * w + b, in fp32, stored in y's dtype;
        # FOLDED: the group statistics added up here from the parts' sums, else read from the combine kernel's
        n = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        cols = tl.arange(0, C)
        g = tl.arange(0, G)
        if FOLDED:
            mean_g, rstd_g = group_stats(x_ptr, s1_ptr, s2_ptr, n, hw, parts, eps, C, G, CHUNK)
        else:
            mean_g = tl.load(stats_ptr + n * 2 * G + g)
            rstd_g = tl.load(stats_ptr + n * 2 * G + G + g)
        mean = tl.reshape(tl.broadcast_to(mean_g[:, None], (G, C // G)), (C,))
        rstd = tl.reshape(tl.broadcast_to(rstd_g[:, None], (G, C // G)), (C,))
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
    # statistics: a tile of STATS_TILE_ELEMENTS per step, steps split so that about STATS_PROGRAMS programs run
    stats_block = _rows_per_tile(STATS_TILE_ELEMENTS, c, hw)
    steps = -(-hw // stats_block)
    iters = -(-steps // max(1, min(steps, -(-STATS_PROGRAMS // n))))
    parts = -(-steps // iters)
    sums = torch.empty((2, n, parts, num_groups), dtype=torch.float32, device=x.device)
    partial_stats[(n, parts)](x, sums[0], sums[1], hw, parts, iters, C=c, G=num_groups, BLOCK_HW=stats_block,
                              num_warps=_warps(stats_block * c))
    chunk = min(64, 1 << (parts - 1).bit_length())
    folded = parts <= FOLD_PARTS
    stats = sums  # not read when folded
    if not folded:
        stats = torch.empty((n, 2, num_groups), dtype=torch.float32, device=x.device)
        combine[(n,)](x, sums[0], sums[1], stats, hw, parts, eps, C=c, G=num_groups, CHUNK=chunk, num_warps=4)
    block_hw = _rows_per_tile(TILE_ELEMENTS, c, hw)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    apply[(n, -(-hw // block_hw))](x, y, stats, sums[0], sums[1], weight, bias, hw, parts, eps, C=c, G=num_groups,
                                   BLOCK_HW=block_hw, RELU=relu, FOLDED=folded, CHUNK=chunk,
                                   num_warps=_warps(block_hw * c))
    return y


def _rows_per_tile(elements: int, c: int, hw: int) -> int:
    """Pixels per tile: ``elements // c``, no more than the image's pixels (rounded up to a power of two)."""
    return max(1, min(elements // c, 1 << (hw - 1).bit_length()))


def _warps(tile: int) -> int:
    return 8 if tile >= 4096 else 4
