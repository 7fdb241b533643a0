"""The training targets of the RPN and the ROI heads for all images at once, patched onto one model instance.

detectron2 builds them image by image. ``RPN.label_and_sample_anchors``: per image an IoU matrix against all
~65,000 anchors of a 512 px crop, the matcher (a host sync in its low-quality matches) and ``subsample_labels``
(two more syncs, two ``randperm``). ``ROIHeads.label_and_sample_proposals``: per image the IoU of ~1,000
proposals, the matcher, ``subsample_labels`` and a sync for the logged counts. With the backbone replayed as
CUDA graphs these loops are much of the host time of a training step, while the GPU waits.

Here the images share one padded IoU tensor (in chunks, so its memory stays bounded), with detectron2's IoU
arithmetic, thresholds, low-quality matches and first-index ties, so labels before sampling are detectron2's
exactly. Sampling keeps detectron2's counts (at most ``BATCH_SIZE_PER_IMAGE x POSITIVE_FRACTION`` positives,
negatives up to ``BATCH_SIZE_PER_IMAGE``) and draws each subset uniformly, as ``randperm`` does, from random
keys instead: the same distribution, other draws, and one host sync for the whole batch at most.
``NUCLEUS.TRAIN.BATCHED_ANCHOR_LABELS`` and ``NUCLEUS.TRAIN.BATCHED_ROI_SAMPLING`` switch them.
"""

from __future__ import annotations

import types

import numpy as np
import torch
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads.roi_heads import ROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

__all__ = ["CHUNK_ENTRIES", "batch_anchor_labels", "batch_roi_sampling", "batched_label_and_sample_anchors",
           "batched_label_and_sample_proposals"]

CHUNK_ENTRIES = 1 << 26  # images x gt boxes x anchors per IoU tensor (~0.5 GB of float32 intermediates)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # Boxes.area


