"""Test-time augmentation by the four flips: detections fused over the views, soft masks averaged.

One backbone pass per view (detectron2's own TTA runs two), the mask head on the fused boxes in every
view, and the masks mapped back and averaged, so the output is flip-equivariant by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from detectron2.structures import Boxes, Instances

from ..modeling.fast_inference import final_box_predictor

__all__ = ["FLIPS", "flip_boxes", "forward_flips", "fuse_flip_detections"]

FLIPS = ((False, False), (True, False), (False, True), (True, True))  # (horizontal, vertical)
TTA_MATCH_IOU = 0.55  # box IoU at which detections of two flipped views are the same nucleus


def flip_boxes(boxes: torch.Tensor, flip: tuple[bool, bool], height: int, width: int) -> torch.Tensor:
    """XYXY boxes mirrored as the image was (its own inverse)."""
    out = boxes.clone()
    if flip[0]:
        out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    if flip[1]:
        out[:, 1], out[:, 3] = height - boxes[:, 3], height - boxes[:, 1]
    return out


def fuse_flip_detections(boxes: list[torch.Tensor], scores: list[torch.Tensor], nms_thresh: float,
                         topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One set of detections from those of V views (boxes in the original frame).

    Greedy NMS over all views picks one box per nucleus; its box becomes the score-weighted mean of the
    boxes of every view that match it (IoU >= ``TTA_MATCH_IOU``) and its score the mean over views of
    each view's best matching score (0 where a view missed it), as weighted box fusion does: a nucleus
    seen in one view of four keeps a quarter of its score.
    """
    views = len(boxes)
    allb, alls = torch.cat(boxes), torch.cat(scores).float()
    view_of = torch.repeat_interleave(torch.arange(views, device=allb.device),
                                      torch.tensor([len(b) for b in boxes], device=allb.device))
    if len(allb) == 0:
        return allb.new_zeros((0, 4)), alls.new_zeros(0)
    keep = torchvision.ops.nms(allb.float(), alls, nms_thresh)
    if topk >= 0:
        keep = keep[:topk]
    match = torchvision.ops.box_iou(allb[keep].float(), allb.float()) >= TTA_MATCH_IOU  # (K, M)
    weight = match * alls[None, :]
    fused = (weight @ allb.float()) / weight.sum(dim=1, keepdim=True).clamp(min=1e-6)
    per_view = torch.zeros((len(keep), views), device=allb.device)
    per_view = per_view.scatter_reduce(1, view_of[None, :].expand_as(weight), weight, "amax")
    return fused, per_view.sum(dim=1) / views



def forward_flips(model: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> list[Instances]:
    """Test-time augmentation by the four flips: detections fused over the views
    (``fuse_flip_detections``), then each view's mask head on the fused boxes and the soft masks,
    mapped back, averaged. One backbone pass per view (detectron2's TTA runs two)."""
    views = [(k, f) for k in range(len(tensors)) for f in FLIPS]
    flipped = [tensors[k].flip([d for d, on in ((2, f[0]), (1, f[1])) if on]) if any(f) else tensors[k]
               for k, f in views]
    images = model.preprocess_image([{"image": t} for t in flipped])
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    found = model.roi_heads._forward_box(features, proposals)
    box_predictor = final_box_predictor(model)
    fused: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, t in enumerate(tensors):
        h, w = t.shape[1:]
        mine = [(found[i], f) for i, (kk, f) in enumerate(views) if kk == k]
        fused.append(fuse_flip_detections(
            [flip_boxes(r.pred_boxes.tensor.float(), f, h, w) for r, f in mine], [r.scores for r, _ in mine],
            box_predictor.test_nms_thresh, box_predictor.test_topk_per_image))
    given = []
    for (k, f), size in zip(views, images.image_sizes):
        h, w = tensors[k].shape[1:]
        inst = Instances(size)
        inst.pred_boxes = Boxes(flip_boxes(fused[k][0], f, h, w))
        inst.scores = fused[k][1]
        inst.pred_classes = torch.zeros(len(fused[k][1]), dtype=torch.int64, device=fused[k][1].device)
        given.append(inst)
    masked = model.roi_heads.forward_with_given_boxes(features, given)
    out = []
    for k, t in enumerate(tensors):
        probs = None
        for i in [i for i, (kk, _) in enumerate(views) if kk == k]:
            m = masked[i].pred_masks.float()
            f = views[i][1]
            m = m.flip([d for d, on in ((3, f[0]), (2, f[1])) if on]) if any(f) else m
            probs = m if probs is None else probs + m
        res = Instances(tuple(t.shape[1:]))
        res.pred_boxes = Boxes(fused[k][0])
        res.scores = fused[k][1]
        res.pred_classes = given[len(FLIPS) * k].pred_classes
        res.pred_masks = probs / len(FLIPS)
        out.append(res)
    return out
