"""The RPN's training targets for all images at once (``NUCLEUS.TRAIN.BATCHED_ANCHOR_LABELS``).

detectron2's ``RPN.label_and_sample_anchors`` loops over the images: per image an IoU matrix against all
~65,000 anchors of a 512 px crop, the matcher (a host sync in its low-quality matches) and
``subsample_labels`` (two more syncs, two ``randperm``). At batch 8 on an H200, with the backbone replayed as
CUDA graphs, that loop was a large part of the host time left in a training step while the GPU waited.

Here the images share one padded IoU tensor (in chunks, so its memory stays bounded), with detectron2's IoU
arithmetic, thresholds, low-quality matches and first-index ties, so labels before sampling are detectron2's
exactly. Sampling keeps detectron2's counts (at most ``BATCH_SIZE_PER_IMAGE x POSITIVE_FRACTION`` positives,
negatives up to ``BATCH_SIZE_PER_IMAGE``) and draws each subset uniformly, as ``randperm`` does, from random
keys instead: the same distribution, other draws, and no host sync.
"""

from __future__ import annotations

import types

import torch
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances

__all__ = ["CHUNK_ENTRIES", "batch_anchor_labels", "batched_label_and_sample_anchors"]

CHUNK_ENTRIES = 1 << 26  # images x gt boxes x anchors per IoU tensor (~0.5 GB of float32 intermediates)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # Boxes.area


def _padded_iou(gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, G, 4) gt boxes x (A, 4) anchors -> (B, G, A) IoU, detectron2's ``pairwise_iou`` arithmetic."""
    wh = torch.min(gt[:, :, None, 2:], anchors[None, None, :, 2:]) - torch.max(gt[:, :, None, :2],
                                                                             anchors[None, None, :, :2])
    wh.clamp_(min=0)
    inter = wh.prod(dim=3)
    del wh
    union = _area(gt)[..., None] + _area(anchors)[None, None] - inter
    return torch.where(inter > 0, inter / union, torch.zeros(1, dtype=inter.dtype, device=inter.device))


def _match(self: RPN, gt: torch.Tensor, real: torch.Tensor, anchors: torch.Tensor,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched gt index and label (-1, 0, 1) per anchor, for (B, G) padded gt boxes: detectron2's Matcher."""
    matcher = self.anchor_matcher
    iou = _padded_iou(gt, anchors)
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


def _subsample(labels: torch.Tensor, num_samples: int, positive_fraction: float) -> torch.Tensor:
    """detectron2's ``subsample_labels`` + ``RPN._subsample_labels`` per row of (B, A) labels, without a sync:
    a uniformly random subset of the positives (at most ``num_samples x positive_fraction``) and of the
    negatives (up to ``num_samples`` in all); everything else -1."""
    positive, negative = labels == 1, labels == 0
    cap = int(num_samples * positive_fraction)
    num_pos = positive.sum(dim=1).clamp(max=cap)
    keys = torch.rand(labels.shape, device=labels.device)
    picked_pos = positive & (_rank_among(keys, positive) < cap)
    picked_neg = negative & (_rank_among(keys, negative) < (num_samples - num_pos)[:, None])
    out = torch.full_like(labels, -1)
    out[picked_pos] = 1
    out[picked_neg] = 0
    return out


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
    boxes = [x.gt_boxes.tensor for x in gt_instances]
    counts = [len(b) for b in boxes]
    most = max(counts, default=0)
    b = len(boxes)
    gt = anchors.new_zeros((b, max(most, 1), 4))
    real = torch.zeros((b, max(most, 1)), dtype=torch.bool, device=anchors.device)
    for i, box in enumerate(boxes):
        gt[i, :len(box)], real[i, :len(box)] = box, True
    per_chunk = max(1, CHUNK_ENTRIES // (gt.shape[1] * max(1, len(anchors))))
    matches, labels = [], []
    for lo in range(0, b, per_chunk):
        m, lab = _match(self, gt[lo:lo + per_chunk], real[lo:lo + per_chunk], anchors)
        matches.append(m)
        labels.append(lab)
    matches, labels = torch.cat(matches), torch.cat(labels)
    if self.anchor_boundary_thresh >= 0:  # detectron2's legacy option, off by default
        t = self.anchor_boundary_thresh
        sizes = torch.tensor([x.image_size for x in gt_instances], dtype=anchors.dtype).to(anchors.device)
        inside = ((anchors[None, :, 0] >= -t) & (anchors[None, :, 1] >= -t)
                  & (anchors[None, :, 2] < sizes[:, 1:2] + t) & (anchors[None, :, 3] < sizes[:, 0:1] + t))
        labels[~inside] = -1
    labels = _subsample(labels, self.batch_size_per_image, self.positive_fraction)
    matched = torch.gather(gt, 1, matches[..., None].expand(-1, -1, 4))  # zeros for an image without boxes
    return list(labels.unbind(0)), list(matched.unbind(0))


def batch_anchor_labels(model: torch.nn.Module) -> None:
    """Install :func:`batched_label_and_sample_anchors` on this model's RPN (a subclass with its own labelling
    keeps it)."""
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None and type(rpn).label_and_sample_anchors is RPN.label_and_sample_anchors:
        rpn.label_and_sample_anchors = types.MethodType(batched_label_and_sample_anchors, rpn)
