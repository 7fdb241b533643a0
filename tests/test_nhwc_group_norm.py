"""nhwc_group_norm: PyTorch's GroupNorm on channels-last half tensors, in Triton.

The kernels run in Triton's CPU interpreter, which must be switched on before Triton is first imported: each
check runs in a fresh Python process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")


def run_interpreted(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_equals_group_norm_in_every_group_and_keeps_channels_last():
    """Shapes whose pixels do not fill the last block; values far from zero (a naive E[x^2] - E[x]^2 would lose
    the variance); per-channel weight and bias; ReLU fused or not; the statistics in one tile per program or in
    several tiles per program (a short last part included)."""
    run_interpreted("""
        import torch
        from torch.nn import functional as F
        import nucleus_seg.modeling.nhwc_group_norm as gn
        from nucleus_seg.modeling.nhwc_group_norm import nhwc_group_norm, nhwc_group_norm_usable
        torch.manual_seed(0)
        cases = [((3, 64, 5, 7), 32, 1024), ((2, 256, 7, 7), 32, 1024), ((1, 2048, 3, 2), 32, 1),
                 ((2, 128, 33, 17), 8, 1024), ((2, 128, 33, 17), 8, 7), ((2, 128, 33, 17), 8, 1)]
        for shape, groups, programs in cases:
            gn.STATS_PROGRAMS = programs  # 7 over 2 images: 4 parts of 5 tiles, the last part of 3 (18 tiles)
            c = shape[1]
            x = (torch.randn(shape) * 3 + 40).half().to(memory_format=torch.channels_last)
            weight, bias = torch.randn(c), torch.randn(c)
            assert nhwc_group_norm_usable(x, groups)
            expected = F.group_norm(x.float(), groups, weight, bias, 1e-5)
            for relu in (False, True):
                y = nhwc_group_norm(x, groups, weight, bias, 1e-5, relu=relu)
                assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
                want = expected.relu() if relu else expected
                err = float((y.float() - want).abs().max())
                assert torch.allclose(y.float(), want, atol=8e-3, rtol=4e-3), (shape, programs, relu, err)
    """)


def test_statistics_added_up_in_the_normalisation_kernel_are_the_combine_kernels():
    """FOLD_PARTS: the normalisation kernel adding the parts' sums itself (one launch less) gives, bit for bit,
    what the combine kernel gives (36 parts here)."""
    run_interpreted("""
        import torch
        import nucleus_seg.modeling.nhwc_group_norm as gn
        torch.manual_seed(1)
        x = (torch.randn(2, 128, 33, 17) * 3 + 40).half().to(memory_format=torch.channels_last)
        weight, bias = torch.randn(128), torch.randn(128)
        outputs = []
        for fold in (0, 64):
            gn.FOLD_PARTS = fold
            outputs.append(gn.nhwc_group_norm(x, 8, weight, bias, 1e-5, relu=True))
        assert torch.equal(outputs[0], outputs[1]) and outputs[0].abs().sum() > 0
    """)


def test_only_channels_last_half_tensors_with_power_of_two_groups_take_it():
    run_interpreted("""
        import torch
        from nucleus_seg.modeling.nhwc_group_norm import nhwc_group_norm_usable
        x = torch.randn(2, 64, 4, 4).half()
        assert not nhwc_group_norm_usable(x, 32)  # NCHW
        cl = x.to(memory_format=torch.channels_last)
        assert nhwc_group_norm_usable(cl, 32)
        assert not nhwc_group_norm_usable(cl.float(), 32)
        assert not nhwc_group_norm_usable(cl, 24)
        assert not nhwc_group_norm_usable(torch.randn(2, 96, 4, 4).half().to(memory_format=torch.channels_last), 32)
    """)


def test_not_used_without_a_gpu_or_the_interpreter(monkeypatch):
    from nucleus_seg.modeling.nhwc_group_norm import nhwc_group_norm_usable

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not nhwc_group_norm_usable(torch.randn(2, 64, 4, 4).half().to(memory_format=torch.channels_last), 32)


def test_a_channels_last_model_keeps_its_layout_through_group_norm_in_inference():
    """The model-level switch: GroupNorm layers under half-precision autocast, no gradient, channels-last input
    take the Triton kernels and give PyTorch's result; with gradients on, PyTorch's GroupNorm runs."""
    run_interpreted("""
        import torch
        from torch.nn import functional as F
        import nucleus_seg.modeling.precision as precision
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(8, 64, 3, padding=1), torch.nn.GroupNorm(32, 64)).eval()
        with torch.no_grad():
            model[1].weight.normal_()
            model[1].bias.normal_()
            x = torch.randn(2, 8, 6, 6)
            expected = F.group_norm(model[0](x), 32, model[1].weight, model[1].bias, model[1].eps)
        model.to(memory_format=torch.channels_last)
        precision.use_half_group_norm(model)
        calls, kernel = [], precision.nhwc_group_norm
        precision.nhwc_group_norm = lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k)
        xcl = x.half().to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            y = model(xcl)
        with torch.autocast("cpu", dtype=torch.float16):
            model(xcl)
        assert calls == [torch.Size([2, 64, 6, 6])], calls  # once: the pass with gradients ran PyTorch's
        assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
        err = float((y.float() - expected).abs().max())
        assert torch.allclose(y.float(), expected, atol=3e-2), err
    """)


def test_a_compiled_backbone_gets_pytorch_group_norm_not_the_kernel():
    """NUCLEUS.PREDICT.COMPILE: inductor fuses GroupNorm itself, and dynamo cannot trace these kernels (on the H200,
    torch 2.11: "NameError: group_stats is not defined", the run crashed). Inside a compiled region the GN layer is
    PyTorch's; outside it, the kernel."""
    run_interpreted("""
        import torch
        from torch.nn import functional as F
        from nucleus_seg.modeling.nhwc_group_norm import nhwc_group_norm_usable
        from nucleus_seg.modeling.precision import use_half_group_norm
        torch.manual_seed(0)
        norm = torch.nn.GroupNorm(8, 64)
        use_half_group_norm(norm)
        x = torch.randn(2, 64, 6, 5).to(torch.bfloat16).to(memory_format=torch.channels_last)
        assert nhwc_group_norm_usable(x, 8)
        compiled = torch.compile(norm, backend="eager", fullgraph=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got, eager = compiled(x), norm(x)
        want = F.group_norm(x, 8, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)
        assert torch.equal(got, want), (got - want).abs().max()
        assert eager.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(eager.float(), want.float(), atol=0.05, rtol=0.02)
    """)


