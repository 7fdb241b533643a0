"""NUCLEUS.TRAIN.BATCHED_ANCHOR_LABELS: the RPN's training targets of all images at once are detectron2's labels
and matched boxes, sampled to detectron2's counts from the same candidates."""

from __future__ import annotations

import pytest
import torch
from detectron2.structures import Boxes, Instances

from nucleus_seg.engine.trainer import NucleusTrainer
from nucleus_seg.modeling.rpn_labels import batched_label_and_sample_anchors


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
    from nucleus_seg.modeling import rpn_labels

    anchors, targets = anchors_and_targets(seed)
    rpn.batch_size_per_image, rpn.positive_fraction = 10**6, 1.0  # every candidate kept: no randomness
    monkeypatch.setattr(rpn_labels, "CHUNK_ENTRIES", 40 * 1400)  # one image per IoU chunk, as well
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
