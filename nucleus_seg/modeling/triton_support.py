"""What the Triton inference kernels (``nhwc_group_norm``, ``nhwc_roi_align``, ``nms_bits``) share: the
half-precision dtypes they take and where they can run. Its own module because ``precision`` imports the kernels."""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

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
    """Whether Triton's kernels run on CUDA device ``device_index`` (-1: the current one): a GPU it compiles for,
    where a one-line kernel compiles and runs (Triton also needs a C compiler and CUDA's tools at run time, which a
    slim container may lack; its error used to end the prediction). Asked once per device and process."""
    device = torch.cuda.current_device() if device_index < 0 else device_index
    if tuple(torch.cuda.get_device_capability(device)) < TRITON_MIN_CAPABILITY:
        return False
    try:
        works = _run_probe(torch.device("cuda", device))
    except ImportError:  # no Triton (a Windows build of PyTorch): the kernels were never on offer
        return False
    except Exception as exc:  # noqa: BLE001 - any failure to build or run a kernel: PyTorch's ops instead
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        logger.warning("Triton cannot run its kernels on cuda:%d (%s: %s): PyTorch's own ops run instead, with the "
                       "same results, more slowly", device, type(exc).__name__, reason)
        return False
    if not works:
        logger.warning("Triton's test kernel gave a wrong result on cuda:%d: PyTorch's own ops run instead", device)
    return works


def _run_probe(device: torch.device) -> bool:
    """Compile and run :func:`._probe_kernel.add_one` on ``device``; whether it added one."""
    from ._probe_kernel import add_one

    x = torch.zeros(1, device=device)
    add_one[(1,)](x)
    return float(x.item()) == 1.0


def is_power_of_two(v: int) -> bool:
    """Triton's block shapes are powers of two."""
    return v > 0 and v & (v - 1) == 0
