"""Detections as small mask windows, pasted and painted on the model's device.

A detection's soft 28x28 mask is pasted only inside a window around its box (the same sampling grid as
detectron2's ``paste_masks_in_image``, so the same pixels), and label images are painted from the windows
with one scatter: full-image masks are made only when an API caller asks for ``pred_masks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from detectron2.structures import Instances
from torch.nn import functional as F

from .tiling import Tile

__all__ = ["Detections", "detections_from_outputs", "keep_scores", "paste_mask_windows", "select_detections",
           "window_pixels", "windows_to_label", "windows_to_masks"]

PASTE_BUDGET = 1 << 25  # window pixels sampled per grid_sample call (bounds memory)


@dataclass
class Detections:
    """One image's detections at the resolution asked for, on the model's device.

    Masks are windows: ``windows[k]`` covers rows ``oy[k]:oy[k]+h`` and columns ``ox[k]:ox[k]+w``.
    """

    image_shape: tuple[int, int]
    boxes: torch.Tensor  # (N, 4) XYXY float32
    scores: torch.Tensor  # (N,)
    classes: torch.Tensor  # (N,)
    windows: torch.Tensor  # (N, h, w) bool
    oy: torch.Tensor  # (N,) long
    ox: torch.Tensor  # (N,) long


def select_detections(det: Detections, keep: torch.Tensor) -> Detections:
    """The detections where ``keep`` (bool, on their device) is true."""
    return Detections(det.image_shape, det.boxes[keep], det.scores[keep], det.classes[keep], det.windows[keep],
                      det.oy[keep], det.ox[keep])


def keep_scores(det: Detections, score_thresh: float) -> Detections:
    return select_detections(det, det.scores >= score_thresh)


def paste_mask_windows(
    mask_probs: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int], threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste NxMxM soft masks into their boxes, sampling only a window around each box.

    Same sampling grid as detectron2's ``paste_masks_in_image``, so the same pixels come out; pixels
    more than one pixel outside a box always sample below 0.5, so nothing is lost by not sampling
    them. One host sync (the window size). Returns ``(windows (N,h,w) bool, oy (N,), ox (N,))``;
    every window lies inside the image.
    """
    img_h, img_w = int(image_shape[0]), int(image_shape[1])
    n, device = len(mask_probs), boxes.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return torch.zeros((0, 1, 1), dtype=torch.bool, device=device), empty, empty
    boxes = boxes.float()
    start_y = (boxes[:, 1].floor() - 1).clamp(min=0)
    start_x = (boxes[:, 0].floor() - 1).clamp(min=0)
    end_y = (boxes[:, 3].ceil() + 1).clamp(max=img_h)
    end_x = (boxes[:, 2].ceil() + 1).clamp(max=img_w)
    size = torch.stack([(end_y - start_y).max(), (end_x - start_x).max()]).tolist()
    win_h = max(1, min(int(size[0]), img_h))
    win_w = max(1, min(int(size[1]), img_w))
    oy = start_y.clamp(max=img_h - win_h)
    ox = start_x.clamp(max=img_w - win_w)
    # identical arithmetic to detectron2's _do_paste_mask: pixel centres mapped into [-1, 1] per box
    ys = oy[:, None] + torch.arange(win_h, device=device, dtype=torch.float32) + 0.5
    xs = ox[:, None] + torch.arange(win_w, device=device, dtype=torch.float32) + 0.5
    gy = (ys - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1
    gx = (xs - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1
    probs = mask_probs.float()[:, None]
    chunk = max(1, PASTE_BUDGET // (win_h * win_w))
    windows = torch.empty((n, win_h, win_w), dtype=torch.bool, device=device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        grid = torch.stack([
            gx[lo:hi, None, :].expand(hi - lo, win_h, win_w),
            gy[lo:hi, :, None].expand(hi - lo, win_h, win_w),
        ], dim=3)
        windows[lo:hi] = F.grid_sample(probs[lo:hi], grid, align_corners=False)[:, 0] >= threshold
    return windows, oy.long(), ox.long()


def window_pixels(oy: torch.Tensor, ox: torch.Tensor, win_h: int, win_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image row and column of every window pixel, (N, h, 1) and (N, 1, w): ``image[rows, cols]`` is the (N, h, w)
    crop under the windows."""
    rows = oy[:, None, None] + torch.arange(win_h, device=oy.device)[None, :, None]
    cols = ox[:, None, None] + torch.arange(win_w, device=ox.device)[None, None, :]
    return rows, cols


def windows_to_masks(windows: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                     image_shape: tuple[int, int]) -> torch.Tensor:
    """Full-image NxHxW bool masks from windows (the ``pred_masks`` DefaultPredictor returns)."""
    n, win_h, win_w = windows.shape
    masks = torch.zeros((n, int(image_shape[0]), int(image_shape[1])), dtype=torch.bool,
                        device=windows.device)
    if n:
        rows, cols = window_pixels(oy, ox, win_h, win_w)
        masks[torch.arange(n, device=windows.device)[:, None, None], rows, cols] = windows
    return masks


def windows_to_label(windows: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, scores: torch.Tensor,
                     image_shape: tuple[int, int]) -> torch.Tensor:
    """Label image (id k+1 for instance k) painted lowest score first, as ``masks_to_label_image``.

    The device twin of :func:`nucleus_seg.structures.paint_order` (stable sort by score): one scatter of
    each pixel's highest paint rank, no per-instance loop and no host sync.
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    n, win_h, win_w = windows.shape
    device = windows.device
    labels = torch.zeros(height * width, dtype=torch.long, device=device)
    if n == 0:
        return labels.view(height, width).int()
    order = torch.sort(scores, stable=True).indices  # paint order: later wins
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(1, n + 1, device=device)
    rows, cols = window_pixels(oy, ox, win_h, win_w)
    flat = (rows * width + cols).reshape(-1)
    values = torch.where(windows, rank[:, None, None], 0).reshape(-1)
    labels.scatter_reduce_(0, flat, values, reduce="amax")
    id_of_rank = torch.cat([torch.zeros(1, dtype=torch.long, device=device), order + 1])
    return id_of_rank[labels].view(height, width).int()




def detections_from_outputs(raws: Sequence[Instances], image_shape: tuple[int, int], score_thresh: float | None,
                            frames: Sequence[Tile] | None = None) -> list[Detections]:
    """Boxes and mask windows of raw outputs, in the frame of the original image.

    As detector_postprocess: boxes scaled from the model input to the (crop of the) image,
    clipped, empty ones dropped. With ``frames``, output k is that crop placed into the image.
    The whole batch (one input size) is done at once: three host syncs per batch, not per image.
    """
    if not raws:
        return []
    model_sizes = {tuple(r.image_size) for r in raws}
    out_sizes = {tuple(image_shape)} if frames is None else {t.shape for t in frames}
    if len(model_sizes) > 1 or len(out_sizes) > 1:  # not from one group: one by one
        return [d for k, r in enumerate(raws) for d in detections_from_outputs(
            [r], image_shape, score_thresh, None if frames is None else [frames[k]])]
    (model_h, model_w), (out_h, out_w) = model_sizes.pop(), out_sizes.pop()
    device = raws[0].scores.device
    # built on the device (a tensor made from host values would wait for the GPU's queue: a sync)
    owner = torch.cat([torch.full((len(r),), k, dtype=torch.long, device=device) for k, r in enumerate(raws)])
    boxes = torch.cat([r.pred_boxes.tensor for r in raws]).float()
    boxes[:, 0::2] *= out_w / model_w  # Boxes.scale, then Boxes.clip, as detector_postprocess
    boxes[:, 1::2] *= out_h / model_h
    boxes = torch.stack([boxes[:, 0].clamp(min=0, max=out_w), boxes[:, 1].clamp(min=0, max=out_h),
                         boxes[:, 2].clamp(min=0, max=out_w), boxes[:, 3].clamp(min=0, max=out_h)], dim=1)
    scores = torch.cat([r.scores for r in raws]).float()
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    if score_thresh is not None:
        keep &= scores >= score_thresh
    idx = keep.nonzero()[:, 0]
    owner, box = owner[idx], boxes[idx]
    if frames is not None:
        offsets = torch.tensor([[t.x0, t.y0, t.x0, t.y0] for t in frames], dtype=box.dtype)
        box = box + offsets.to(device, non_blocking=True)[owner]
    probs = torch.cat([r.pred_masks[:, 0] for r in raws])[idx]
    windows, oy, ox = paste_mask_windows(probs, box, image_shape)
    classes = torch.cat([r.pred_classes for r in raws])[idx]
    sizes = torch.bincount(owner, minlength=len(raws)).tolist()
    shape = (int(image_shape[0]), int(image_shape[1]))
    parts = [t.split(sizes) for t in (box, scores[idx], classes, windows, oy, ox)]
    return [Detections(shape, *fields) for fields in zip(*parts)]
