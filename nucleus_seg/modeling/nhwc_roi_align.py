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

__all__ = ["MAX_LEVELS", "nhwc_roi_align", "nhwc_roi_align_levels", "nhwc_roi_align_usable"]

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


MAX_LEVELS = 4  # FPN levels one call of the pooling kernel chooses between (detectron2's poolers use p2-p5)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The Triton kernels (one level; up to ``MAX_LEVELS`` levels), imported on first use (None without Triton)."""
    try:
        from ._roi_align_kernels import roi_align_nhwc, roi_align_nhwc_levels
    except ImportError:
        return None
    return roi_align_nhwc, roi_align_nhwc_levels


def _kernel():
    found = _kernels()
    return None if found is None else found[0]


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


def nhwc_roi_align_levels(levels: list[torch.Tensor], rois: torch.Tensor, level_of_roi: torch.Tensor,
                          output_size: int | tuple[int, int], spatial_scales: list[float], sampling_ratio: int,
                          aligned: bool) -> torch.Tensor:
    """Each ROI pooled from its FPN level (``level_of_roi``, indices into ``levels``, up to ``MAX_LEVELS``) in one
    kernel: what detectron2's ``ROIPooler`` computes with one ``roi_align`` per level, without its per-level
    ``nonzero`` (a host sync each) and without scattering each level's result into the output (a copy of all
    pooled features). Every level must pass :func:`nhwc_roi_align_usable`, with one dtype and channel count."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if not 1 <= len(levels) <= MAX_LEVELS:
        raise ValueError(f"nhwc_roi_align_levels takes 1 to {MAX_LEVELS} levels, got {len(levels)}")
    c = levels[0].shape[1]
    rois = rois.float().contiguous()
    out = torch.empty((len(rois), c, ph, pw), dtype=levels[0].dtype, device=levels[0].device,
                      memory_format=torch.channels_last)
    if len(rois):
        padded = list(levels) + [levels[-1]] * (MAX_LEVELS - len(levels))  # never chosen: the levels are clamped
        scales = [float(s) for s in spatial_scales] + [float(spatial_scales[-1])] * (MAX_LEVELS - len(levels))
        _kernels()[1][(len(rois), ph * pw)](
            *padded, *(f.shape[2] for f in padded), *(f.shape[3] for f in padded), *scales,
            level_of_roi.to(torch.int32).contiguous(), rois, out, C=c, PH=ph, PW=pw,
            SAMPLING=max(0, int(sampling_ratio)), ALIGNED=bool(aligned), num_warps=max(1, min(4, c // 256)))
    return out
