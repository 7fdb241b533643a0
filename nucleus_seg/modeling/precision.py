"""Mixed precision shared by training and inference: which autocast dtype, and GroupNorm kept in it."""

from __future__ import annotations

import logging
import types

import torch
from detectron2.config import CfgNode
from torch.nn import functional as F

__all__ = ["AMP_DTYPES", "HALF_DTYPES", "cpu_has_native_bfloat16", "group_norm_channels_last", "inference_amp_dtype",
           "is_channels_last", "training_amp_dtype", "training_precision", "use_half_group_norm"]

logger = logging.getLogger(__name__)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-d tensor laid out NHWC (and not also NCHW, as a 1x1 or single-channel one is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def group_norm_channels_last(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """GroupNorm of a channels-last tensor, returned channels-last.

    PyTorch's GroupNorm kernels read NCHW: a channels-last input is copied to NCHW and the output comes back
    NCHW, so the next channels-last convolution converts it again. Here the statistics are two fp32 reductions
    of the NHWC data in place, and the normalisation is one multiply-add in x's dtype (per-channel scale and
    shift computed in fp32, then rounded to it).
    """
    n, c, h, w = x.shape
    grouped = x.permute(0, 2, 3, 1).reshape(n, h * w, num_groups, c // num_groups)  # a view: no copy
    count = h * w * (c // num_groups)
    mean = grouped.mean(dim=(1, 3), keepdim=True, dtype=torch.float32)
    square = torch.linalg.vector_norm(grouped, 2, dim=(1, 3), keepdim=True, dtype=torch.float32).square()
    rstd = torch.rsqrt((square / count - mean.square()).clamp(min=0) + eps)
    scale = rstd * weight.float().view(1, 1, num_groups, -1)
    shift = bias.float().view(1, 1, num_groups, -1) - mean * scale
    out = torch.addcmul(shift.to(x.dtype), grouped, scale.to(x.dtype))
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


def _half_group_norm(self, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm in the input's half precision under autocast (statistics still accumulate in fp32), and
    channels-last in, channels-last out (see ``group_norm_channels_last``).

    Autocast runs GroupNorm in fp32, so every GN layer paid a cast of its input up and of its output
    back down; with ~120 GN layers that was as costly as the convolutions.
    """
    norm = group_norm_channels_last if is_channels_last(x) else F.group_norm
    if x.dtype in HALF_DTYPES and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
    return norm(x, self.num_groups, self.weight, self.bias, self.eps)


def use_half_group_norm(model: torch.nn.Module) -> None:
    """Run this model's GroupNorm layers in the autocast precision (see ``_half_group_norm``)."""
    for module in model.modules():
        if type(module) is torch.nn.GroupNorm and module.affine:
            module.forward = types.MethodType(_half_group_norm, module)


def cpu_has_native_bfloat16() -> bool:
    """AMX or AVX512-BF16: there oneDNN runs bfloat16 convolutions ~2x faster than fp32 (R101-FPN, 512 px:
    2.4 s instead of 4.5 s per image on 2 cores); elsewhere bfloat16 is emulated and slower."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch
        return False


def inference_amp_dtype(device: torch.device) -> torch.dtype | None:
    """Inference autocast precision for NUCLEUS.PREDICT.AMP: float16 on CUDA, bfloat16 on CPUs that have
    it natively, None (fp32) elsewhere."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def training_amp_dtype(cfg: CfgNode) -> torch.dtype:
    """NUCLEUS.TRAIN.AMP_DTYPE, falling back to float16 on GPUs without bfloat16 (before Ampere)."""
    name = cfg.NUCLEUS.TRAIN.AMP_DTYPE
    if name not in AMP_DTYPES:
        raise ValueError(f"NUCLEUS.TRAIN.AMP_DTYPE must be one of {sorted(AMP_DTYPES)}, got {name!r}")
    if name == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        logger.info("NUCLEUS.TRAIN.AMP_DTYPE bfloat16 -> float16: this GPU has no bfloat16")
        return torch.float16
    return AMP_DTYPES[name]


def training_precision(cfg: CfgNode) -> str:
    """What a person reads about a (prepared) training config's precision, in a few words."""
    if not cfg.SOLVER.AMP.ENABLED:
        return "fp32"
    dtype = "bfloat16" if training_amp_dtype(cfg) == torch.bfloat16 else "float16"
    where = "AMX/AVX512-BF16 CPU" if cfg.MODEL.DEVICE == "cpu" else "GPU"
    return f"{dtype} autocast ({where})"
