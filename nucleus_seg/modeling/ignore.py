"""Ignore regions in Mask R-CNN's training losses: "not sure" is neither nucleus nor background.

A ground-truth instance with class -1 (the mapper makes one of each COCO ``iscrowd`` annotation when
``INPUT.NUCLEUS.CROWD_AS_IGNORE`` is on; ``nucleus-adapt`` writes its uncertain pseudo-labels so) is taken
out of the targets before matching, and then:

* RPN: anchors that would be background but lie mostly (IoA > ``IGNORE_IOA``) inside an ignore box are
  labelled -1, detectron2's own "ignore" label, so they add nothing to the objectness loss;
* ROI heads (standard and every cascade stage): background proposals mostly inside an ignore box are
  dropped from the box loss; the mask head trains on foreground proposals only, matched to real targets.

Installed per model instance (:func:`ignore_regions_in_losses`), like :mod:`.fast_inference`; with no
class -1 target it changes nothing.
"""

from __future__ import annotations

import types

import torch
from detectron2.structures import Boxes, Instances, pairwise_ioa

__all__ = ["IGNORE_CLASS", "IGNORE_IOA", "ignore_regions_in_losses", "split_ignored"]

IGNORE_CLASS = -1
IGNORE_IOA = 0.5  # share of an anchor's / proposal's area inside an ignore box that makes it "not sure"


def split_ignored(targets: list[Instances]) -> tuple[list[Instances], list[Boxes]]:
    """Each image's real targets and its ignore boxes."""
    real, ignored = [], []
    for t in targets:
        is_ignored = t.gt_classes == IGNORE_CLASS
        real.append(t[~is_ignored] if bool(is_ignored.any()) else t)
        ignored.append(t.gt_boxes[is_ignored])
    return real, ignored


def _inside_ignored(boxes: Boxes, ignored: Boxes) -> torch.Tensor:
    """Which of ``boxes`` lie mostly inside one of the ``ignored`` boxes."""
    if len(ignored) == 0 or len(boxes) == 0:
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.tensor.device)
    # pairwise_ioa(a, b): intersection over the area of b
    return (pairwise_ioa(ignored, boxes) > IGNORE_IOA).any(dim=0)


def _drop_ignored_background(proposals: list[Instances], ignored: list[Boxes], num_classes: int,
                             ) -> list[Instances]:
    out = []
    for p, boxes in zip(proposals, ignored):
        if len(boxes):
            drop = (p.gt_classes == num_classes) & _inside_ignored(p.proposal_boxes, boxes)
            p = p[~drop]
        out.append(p)
    return out


def _rpn_label_and_sample_anchors(anchors: list[Boxes], gt_instances: list[Instances], inner):
    real, ignored = split_ignored(gt_instances)
    gt_labels, matched_boxes = inner(anchors, real)
    if any(len(b) for b in ignored):
        all_anchors = Boxes.cat(anchors)
        for labels, boxes in zip(gt_labels, ignored):
            if len(boxes):
                labels[(labels == 0) & _inside_ignored(all_anchors, boxes.to(labels.device))] = -1
    return gt_labels, matched_boxes


def _label_and_sample_proposals(self, proposals: list[Instances], targets: list[Instances], inner):
    real, ignored = split_ignored(targets)
    sampled = inner(proposals, real)
    return _drop_ignored_background(sampled, ignored, self.num_classes)


def _cascade_match_and_label_boxes(self, proposals: list[Instances], stage: int, targets: list[Instances]):
    real, ignored = split_ignored(targets)
    labelled = type(self)._match_and_label_boxes(self, proposals, stage, real)
    return _drop_ignored_background(labelled, ignored, self.num_classes)


def ignore_regions_in_losses(model: torch.nn.Module) -> torch.nn.Module:
    """Make this model's RPN and ROI heads treat class -1 targets as ignore regions (see the module text)."""
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None and hasattr(rpn, "label_and_sample_anchors"):
        inner = rpn.label_and_sample_anchors  # detectron2's, or the batched one installed before

        def label_and_sample_anchors(anchors: list[Boxes], gt_instances: list[Instances]):
            return _rpn_label_and_sample_anchors(anchors, gt_instances, inner)

        rpn.label_and_sample_anchors = label_and_sample_anchors
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        sample = heads.label_and_sample_proposals  # detectron2's, or the batched one installed before

        def label_and_sample_proposals(proposals: list[Instances], targets: list[Instances]):
            return _label_and_sample_proposals(heads, proposals, targets, sample)

        heads.label_and_sample_proposals = label_and_sample_proposals
        if hasattr(heads, "_match_and_label_boxes"):
            heads._match_and_label_boxes = types.MethodType(_cascade_match_and_label_boxes, heads)
    return model
