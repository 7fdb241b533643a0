"""Conversions between per-instance masks and label images, shared by evaluation, prediction and data."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from detectron2.structures import BitMasks


def masks_to_label_image(
    masks: np.ndarray, scores: np.ndarray | None = None, dtype: type = np.int32
) -> np.ndarray:
    """Paint N HxW boolean masks into one label image (ids 1..N in input order).

    Overlaps go to the higher-scoring instance (as the Matterport sample's submission did): masks are
    painted from lowest to highest score so the best one wins each pixel. Instance k keeps id k+1 even
    if it ends up with no pixels.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be NxHxW, got shape {masks.shape}")
    label = np.zeros(masks.shape[1:], dtype=dtype)
    order = np.arange(len(masks)) if scores is None else np.argsort(np.asarray(scores), kind="stable")
    for k in order:
        label[masks[k]] = k + 1
    return label


def label_image_to_masks(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a label image into (ids, NxHxW bool masks), ids ascending, background 0 excluded."""
    ids = np.unique(label)
    ids = ids[ids != 0]
    return ids, label[None] == ids[:, None, None]


def relabel_sequential(label: np.ndarray) -> np.ndarray:
    """Renumber instance ids to 1..N keeping order (holes in the id range removed)."""
    ids, inverse = np.unique(label, return_inverse=True)
    out = inverse.reshape(label.shape)
    if ids[0] != 0:
        out = out + 1
    return out.astype(label.dtype if label.dtype.itemsize >= 4 else np.int32)


class LabelMasks(BitMasks):
    """``BitMasks`` kept as label layers plus each instance's (layer, id).

    A field of 100 nuclei as N full-size bool masks is ~26 MB at 512 px; as one int16 label layer it is
    0.5 MB. Data-loader workers pickle, and the trainer copies to the GPU, that much less (the training
    profile showed ~41 ms per step of pageable host-to-device copies of BitMasks). The dense masks are
    made on the device, where the mask head asks for them (``crop_and_resize`` through ``tensor``).
    """

    def __init__(self, labels: torch.Tensor, layers: torch.Tensor, ids: torch.Tensor):
        # no BitMasks.__init__: ``tensor`` is derived here, not stored
        if labels.dim() != 3:
            raise ValueError(f"labels must be LxHxW, got shape {tuple(labels.shape)}")
        self.labels = labels
        self.layers = layers.to(torch.int64)
        self.ids = ids.to(torch.int64)
        self.image_size = tuple(labels.shape[1:])

    @property
    def tensor(self) -> torch.Tensor:  # type: ignore[override]
        """The NxHxW bool masks, built on the labels' device."""
        ids = self.ids.to(self.labels.dtype)[:, None, None]
        return self.labels[self.layers] == ids

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, *args: Any, **kwargs: Any) -> LabelMasks:
        return LabelMasks(self.labels.to(*args, **kwargs), self.layers.to(*args, **kwargs),
                          self.ids.to(*args, **kwargs))

    def __getitem__(self, item: int | slice | torch.Tensor) -> LabelMasks:
        if isinstance(item, int):
            item = slice(item, item + 1 if item != -1 else None)
        return LabelMasks(self.labels, self.layers[item], self.ids[item])

    def __repr__(self) -> str:
        return f"LabelMasks(num_instances={len(self)}, layers={self.labels.shape[0]}, image_size={self.image_size})"
