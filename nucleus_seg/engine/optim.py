"""Gradient clipping as detectron2's CLIP_TYPE "norm" does it, in a few foreach kernels."""

from __future__ import annotations

import torch

__all__ = ["clip_grad_norm_per_param_", "with_fast_norm_clipping"]


def clip_grad_norm_per_param_(params: list[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> None:
    """detectron2's CLIP_TYPE "norm" (each parameter's gradient clipped to ``max_norm`` on its own, the
    same arithmetic as ``clip_grad_norm_`` per tensor) in a few foreach kernels instead of ~6 launches
    and a Python round trip per parameter: ~2,500 launches per step for R101-FPN."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads, norm_type))
    coefs = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))


def with_fast_norm_clipping(optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float):
    """Give ``optimizer`` a step that clips per parameter first, as detectron2's clipping wrapper does."""
    base = type(optimizer)

    def step(self, closure=None):
        clip_grad_norm_per_param_([p for g in self.param_groups for p in g["params"]], max_norm, norm_type)
        return base.step(self, closure)

    optimizer.__class__ = type(base.__name__ + "WithFastGradientClip", (base,), {"step": step})
    return optimizer
