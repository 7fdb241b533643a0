"""nhwc_roi_align: torchvision's ROIAlign on channels-last half tensors, in Triton, and the FPN pooler that keeps
its result channels-last. The kernel runs in Triton's CPU interpreter, switched on before Triton is first
imported: each check runs in a fresh Python process."""

from __future__ import annotations

import pytest
from test_nhwc_group_norm import run_interpreted

pytest.importorskip("triton")


def test_equals_torchvisions_roi_align_with_adaptive_and_fixed_sampling_and_boxes_past_the_edges():
    run_interpreted("""
        import torch
        from torchvision.ops import roi_align
        from nucleus_seg.modeling.nhwc_roi_align import nhwc_roi_align, nhwc_roi_align_usable
        torch.manual_seed(0)
        cases = [((2, 32, 20, 24), 7, 0, True), ((1, 16, 17, 9), (5, 3), 2, False)]
        for (n, c, h, w), size, sampling, aligned in cases:
            feats = (torch.randn(n, c, h, w) * 2 + 5).half().to(memory_format=torch.channels_last)
            xy = torch.rand(10, 2) * 60 - 8
            rois = torch.cat([torch.randint(0, n, (10, 1)).float(), xy, xy + torch.rand(10, 2) * 40], 1)
            rois[0, 1:] = torch.tensor([-20., -20., -5., -5.])  # outside: zeros
            rois[1, 1:] = torch.tensor([90., 70., 120., 100.])  # past the last row and column
            assert nhwc_roi_align_usable(feats) and not nhwc_roi_align_usable(feats.contiguous())
            got = nhwc_roi_align(feats, rois, size, 0.25, sampling, aligned)
            want = roi_align(feats.float(), rois, size, 0.25, sampling, aligned)
            assert got.dtype == torch.float16 and got.is_contiguous(memory_format=torch.channels_last)
            assert got.shape == want.shape and float(want[0].abs().max()) == 0.0
            err = float((got.float() - want).abs().max())
            assert torch.allclose(got.float(), want.half().float(), atol=1e-2, rtol=2e-3), err
        empty = nhwc_roi_align(feats, torch.zeros(0, 5), 7, 0.25, 0, True)
        assert empty.shape == (0, 16, 7, 7)
    """)


def test_an_fpn_pooler_of_channels_last_levels_pools_the_same_features_channels_last():
    """Four levels, boxes from 3 to 250 px (three levels get some): the installed pooler's result against detectron2's
    pooler on the same values in float32, and only at inference."""
    run_interpreted("""
        import torch
        from detectron2.modeling.poolers import ROIPooler
        from detectron2.structures import Boxes
        from nucleus_seg.modeling.roi_align import use_nucleus_roi_align
        torch.manual_seed(1)
        scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
        stock = ROIPooler((7, 7), scales, 0, "ROIAlignV2")
        mine = ROIPooler((7, 7), scales, 0, "ROIAlignV2")
        assert use_nucleus_roi_align(mine) == 4
        levels = [torch.randn(2, 32, 128 // 2 ** i, 128 // 2 ** i) for i in range(4)]
        half = [f.bfloat16().to(memory_format=torch.channels_last) for f in levels]
        boxes = []
        for _ in range(2):
            xy = torch.rand(12, 2) * 300
            boxes.append(Boxes(torch.cat([xy, xy + torch.logspace(0.5, 2.4, 12)[:, None].expand(12, 2)], 1)))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = mine(half, boxes)
        want = stock([f.float() for f in half], boxes)
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
        err = float((got.float() - want).abs().max())
        assert torch.allclose(got.float(), want.bfloat16().float(), atol=2e-2, rtol=1e-2), err
        trained = mine([f.float().requires_grad_() for f in half], boxes)  # training: detectron2's pooler
        assert trained.is_contiguous() and trained.requires_grad
    """)


def test_all_levels_in_one_kernel_pool_exactly_what_one_kernel_per_level_pools():
    """The one-kernel pooler (each ROI from its assigned level, no per-level nonzero or scatter) against the same
    kernel run level by level and scattered as detectron2 does: the same values to the bit; 3 levels (fewer than
    the kernel's 4) and images with no box."""
    run_interpreted("""
        import torch
        from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format
        from detectron2.structures import Boxes
        import nucleus_seg.modeling.roi_align as ra
        from nucleus_seg.modeling.nhwc_roi_align import nhwc_roi_align
        torch.manual_seed(2)
        for n_levels in (4, 3):
            scales = tuple(1 / 2 ** (2 + i) for i in range(n_levels))
            pooler = ROIPooler((4, 4), scales, 0, "ROIAlignV2")
            ra.use_nucleus_roi_align(pooler)
            levels = [torch.randn(3, 16, 128 // 2 ** i, 96 // 2 ** i).half().to(memory_format=torch.channels_last)
                      for i in range(n_levels)]
            boxes = []
            for count in (8, 0, 5):
                xy = torch.rand(count, 2) * torch.tensor([380., 500.]) - 10
                boxes.append(Boxes(torch.cat([xy, xy + torch.logspace(0.3, 2.5, count)[:, None].expand(count, 2)], 1)))
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                assert ra._one_kernel_levels(pooler, levels)
                got = pooler(levels, boxes)
            rois = convert_boxes_to_pooler_format(boxes)
            which = assign_boxes_to_levels(boxes, pooler.min_level, pooler.max_level, pooler.canonical_box_size,
                                           pooler.canonical_level)
            assert len(set(which.tolist())) >= 2  # the boxes span levels
            want = torch.zeros_like(got)
            for level, feats in enumerate(levels):
                inds = (which == level).nonzero().squeeze(1)
                if len(inds):
                    want[inds] = nhwc_roi_align(feats, rois[inds], 4, scales[level], 0, True)
            assert got.shape == (13, 16, 4, 4) and got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(got, want)
    """)
