"""ROIAlign that reads channels-last half-precision features and writes a channels-last result, in Triton.

torchvision's kernel reads NCHW float32 under autocast: fed a channels-last fp16 FPN level, its autocast wrapper
copies the level to float32, the kernel makes it NCHW, and the NCHW float32 result is cast back and converted
to channels-last again by the first convolution of the box or mask head. On one H200 (Cascade R-CNN, batch 32,
2000 ROIs per image, session 24) those copies took 20% of the GPU time and the kernel itself, whose threads
each read one channel of a sample point far from their neighbours', another 13%. Here one program pools one
output bin of one ROI for all channels at once: every sample point's four corners are four contiguous rows of
C values. The arithmetic is torchvision's (``aligned``, adaptive or fixed sampling, its border rules), in
float32.

Inference only (no backward). :func:`nhwc_roi_align_usable` says when it applies. ``TRITON_INTERPRET=1``, set
before Triton is first imported, runs it on the CPU (the tests).
"""

from __future__ import annotations

import functools

import torch

from .triton_support import HALF_DTYPES, is_power_of_two, triton_runs_on

__all__ = ["nhwc_roi_align", "nhwc_roi_align_usable"]

MAX_CHANNELS = 1024  # one program holds a sample point's C values per corner in registers


def nhwc_roi_align_usable(features: torch.Tensor) -> bool:
    """A 4-D channels-last half-precision tensor (CUDA, or any device under ``TRITON_INTERPRET=1``) whose
    channels are a power of two up to ``MAX_CHANNELS``."""
    if features.dim() != 4 or features.dtype not in HALF_DTYPES or not triton_runs_on(features):
        return False
    c = features.shape[1]
    if not is_power_of_two(c) or c > MAX_CHANNELS or c == 1:  # C == 1: channels-last is also NCHW
        return False
    return features.is_contiguous(memory_format=torch.channels_last) and _kernel() is not None


@functools.lru_cache(maxsize=1)
def _kernel():
    """The Triton kernel, made on first use (None without Triton)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def roi_align_nhwc(x_ptr, rois_ptr, out_ptr, height, width, spatial_scale, C: tl.constexpr, PH: tl.constexpr,
                       PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr):
        # one program per (ROI, output bin): torchvision's roi_align_forward_kernel_impl for all C channels
        r = tl.program_id(0).to(tl.int64)
        ph = tl.program_id(1) // PW
        pw = tl.program_id(1) % PW
        n = tl.load(rois_ptr + r * 5).to(tl.int64)
        offset = 0.5 if ALIGNED else 0.0
        start_w = tl.load(rois_ptr + r * 5 + 1) * spatial_scale - offset
        start_h = tl.load(rois_ptr + r * 5 + 2) * spatial_scale - offset
        roi_w = tl.load(rois_ptr + r * 5 + 3) * spatial_scale - offset - start_w
        roi_h = tl.load(rois_ptr + r * 5 + 4) * spatial_scale - offset - start_h
        if not ALIGNED:
            roi_w = tl.maximum(roi_w, 1.0)
            roi_h = tl.maximum(roi_h, 1.0)
        bin_h = roi_h / PH
        bin_w = roi_w / PW
        if SAMPLING > 0:
            grid_h = tl.full((), SAMPLING, tl.int32)
            grid_w = tl.full((), SAMPLING, tl.int32)
        else:
            grid_h = tl.ceil(roi_h / PH).to(tl.int32)
            grid_w = tl.ceil(roi_w / PW).to(tl.int32)
        count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
        cols = tl.arange(0, C)
        image = x_ptr + n * height * width * C
        acc = tl.zeros((C,), tl.float32)
        for iy in range(0, grid_h):
            y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
            for ix in range(0, grid_w):
                x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
                yc = tl.maximum(y, 0.0)
                xc = tl.maximum(x, 0.0)
                y_low = yc.to(tl.int32)
                x_low = xc.to(tl.int32)
                y_edge = y_low >= height - 1
                x_edge = x_low >= width - 1
                y_low = tl.where(y_edge, height - 1, y_low)
                x_low = tl.where(x_edge, width - 1, x_low)
                y_high = tl.where(y_edge, y_low, y_low + 1)
                x_high = tl.where(x_edge, x_low, x_low + 1)
                ly = tl.where(y_edge, 0.0, yc - y_low)
                lx = tl.where(x_edge, 0.0, xc - x_low)
                hy = 1.0 - ly
                hx = 1.0 - lx
                keep = tl.where(inside, 1.0, 0.0)
                v1 = tl.load(image + (y_low * width + x_low).to(tl.int64) * C + cols).to(tl.float32)
                v2 = tl.load(image + (y_low * width + x_high).to(tl.int64) * C + cols).to(tl.float32)
                v3 = tl.load(image + (y_high * width + x_low).to(tl.int64) * C + cols).to(tl.float32)
                v4 = tl.load(image + (y_high * width + x_high).to(tl.int64) * C + cols).to(tl.float32)
                acc += keep * (hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4)
        out = out_ptr + ((r * PH + ph) * PW + pw) * C + cols
        tl.store(out, (acc / count).to(out_ptr.dtype.element_ty))

    return roi_align_nhwc


def nhwc_roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int | tuple[int, int],
                   spatial_scale: float, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """``torchvision.ops.roi_align`` (computed in float32, as under autocast) for features that
    :func:`nhwc_roi_align_usable` accepts; ``rois`` (K, 5) float32. The result is channels-last in the features'
    dtype."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    n, c, h, w = features.shape
    rois = rois.float().contiguous()
    out = torch.empty((len(rois), c, ph, pw), dtype=features.dtype, device=features.device,
                      memory_format=torch.channels_last)
    if len(rois):
        _kernel()[(len(rois), ph * pw)](features, rois, out, h, w, float(spatial_scale), C=c, PH=ph, PW=pw,
                                        SAMPLING=max(0, int(sampling_ratio)), ALIGNED=bool(aligned),
                                        num_warps=max(1, min(4, c // 256)))
    return out
