"""The sparse-product ROIAlign backward: torchvision's forward and, to float rounding, its gradient."""

from __future__ import annotations

import pytest
import torch
from detectron2.layers import ROIAlign
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torchvision.ops import roi_align

from nucleus_seg.modeling.roi_align import sparse_backward_roi_align, use_nucleus_roi_align


def _rois(n: int, size: float, images: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.9
    wh = 0.5 + torch.rand(n, 2, generator=g) * size * 0.3
    rois = torch.cat([torch.randint(0, images, (n, 1), generator=g).float(), xy, xy + wh], dim=1)
    rois[0, 1:] = torch.tensor([-9.0, size - 3, size + 20, size + 4])  # partly outside the image
    rois[1, 1:] = torch.tensor([size - 1.0, size - 1.0, size + 0.5, size + 0.5])  # past the last pixel
    return rois


@pytest.mark.parametrize("output_size, sampling_ratio, aligned", [(7, 0, True), (14, 0, True), (5, 2, False)])
def test_same_forward_and_gradient_as_torchvision(output_size, sampling_ratio, aligned):
    torch.manual_seed(0)
    features = torch.randn(2, 6, 20, 24, requires_grad=True)
    mine = features.detach().clone().requires_grad_()
    rois = _rois(40, 80.0, images=2)
    scale = 0.25
    expected = roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
    got = sparse_backward_roi_align(mine, rois, output_size, scale, sampling_ratio, aligned)
    assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(mine.grad, features.grad, rtol=1e-5, atol=1e-5)
    assert features.grad.abs().sum() > 0


def test_no_rois_gives_a_zero_gradient_and_bfloat16_features_keep_their_dtype():
    features = torch.randn(1, 3, 8, 8, requires_grad=True)
    out = sparse_backward_roi_align(features, torch.zeros(0, 5), 7, 1.0, 0, True)
    out.sum().backward()
    assert out.shape == (0, 3, 7, 7) and torch.equal(features.grad, torch.zeros_like(features))

    half = torch.randn(1, 3, 8, 8).bfloat16().requires_grad_()
    out = sparse_backward_roi_align(half, torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]]), 7, 1.0, 0, True)
    out.float().sum().backward()
    assert out.dtype == half.grad.dtype == torch.bfloat16


def test_an_fpn_pooler_with_it_installed_gives_detectron2s_gradients():
    """Four FPN levels, boxes of every size: what the box and mask heads backpropagate through in training."""
    torch.manual_seed(0)
    pooler = ROIPooler((7, 7), scales=(1 / 4, 1 / 8, 1 / 16, 1 / 32), sampling_ratio=0, pooler_type="ROIAlignV2")
    sizes = (64, 32, 16, 8)
    features = [torch.randn(2, 4, s, s, requires_grad=True) for s in sizes]
    boxes = [Boxes(_rois(30, 256.0, images=1, seed=i)[:, 1:].clamp(0, 256)) for i in range(2)]
    grad = torch.randn(60, 4, 7, 7)
    pooler(features, boxes).backward(grad)
    expected = [f.grad.clone() for f in features]

    assert use_nucleus_roi_align(pooler) == 4
    assert sum(isinstance(m, ROIAlign) for m in pooler.modules()) == 4
    for f in features:
        f.grad = None
    pooler(features, boxes).backward(grad)
    for f, e in zip(features, expected):
        torch.testing.assert_close(f.grad, e, rtol=1e-5, atol=1e-5)


def test_the_trainer_installs_it(tmp_path):
    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.engine.trainer import NucleusTrainer

    cfg = get_nucleus_cfg("configs/nucleus_R18_FPN_cpu_demo.yaml", ["OUTPUT_DIR", str(tmp_path)])
    model = NucleusTrainer.build_model(cfg)
    aligners = [m for m in model.modules() if isinstance(m, ROIAlign)]
    assert len(aligners) == 8  # box and mask poolers, four levels each
    assert all(m.forward.__func__ is not ROIAlign.forward for m in aligners)


def test_under_autocast_the_boxes_stay_float32():
    """detectron2 rounds the boxes to the features' bfloat16 (a box edge at 301.3 px becomes 302); autocast then
    runs ROIAlign in float32 anyway, so the installed ROIAlign pools at the float32 box instead."""
    torch.manual_seed(0)
    features = torch.randn(1, 4, 128, 128).bfloat16()  # stride 4: a 512 px image
    rois = torch.tensor([[0.0, 301.3, 257.7, 333.9, 290.2], [0.0, 401.1, 300.6, 431.4, 340.8]])
    stock, mine = ROIAlign((7, 7), 0.25, 0, aligned=True), ROIAlign((7, 7), 0.25, 0, aligned=True)
    assert use_nucleus_roi_align(mine) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled_stock, pooled_mine = stock(features, rois), mine(features, rois)
    precise = roi_align(features.float(), rois, 7, 0.25, 0, True)
    torch.testing.assert_close(pooled_mine.float(), precise.bfloat16().float())
    rounded = roi_align(features.float(), rois.bfloat16().float(), 7, 0.25, 0, True)
    torch.testing.assert_close(pooled_stock.float(), rounded.bfloat16().float())
    assert (rounded - precise).abs().max() > 0.1  # what the rounding cost
    with torch.no_grad():  # float32 features: exactly detectron2's ROIAlign
        assert torch.equal(mine(features.float(), rois), stock(features.float(), rois))


def test_in_inference_each_half_level_is_made_float32_nchw_once_for_every_pooler_that_reads_it():
    """torchvision's autocast wrapper casts the features to float32 and its kernel makes them NCHW at every call;
    the installed ROIAlign makes that copy once per feature tensor and pools the same values."""
    torch.manual_seed(1)
    features = torch.randn(2, 8, 32, 32).bfloat16().to(memory_format=torch.channels_last)
    rois = _rois(20, 128.0, images=2)
    mine = ROIAlign((7, 7), 0.25, 0, aligned=True)
    use_nucleus_roi_align(mine)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first, second = mine(features, rois), mine(features, rois[:5])
    copy = features._nucleus_float_nchw
    assert copy.dtype == torch.float32 and copy.is_contiguous() and torch.equal(copy, features.float())
    expected = roi_align(features.float(), rois, 7, 0.25, 0, True).bfloat16()
    assert first.dtype == torch.bfloat16 and torch.equal(first, expected) and torch.equal(second, expected[:5])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mine(features, rois)
    assert features._nucleus_float_nchw is copy  # not made again
    grad_features = features.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training: no copy kept on a tensor that needs a gradient
        pooled = mine(grad_features, rois)
    assert not hasattr(grad_features, "_nucleus_float_nchw") and pooled.requires_grad
