"""LabelMasks behaves as the BitMasks it stands for, everywhere detectron2's training touches masks."""

from __future__ import annotations

import numpy as np
import torch
from detectron2.structures import BitMasks, Boxes, Instances

from nucleus_seg.structures import LabelMasks, inner_boundaries, label_image_to_masks, masks_to_label_image


def _stack(seed: int = 0):
    """Two label layers with overlapping instances across layers (ids 1..6), as the mapper makes them."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((2, 40, 50), np.int16)
    layer_of = []
    for i in range(6):
        layer = i % 2
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        labels[layer, y:y + rng.integers(3, 10), x:x + rng.integers(3, 10)] = i + 1
        layer_of.append(layer)
    ids = np.array([1, 2, 4, 5, 6])  # instance 3 was dropped (e.g. too small after the crop)
    layers = np.array(layer_of)[ids - 1]
    dense = np.stack([labels[layer] == k for layer, k in zip(layers, ids)])
    return LabelMasks(torch.from_numpy(labels), torch.from_numpy(layers), torch.from_numpy(ids)), BitMasks(
        torch.from_numpy(dense))


def test_label_masks_equal_bitmasks():
    lm, bm = _stack()
    assert isinstance(lm, BitMasks) and len(lm) == len(bm) == 5 and lm.image_size == bm.image_size
    assert torch.equal(lm.tensor, bm.tensor)
    assert torch.equal(lm.nonempty(), bm.nonempty())
    assert torch.equal(lm.get_bounding_boxes().tensor, bm.get_bounding_boxes().tensor)
    for item in (torch.tensor([4, 0, 0, 2]), torch.tensor([True, False, True, False, True]), 3, -1, slice(1, 4)):
        assert torch.equal(lm[item].tensor, bm[item].tensor), item
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [5.0, 3.0, 40.0, 30.0], [10.0, 10.0, 12.0, 30.0],
                          [0.0, 0.0, 50.0, 40.0], [2.5, 7.5, 9.0, 19.0]])
    assert torch.allclose(lm.crop_and_resize(boxes, 14), bm.crop_and_resize(boxes, 14))
    moved = lm.to("cpu")
    assert isinstance(moved, LabelMasks) and torch.equal(moved.tensor, bm.tensor)


def test_label_masks_survive_instances_indexing_and_transfer():
    """ROI heads index gt fields by sampled targets (``trg_value[sampled_targets]``) after .to(device)."""
    lm, bm = _stack(1)
    inst = Instances(lm.image_size, gt_masks=lm, gt_boxes=Boxes(torch.zeros(5, 4)))
    picked = inst.to("cpu")[torch.tensor([2, 2, 0])]
    assert isinstance(picked.gt_masks, LabelMasks)
    assert torch.equal(picked.gt_masks.tensor, bm.tensor[[2, 2, 0]])


def test_label_image_round_trip_and_score_order():
    masks = np.zeros((3, 8, 8), bool)
    masks[0, :4, :4] = masks[1, 2:6, 2:6] = masks[2, 6:, 6:] = True
    label = masks_to_label_image(masks, scores=np.array([0.9, 0.5, 0.7]))
    assert label[3, 3] == 1  # the overlap goes to the higher-scoring instance 1
    ids, back = label_image_to_masks(label)
    assert ids.tolist() == [1, 2, 3] and back[2].sum() == masks[2].sum()


def test_inner_boundaries_are_scikit_images():
    """The overlays' outlines: exactly find_boundaries(mode="inner") on random label images (ids touching each
    other and the image edges, thin shapes, past 65535 ids), one-pixel and empty images."""
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(0)
    images = []
    for _ in range(30):
        labels = np.zeros((int(rng.integers(1, 50)), int(rng.integers(1, 50))), np.int32)
        for k in range(1, 12):
            y, x = rng.integers(0, labels.shape[0]), rng.integers(0, labels.shape[1])
            h, w = rng.integers(1, 15, 2)
            labels[y:y + h, x:x + w] = k * int(rng.choice([1, 7000]))  # up to 77000: past uint16
        images.append(labels)
    images += [np.full((5, 7), 3, np.int32), np.zeros((4, 4), np.int32), np.arange(12, dtype=np.int32).reshape(3, 4),
               np.ones((1, 1), np.int32), np.zeros((0, 3), np.int32)]
    for labels in images:
        np.testing.assert_array_equal(inner_boundaries(labels), find_boundaries(labels, mode="inner"))

