"""NUCLEUS.TRAIN.BATCHED_ANCHOR_LABELS: the RPN's training targets of all images at once are detectron2's labels
and matched boxes, sampled to detectron2's counts from the same candidates."""

from __future__ import annotations

import pytest
import torch
from detectron2.structures import Boxes, Instances

from nucleus_seg.engine.trainer import NucleusTrainer
from nucleus_seg.modeling.training_targets import batched_label_and_sample_anchors


@pytest.fixture
def rpn(tiny_cfg):
    return NucleusTrainer.build_model(tiny_cfg).proposal_generator


def anchors_and_targets(seed: int) -> tuple[list[Boxes], list[Instances]]:
    """Anchors on three 'levels' and four images: many boxes, few, a duplicated box (ties), none."""
    g = torch.Generator().manual_seed(seed)
    levels = []
    for size, n in ((8, 900), (16, 400), (32, 100)):
        xy = torch.rand(n, 2, generator=g) * 128 - size / 2
        levels.append(Boxes(torch.cat([xy, xy + size * (0.5 + torch.rand(n, 2, generator=g))], dim=1)))
    targets = []
    for count in (40, 3, 2, 0):
        xy = torch.rand(count, 2, generator=g) * 100
        box = torch.cat([xy, xy + 6 + torch.rand(count, 2, generator=g) * 20], dim=1)
        if count == 2:
            box[1] = box[0]  # two identical nuclei: the first index wins, as detectron2's max does
        inst = Instances((128, 128))
        inst.gt_boxes = Boxes(box)
        targets.append(inst)
    return levels, targets


@pytest.mark.parametrize("seed", [0, 1])
def test_labels_and_matched_boxes_are_detectron2s_when_nothing_is_sampled_away(rpn, seed, monkeypatch):
    from nucleus_seg.modeling import training_targets

    anchors, targets = anchors_and_targets(seed)
    rpn.batch_size_per_image, rpn.positive_fraction = 10**6, 1.0  # every candidate kept: no randomness
    monkeypatch.setattr(training_targets, "CHUNK_ENTRIES", 40 * 1400)  # one image per IoU chunk, as well
    ours = batched_label_and_sample_anchors(rpn, anchors, targets)
    ref = type(rpn).label_and_sample_anchors(rpn, anchors, targets)
    for mine, theirs in zip(ours, ref):
        for a, b in zip(mine, theirs):
            assert a.dtype == b.dtype and torch.equal(a, b)
    labels = torch.stack(ref[0])
    assert (labels == 1).sum(dim=1)[:3].min() > 0 and (labels[3] == 0).all()  # positives; an image without nuclei


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_samples_have_detectron2s_counts_and_come_from_its_candidates(rpn, seed):
    anchors, targets = anchors_and_targets(seed)
    rpn.batch_size_per_image, rpn.positive_fraction = 64, 0.25
    num, fraction = rpn.batch_size_per_image, rpn.positive_fraction
    torch.manual_seed(seed)
    labels, _ = batched_label_and_sample_anchors(rpn, anchors, targets)
    ref, _ = type(rpn).label_and_sample_anchors(rpn, anchors, targets)
    rpn.batch_size_per_image, rpn.positive_fraction = 10**6, 1.0
    candidates, _ = type(rpn).label_and_sample_anchors(rpn, anchors, targets)
    capped = 0
    for mine, theirs, cand in zip(labels, ref, candidates):
        for value in (1, 0):
            assert (mine == value).sum() == (theirs == value).sum()  # detectron2's sample sizes
            assert (cand[mine == value] == value).all()  # drawn from its candidates
        capped += int((cand == 1).sum() > num * fraction)
        assert (mine == 1).sum() == min(int((cand == 1).sum()), int(num * fraction))
    assert capped >= 1  # the positive cap was exercised
    rpn.batch_size_per_image, rpn.positive_fraction = num, fraction
    torch.manual_seed(seed + 100)
    other, _ = batched_label_and_sample_anchors(rpn, anchors, targets)
    assert any(not torch.equal(a, b) for a, b in zip(labels, other))  # random subsets, not the first ones


