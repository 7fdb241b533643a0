"""The trainer's foreach gradient clipping gives detectron2's per-parameter "norm" clipping exactly."""

from __future__ import annotations

import copy

import torch
from detectron2.solver.build import _create_gradient_clipper
from fvcore.common.config import CfgNode

from nucleus_seg.engine.optim import clip_grad_norm_per_param_


def test_foreach_clipping_equals_detectron2_per_param_clipping():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 3, 3, 3), (64,), (10, 20), (1,), (5, 5)]]
    for p, scale in zip(params, [100.0, 0.01, 3.0, 50.0, 0.5]):
        p.grad = torch.randn_like(p) * scale  # some above the bound, some below
    params[1].grad = None  # a frozen parameter has no gradient
    reference = copy.deepcopy(params)
    for p, r in zip(params, reference):
        r.grad = None if p.grad is None else p.grad.clone()
    clipper = _create_gradient_clipper(CfgNode({"CLIP_TYPE": "norm", "CLIP_VALUE": 5.0, "NORM_TYPE": 2.0}))
    for r in reference:
        clipper(r)
    clip_grad_norm_per_param_(params, 5.0, 2.0)
    for p, r in zip(params, reference):
        if r.grad is None:
            assert p.grad is None
        else:
            assert torch.allclose(p.grad, r.grad, rtol=1e-6, atol=1e-7)
    assert max(p.grad.norm().item() for p in params if p.grad is not None) <= 5.0 + 1e-4
