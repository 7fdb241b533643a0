"""nms_bits: the batched NMS's packed suppression matrix in one Triton kernel. The kernel runs in Triton's CPU
interpreter, switched on before Triton is first imported: each check runs in a fresh Python process."""

from __future__ import annotations

import pytest
from test_nhwc_group_norm import run_interpreted

pytest.importorskip("triton")


def test_the_kernels_bits_are_the_pytorch_paths_for_ties_empty_boxes_and_ragged_sizes():
    """Exact duplicates (IoU 1), zero-area boxes (IoU 0/0), group sizes below, at and past a byte and a tile, and
    thresholds one float32 can and cannot hold: the same bytes as the IoU matrices in PyTorch."""
    run_interpreted("""
        import torch
        from nucleus_seg.modeling import fast_inference, nms_bits
        from nucleus_seg.modeling.fast_inference import _below_or_at, _bit_weights, _suppression_matrix
        g = torch.Generator().manual_seed(0)
        for groups, n in [(3, 1), (2, 7), (3, 8), (4, 33), (2, 100), (1, 257)]:
            xy = torch.rand(groups, n, 2, generator=g) * 50
            box = torch.cat([xy, xy + torch.rand(groups, n, 2, generator=g) * 30], 2)
            box[:, ::5] = box[:, :1].clone()
            box[:, 3::7, 2:] = box[:, 3::7, :2].clone()
            assert nms_bits.suppression_bits_usable(box) and not nms_bits.suppression_bits_usable(box.half())
            for threshold in (0.7, 0.5, 1 / 3):
                t = _below_or_at(threshold, box.dtype)
                got = _suppression_matrix(box, t, _bit_weights(box.device))
                fast_inference.suppression_bits_usable = lambda boxes: False  # the PyTorch path
                want = _suppression_matrix(box, t, _bit_weights(box.device))
                fast_inference.suppression_bits_usable = nms_bits.suppression_bits_usable
                assert got.shape == want.shape == (groups, n, (n + 7) // 8)
                assert torch.equal(got, want), (groups, n, threshold, int((got != want).sum()))
                assert n < 5 or got.any()
    """)


def test_the_fixed_point_with_the_kernel_keeps_what_torchvision_keeps():
    """batched_nms_keep's parallel path (as on a GPU) with the kernel's bits, several chunks of groups included,
    against torchvision's nms per group."""
    run_interpreted("""
        import torch, torchvision
        from nucleus_seg.modeling import fast_inference
        from nucleus_seg.modeling.fast_inference import batched_nms_keep
        fast_inference.SERIAL_NMS_DEVICES = ()
        fast_inference.NMS_CHUNK = 3 * 120 * 120 // 32  # 3 groups a chunk with the kernel
        g = torch.Generator().manual_seed(3)
        groups, n = 8, 120
        xy = torch.rand(groups, n, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + torch.rand(groups, n, 2, generator=g) * 40], dim=2)
        scores = torch.rand(groups, n, generator=g)
        scores[:, 20:30] = scores[:, 19:20].clone()  # ties: torchvision's stable order
        valid = torch.rand(groups, n, generator=g) > 0.1
        valid[4] = False
        calls = []
        kernel = fast_inference.suppression_bits
        fast_inference.suppression_bits = lambda *args: calls.append(1) or kernel(*args)
        for threshold in (0.7, 0.5):
            keep = batched_nms_keep(boxes, scores, valid, threshold)
            for i in range(groups):
                idx = valid[i].nonzero().squeeze(1)
                want = torch.zeros(n, dtype=torch.bool)
                want[idx[torchvision.ops.nms(boxes[i, idx], scores[i, idx], threshold)]] = True
                assert torch.equal(keep[i], want), (threshold, i)
            assert keep.sum() > 0 and not keep[~valid].any()
        assert len(calls) == 6  # three chunks (3, 3, 2 groups) a threshold, each through the kernel
    """)
