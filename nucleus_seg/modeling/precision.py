"""Mixed precision shared by training and inference: which autocast dtype, and GroupNorm kept in it."""

from __future__ import annotations

import logging
import types

import torch
from detectron2.config import CfgNode
from detectron2.layers import Conv2d
from torch.nn import functional as F

from .nhwc_group_norm import nhwc_group_norm, nhwc_group_norm_usable
from .triton_support import HALF_DTYPES

__all__ = ["AMP_DTYPES", "HALF_DTYPES", "cpu_has_native_bfloat16", "fuse_group_norm_relu", "inference_amp_dtype",
           "training_amp_dtype", "training_precision", "use_half_group_norm"]

logger = logging.getLogger(__name__)


def _group_norm_kernel_applies(x: torch.Tensor, num_groups: int) -> bool:
    """Whether a GroupNorm of ``x`` goes through the Triton kernel: half-precision inference under autocast
    (no gradients), channels-last (:func:`~.nhwc_group_norm.nhwc_group_norm_usable`)."""
    return (x.dtype in HALF_DTYPES and torch.is_autocast_enabled(x.device.type) and not torch.is_grad_enabled()
            and nhwc_group_norm_usable(x, num_groups))


def _half_group_norm(self, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm in the input's half precision under autocast (statistics still accumulate in fp32).

    Autocast runs GroupNorm in fp32, so every GN layer paid a cast of its input up and of its output
    back down; with ~120 GN layers that was as costly as the convolutions. In inference a channels-last
    input goes through :func:`~.nhwc_group_norm.nhwc_group_norm` and stays channels-last.
    """
    if _group_norm_kernel_applies(x, self.num_groups):
        return nhwc_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    if x.dtype in HALF_DTYPES and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
    return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def use_half_group_norm(model: torch.nn.Module) -> None:
    """Run this model's GroupNorm layers in the autocast precision (see ``_half_group_norm``)."""
    for module in model.modules():
        if type(module) is torch.nn.GroupNorm and module.affine:
            module.forward = types.MethodType(_half_group_norm, module)


def _conv_group_norm_relu(self, x: torch.Tensor) -> torch.Tensor:
    """detectron2 ``Conv2d`` (convolution, GroupNorm, ReLU) with the ReLU inside the GroupNorm kernel where the
    kernel runs (channels-last half-precision inference), else the module's own forward.

    The box and mask heads' separate ReLUs each read and wrote the whole activation again: 6% of the GPU time
    of a Cascade R-CNN batch (64 images, 400 detections; H200 profile of 2026-12-05).
    """
    if self.training:
        return type(self).forward(self, x)
    x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    norm = self.norm
    if _group_norm_kernel_applies(x, norm.num_groups):
        return nhwc_group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, relu=True)
    return self.activation(norm(x))


def fuse_group_norm_relu(model: torch.nn.Module) -> None:
    """Give each detectron2 ``Conv2d`` whose GroupNorm is followed by a ReLU (the box and mask heads') the fused path of
    :func:`_conv_group_norm_relu` (inference only; training runs the module's own forward)."""
    for module in model.modules():
        if not (isinstance(module, Conv2d) and type(module.norm) is torch.nn.GroupNorm and module.norm.affine):
            continue
        if type(module.activation) is torch.nn.ReLU or module.activation in (F.relu, torch.relu):
            module.forward = types.MethodType(_conv_group_norm_relu, module)


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