def _padded_iou(gt: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(B, G, 4) gt boxes x (B or 1, N, 4) boxes -> (B, G, N) IoU, detectron2's ``pairwise_iou`` arithmetic."""
    wh = torch.min(gt[:, :, None, 2:], boxes[:, None, :, 2:]) - torch.max(gt[:, :, None, :2], boxes[:, None, :, :2])
    wh.clamp_(min=0)
    inter = wh.prod(dim=3)
    del wh
    union = _area(gt)[..., None] + _area(boxes)[:, None, :] - inter
    return torch.where(inter > 0, inter / union, torch.zeros(1, dtype=inter.dtype, device=inter.device))


def _match(matcher: Matcher, gt: torch.Tensor, real: torch.Tensor, boxes: torch.Tensor,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched gt index and label per box (B, N), for (B, G) padded gt boxes and (B or 1, N, 4) boxes:
    detectron2's Matcher, batched, a chunk of images at a time (``CHUNK_ENTRIES`` IoU entries at most)."""
    per_chunk = max(1, CHUNK_ENTRIES // (gt.shape[1] * max(1, boxes.shape[1])))
    parts = [_match_chunk(matcher, gt[lo:lo + per_chunk], real[lo:lo + per_chunk],
                          boxes[lo:lo + per_chunk] if len(boxes) > 1 else boxes)
             for lo in range(0, len(gt), per_chunk)]
    return torch.cat([m for m, _ in parts]), torch.cat([lab for _, lab in parts])


def _match_chunk(matcher: Matcher, gt: torch.Tensor, real: torch.Tensor, boxes: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    iou = _padded_iou(gt, boxes)
    iou.masked_fill_(~real[..., None], -1.0)  # padding never matches
    matched_vals, matches = iou.max(dim=1)  # first index among ties, as torch.max documents
    labels = torch.ones(matches.shape, dtype=torch.int8, device=matches.device)
    for label, low, high in zip(matcher.labels, matcher.thresholds[:-1], matcher.thresholds[1:]):
        labels[(matched_vals >= low) & (matched_vals < high)] = label
    if matcher.allow_low_quality_matches:
        highest = iou.max(dim=2).values
        best = ((iou == highest[..., None]) & real[..., None]).any(dim=1)
        labels[best] = 1
    return matches, labels


def _padded_gt(targets: list[Instances], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's gt boxes in one (B, G, 4) tensor (zeros past its own), and which of them are real."""
    boxes = [t.gt_boxes.tensor for t in targets]
    most = max(1, max((len(b) for b in boxes), default=0))
    gt = torch.zeros((len(boxes), most, 4), device=device)
    real = torch.zeros((len(boxes), most), dtype=torch.bool, device=device)
    for i, box in enumerate(boxes):
        gt[i, :len(box)], real[i, :len(box)] = box, True
    return gt, real


def _sample(positive: torch.Tensor, negative: torch.Tensor, num_samples: int, positive_fraction: float,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """detectron2's ``subsample_labels`` per row, without a sync: a uniformly random subset of the positives (at
    most ``num_samples x positive_fraction``) and of the negatives (up to ``num_samples`` in all), as masks;
    and the random keys that drew them."""
    cap = int(num_samples * positive_fraction)
    num_pos = positive.sum(dim=1).clamp(max=cap)
    keys = torch.rand(positive.shape, device=positive.device)
    picked_pos = positive & (_rank_among(keys, positive) < cap)
    picked_neg = negative & (_rank_among(keys, negative) < (num_samples - num_pos)[:, None])
    return picked_pos, picked_neg, keys


def _rank_among(keys: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Per row, each chosen entry's rank by key among the chosen ones (others rank past them)."""
    order = torch.where(chosen, keys, 2.0).argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


@torch.no_grad()
def batched_label_and_sample_anchors(self: RPN, anchors: list[Boxes], gt_instances: list[Instances],
                                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``RPN.label_and_sample_anchors`` for all images at once (see the module text)."""
    anchors = Boxes.cat(anchors).tensor
    gt, real = _padded_gt(gt_instances, anchors.device)
    matches, labels = _match(self.anchor_matcher, gt, real, anchors[None])
    if self.anchor_boundary_thresh >= 0:  # detectron2's legacy option, off by default
        t = self.anchor_boundary_thresh
        sizes = torch.tensor([x.image_size for x in gt_instances], dtype=anchors.dtype).to(anchors.device)
        inside = ((anchors[None, :, 0] >= -t) & (anchors[None, :, 1] >= -t)
                  & (anchors[None, :, 2] < sizes[:, 1:2] + t) & (anchors[None, :, 3] < sizes[:, 0:1] + t))
        labels[~inside] = -1
    picked_pos, picked_neg, _ = _sample(labels == 1, labels == 0, self.batch_size_per_image, self.positive_fraction)
    labels = torch.full_like(labels, -1)  # RPN._subsample_labels: ignore all but the sample
    labels[picked_pos] = 1
    labels[picked_neg] = 0
    matched = torch.gather(gt, 1, matches[..., None].expand(-1, -1, 4))  # zeros for an image without boxes
    return list(labels.unbind(0)), list(matched.unbind(0))


@torch.no_grad()
def batched_label_and_sample_proposals(self: ROIHeads, proposals: list[Instances], targets: list[Instances],
                                       ) -> list[Instances]:
    """``ROIHeads.label_and_sample_proposals`` for all images at once (see the module text): each image's sample
    (foreground first, then background), its classes and its matched targets' ``gt_*`` fields; one host sync."""
    if self.proposal_append_gt:
        proposals = add_ground_truth_to_proposals(targets, proposals)
    device = proposals[0].proposal_boxes.device
    counts = [len(p) for p in proposals]
    boxes = torch.zeros((len(proposals), max(1, max(counts)), 4), device=device)
    present = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=device)
    for i, p in enumerate(proposals):
        boxes[i, :len(p)], present[i, :len(p)] = p.proposal_boxes.tensor, True
    gt, real = _padded_gt(targets, device)
    gt_classes = torch.zeros(real.shape, dtype=torch.int64, device=device)
    for i, t in enumerate(targets):
        gt_classes[i, :len(t)] = t.gt_classes
    matches, labels = _match(self.proposal_matcher, gt, real, boxes)
    classes = torch.gather(gt_classes, 1, matches)  # ROIHeads._sample_proposals; no gt: all background
    classes[labels == 0] = self.num_classes
    classes[labels == -1] = -1
    classes[~present] = -1
    foreground = (classes != -1) & (classes != self.num_classes)
    picked_fg, picked_bg, keys = _sample(foreground, classes == self.num_classes, self.batch_size_per_image,
                                         self.positive_fraction)
    order = torch.where(picked_fg, keys, torch.where(picked_bg, keys + 1.0, 3.0)).argsort(dim=1)
    sizes = torch.stack([picked_fg.sum(dim=1), picked_bg.sum(dim=1)], dim=1).tolist()  # the one host sync
    sampled = []
    for i, (p, t, (num_fg, num_bg)) in enumerate(zip(proposals, targets, sizes)):
        idx = order[i, :num_fg + num_bg]
        p = p[idx]
        p.gt_classes = classes[i, idx]
        if len(t) > 0:
            sampled_targets = matches[i, idx]
            for name, value in t.get_fields().items():
                if name.startswith("gt_") and not p.has(name):
                    p.set(name, value[sampled_targets])
        sampled.append(p)
    storage = get_event_storage()
    storage.put_scalar("roi_head/num_fg_samples", np.mean([fg for fg, _ in sizes]))
    storage.put_scalar("roi_head/num_bg_samples", np.mean([bg for _, bg in sizes]))
    return sampled


def batch_anchor_labels(model: torch.nn.Module) -> None:
    """Install :func:`batched_label_and_sample_anchors` on this model's RPN (a subclass with its own labelling
    keeps it)."""
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None and type(rpn).label_and_sample_anchors is RPN.label_and_sample_anchors:
        rpn.label_and_sample_anchors = types.MethodType(batched_label_and_sample_anchors, rpn)


def batch_roi_sampling(model: torch.nn.Module) -> None:
    """Install :func:`batched_label_and_sample_proposals` on this model's ROI heads (standard and Cascade, whose
    first stage samples; a subclass with its own sampling keeps it)."""
    heads = getattr(model, "roi_heads", None)
    if heads is not None and type(heads).label_and_sample_proposals is ROIHeads.label_and_sample_proposals:
        heads.label_and_sample_proposals = types.MethodType(batched_label_and_sample_proposals, heads)