def test_the_heads_relu_runs_inside_the_group_norm_kernel():
    """fuse_group_norm_relu: a Conv2d with GroupNorm and ReLU (the box and mask heads') gives the same values with
    the ReLU inside the kernel; one without a ReLU (FPN, ResNet) keeps its forward; training is untouched."""
    run_interpreted("""
        import torch
        from detectron2.layers import Conv2d
        from torch import nn
        import nucleus_seg.modeling.precision as precision
        from nucleus_seg.modeling.precision import fuse_group_norm_relu, use_half_group_norm

        def head():
            torch.manual_seed(0)
            m = nn.Sequential(Conv2d(32, 64, 3, padding=1, bias=False, norm=nn.GroupNorm(8, 64), activation=nn.ReLU()),
                              Conv2d(64, 64, 3, padding=1, bias=False, norm=nn.GroupNorm(8, 64)))
            for p in m.parameters():
                p.data.normal_()
            use_half_group_norm(m)
            return m.eval()

        plain, fused = head(), head()
        fuse_group_norm_relu(fused)
        assert "forward" in vars(fused[0]) and "forward" not in vars(fused[1])
        relus = []
        kernel = precision.nhwc_group_norm
        precision.nhwc_group_norm = lambda *a, relu=False: relus.append(relu) or kernel(*a, relu=relu)
        x = torch.randn(2, 32, 9, 7).to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = plain(x), fused(x)
        assert relus == [False, False, True, False], relus
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()
        relus.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # gradients on: the module's own forward, no kernel
            assert torch.equal(fused(x), plain(x)) and relus == []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # nor in training mode
            assert torch.equal(fused.train()(x), plain.train()(x)) and True not in relus
    """)
