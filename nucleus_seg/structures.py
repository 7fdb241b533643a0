"""Conversions between per-instance masks and label images, shared by evaluation, prediction and data."""

from __future__ import annotations

import numpy as np


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