def proposals_and_targets(seed: int) -> tuple[list[Instances], list[Instances]]:
    """Proposals around four images' nuclei (many, few, none) with their masks, as the ROI heads get them."""
    from detectron2.structures import BitMasks

    g = torch.Generator().manual_seed(seed)
    proposals, targets = [], []
    for count, num in ((30, 300), (4, 120), (0, 80), (12, 1)):
        xy = torch.rand(count, 2, generator=g) * 100
        gt = torch.cat([xy, xy + 6 + torch.rand(count, 2, generator=g) * 20], dim=1)
        masks = torch.zeros(count, 128, 128, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(gt.round().int().tolist()):
            masks[j, y1:y2, x1:x2] = True
        target = Instances((128, 128), gt_boxes=Boxes(gt), gt_classes=torch.zeros(count, dtype=torch.int64),
                           gt_masks=BitMasks(masks))
        near = gt[torch.randint(0, max(count, 1), (num,), generator=g)] if count else torch.rand(num, 4) * 60
        boxes = near + torch.randn(num, 4, generator=g) * 4
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        proposals.append(Instances((128, 128), proposal_boxes=Boxes(boxes),
                                   objectness_logits=torch.randn(num, generator=g)))
        targets.append(target)
    return proposals, targets


def rows(instances: Instances) -> list[tuple]:
    """A sampled image's proposals as sortable rows: box, logit, class, matched box, matched mask's pixels."""
    out = []
    for i in range(len(instances)):
        row = (*instances.proposal_boxes.tensor[i].tolist(), float(instances.objectness_logits[i]),
               int(instances.gt_classes[i]))
        if instances.has("gt_boxes"):
            row += (*instances.gt_boxes.tensor[i].tolist(), int(instances.gt_masks.tensor[i].sum()))
        out.append(row)
    return sorted(out)


@pytest.fixture
def roi_heads(tiny_cfg):
    return NucleusTrainer.build_model(tiny_cfg).roi_heads


@pytest.mark.parametrize("seed", [0, 1])
def test_roi_samples_are_detectron2s_when_nothing_is_sampled_away(roi_heads, seed):
    from detectron2.utils.events import EventStorage

    from nucleus_seg.modeling.training_targets import batched_label_and_sample_proposals

    proposals, targets = proposals_and_targets(seed)
    roi_heads.batch_size_per_image, roi_heads.positive_fraction = 10**6, 1.0
    with EventStorage() as storage:
        ours = batched_label_and_sample_proposals(roi_heads, proposals, targets)
        ours_fg = storage.latest()["roi_head/num_fg_samples"][0]
        ref = type(roi_heads).label_and_sample_proposals(roi_heads, proposals, targets)
        assert storage.latest()["roi_head/num_fg_samples"][0] == ours_fg > 0
    for a, b in zip(ours, ref):
        assert a.get_fields().keys() == b.get_fields().keys()
        assert rows(a) == rows(b)
        fg = a.gt_classes != roi_heads.num_classes
        assert torch.equal(fg, fg.sort(descending=True, stable=True).values)  # foreground first, as there
    assert not ours[2].has("gt_boxes") and (ours[2].gt_classes == roi_heads.num_classes).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roi_samples_have_detectron2s_counts_and_come_from_its_candidates(roi_heads, seed):
    from detectron2.utils.events import EventStorage

    from nucleus_seg.modeling.training_targets import batched_label_and_sample_proposals

    proposals, targets = proposals_and_targets(seed)
    roi_heads.batch_size_per_image, roi_heads.positive_fraction = 64, 0.25
    with EventStorage():
        torch.manual_seed(seed)
        ours = batched_label_and_sample_proposals(roi_heads, proposals, targets)
        ref = type(roi_heads).label_and_sample_proposals(roi_heads, proposals, targets)
        roi_heads.batch_size_per_image, roi_heads.positive_fraction = 10**6, 1.0
        candidates = type(roi_heads).label_and_sample_proposals(roi_heads, proposals, targets)
    k = roi_heads.num_classes
    for mine, theirs, cand in zip(ours, ref, candidates):
        for fg in (True, False):
            assert ((mine.gt_classes != k) == fg).sum() == ((theirs.gt_classes != k) == fg).sum()
        assert set(rows(mine)) <= set(rows(cand))  # each sampled row, with its class and target, a candidate
    assert (ours[0].gt_classes != k).sum() == 16  # the foreground cap was exercised
