"""NucleusPredictor: detectron2's DefaultPredictor for microscopy, batched, tiled and size-aware.

Images of any bit depth and channel count are normalised exactly as in training
(``normalize_from_cfg``), optionally rescaled so nuclei have the diameter the model was trained on,
run through the model in batches (fp16 autocast on CUDA, bf16 on CPUs with AMX/AVX512-BF16) and brought
back to full resolution.

Speed on GPU comes from: one backbone pass per batch of same-size images; detectron2's per-image
NMS loops replaced, on this model only, by one exact batched NMS (``speed_up_inference``);
GroupNorm kept in half precision under autocast; masks pasted only inside a small window around
each box (the same sampling grid as ``paste_masks_in_image``, so the same pixels) and kept on the
device; and the next batch normalised on a CPU thread while the GPU runs this one.
"""

from __future__ import annotations

import logging
import os
import re
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads.cascade_rcnn import CascadeROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import Boxes, Instances
from torch.nn import functional as F
from tqdm import tqdm

from ..data.io import check_image_shape, normalize_from_cfg
from ..data.transforms import median_diameter
from .precision import inference_amp_dtype, use_half_group_norm
from .tiling import LabelPrediction, Stitcher, Tile, TileInstances, finalize_labels, make_tiles

logger = logging.getLogger(__name__)

Diameter = Union[float, str, None]
AUTO_SCALE_RANGE = (0.25, 4.0)  # an estimated diameter further off than this is more likely wrong
RESCALE_TOLERANCE = 0.05  # an auto scale this close to 1 reuses the first pass
# "auto" for models that know one size band: nuclei far from it are found poorly, so the estimate is
# refined from the rescaled pass (at most AUTO_MAX_PASSES in all), and a pass with no confident nucleus
# is retried at these scales before giving up
AUTO_REFINE_TOLERANCE = 0.1
AUTO_MAX_PASSES = 3
AUTO_PROBE_SCALES = (2.0, 0.5)
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


def _keep_scores(det: Detections, score_thresh: float) -> Detections:
    keep = det.scores >= score_thresh
    return Detections(det.image_shape, det.boxes[keep], det.scores[keep], det.classes[keep], det.windows[keep],
                      det.oy[keep], det.ox[keep])


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


def windows_to_masks(windows: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                     image_shape: tuple[int, int]) -> torch.Tensor:
    """Full-image NxHxW bool masks from windows (the ``pred_masks`` DefaultPredictor returns)."""
    n, win_h, win_w = windows.shape
    masks = torch.zeros((n, int(image_shape[0]), int(image_shape[1])), dtype=torch.bool,
                        device=windows.device)
    if n:
        rows = oy[:, None, None] + torch.arange(win_h, device=windows.device)[None, :, None]
        cols = ox[:, None, None] + torch.arange(win_w, device=windows.device)[None, None, :]
        masks[torch.arange(n, device=windows.device)[:, None, None], rows, cols] = windows
    return masks


def windows_to_label(windows: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, scores: torch.Tensor,
                     image_shape: tuple[int, int]) -> torch.Tensor:
    """Label image (id k+1 for instance k) painted lowest score first, as ``masks_to_label_image``.

    Runs on the device with one scatter (max of paint order per pixel), no per-instance loop.
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
    rows = oy[:, None, None] + torch.arange(win_h, device=device)[None, :, None]
    cols = ox[:, None, None] + torch.arange(win_w, device=device)[None, None, :]
    flat = (rows * width + cols).reshape(-1)
    values = torch.where(windows, rank[:, None, None], 0).reshape(-1)
    labels.scatter_reduce_(0, flat, values, reduce="amax")
    id_of_rank = torch.cat([torch.zeros(1, dtype=torch.long, device=device), order + 1])
    return id_of_rank[labels].view(height, width).int()


# ---- batched, exact replacements for detectron2's per-image NMS loops ------------------------------
# torchvision's CUDA NMS ends in a one-block kernel that walks the boxes one by one (~1 us each), and
# detectron2 calls it image by image, each call followed by a host sync. With ~7000 RPN boxes and 2000
# detections per 512 px image that was a third of the GPU time. Here all images (and FPN levels) go
# through one greedy NMS at once; the result is the same keep set (same IoU arithmetic, same order).

# torchvision.ops.batched_nms switches from its coordinate-offset trick to one NMS per class above
# this many box coordinates; the offsets change the IoU rounding, so the same switch is mirrored here.
_TV_TRICK_LIMIT = {"cpu": 4000, "cuda": 100_000 if tuple(
    int(v) for v in re.findall(r"\d+", torchvision.__version__)[:2]) >= (0, 22) else 20_000}
NMS_CHUNK = 1 << 26  # IoU matrix entries per step (bounds temporary memory)


def batched_nms_keep(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                     iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of G independent groups at once: ``(G, n)`` keep mask, exactly torchvision's.

    Same visiting order (stable, by descending score), same IoU arithmetic as torchvision's kernel;
    instead of a serial walk, "kept" is iterated to its fixed point (a box is kept unless a kept,
    higher-scoring box overlaps it), which is the greedy result and takes a few parallel steps.
    """
    g, n = scores.shape
    keep_out = torch.zeros((g, n), dtype=torch.bool, device=scores.device)
    if g == 0 or n == 0:
        return keep_out
    step = max(1, NMS_CHUNK // (n * n))
    later = torch.ones((n, n), dtype=torch.bool, device=scores.device).triu(1)
    for lo in range(0, g, step):
        sl = slice(lo, min(g, lo + step))
        score = torch.where(valid[sl], scores[sl], torch.tensor(float("-inf"), device=scores.device))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        box = torch.gather(boxes[sl], 1, order[..., None].expand(-1, -1, 4))
        ok = torch.gather(valid[sl], 1, order)
        x1, y1, x2, y2 = box.unbind(-1)
        area = (x2 - x1) * (y2 - y1)
        w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :]))
        h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :]))
        inter = w.clamp(min=0) * h.clamp(min=0)
        iou = inter / (area[:, :, None] + area[:, None, :] - inter)
        del w, h
        suppress = (iou.double() > iou_threshold) & later & ok[:, :, None] & ok[:, None, :]
        del iou, inter
        keep = ok
        for _ in range(n):
            new = ok & ~(suppress & keep[:, :, None]).any(dim=1)
            if torch.equal(new, keep):
                break
            keep = new
        keep_out[sl] = torch.zeros_like(keep).scatter_(1, order, keep)
    return keep_out


def _clip(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``Boxes.clip`` for a batch: (B, N, 4) boxes, (B, 2) image (h, w)."""
    h, w = sizes[:, 0, None], sizes[:, 1, None]
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x1 = torch.minimum(torch.maximum(boxes[..., 0], zero), w)
    y1 = torch.minimum(torch.maximum(boxes[..., 1], zero), h)
    x2 = torch.minimum(torch.maximum(boxes[..., 2], zero), w)
    y2 = torch.minimum(torch.maximum(boxes[..., 3], zero), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def _group_nms(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, groups: list[slice],
               iou_threshold: float) -> torch.Tensor:
    """NMS per image (dim 0) and per column segment (``groups``, e.g. FPN levels), as batched_nms does.

    Mirrors torchvision's choice between offsetting boxes per group and one NMS per group, per image.
    """
    b = boxes.shape[0]
    if len(groups) > 1:
        nonzero = valid.sum(dim=1)
        limit = _TV_TRICK_LIMIT.get(boxes.device.type, _TV_TRICK_LIMIT["cuda"])
        trick = (nonzero * 4 <= limit)
        top = torch.where(valid[..., None], boxes, torch.tensor(float("-inf"), device=boxes.device)).amax(dim=(1, 2))
        shift = torch.where(trick, top + torch.tensor(1).to(boxes), torch.zeros_like(top))
        offsets = torch.cat([torch.full((g.stop - g.start,), i, dtype=boxes.dtype, device=boxes.device)
                             for i, g in enumerate(groups)])
        boxes = boxes + (offsets[None, :] * shift[:, None])[..., None]
    n = max(g.stop - g.start for g in groups)
    gb = boxes.new_zeros((b, len(groups), n, 4))
    gs = scores.new_zeros((b, len(groups), n))
    gv = torch.zeros((b, len(groups), n), dtype=torch.bool, device=boxes.device)
    for i, g in enumerate(groups):
        m = g.stop - g.start
        gb[:, i, :m], gs[:, i, :m], gv[:, i, :m] = boxes[:, g], scores[:, g], valid[:, g]
    keep = batched_nms_keep(gb.flatten(0, 1), gs.flatten(0, 1), gv.flatten(0, 1), iou_threshold)
    keep = keep.view(b, len(groups), n)
    return torch.cat([keep[:, i, :g.stop - g.start] for i, g in enumerate(groups)], dim=1)


def _top_kept(scores: torch.Tensor, keep: torch.Tensor, topk: int) -> tuple[torch.Tensor, list[int]]:
    """Per row, indices of kept entries by descending score (stable), at most ``topk``; and counts."""
    order = torch.sort(torch.where(keep, scores, torch.tensor(float("-inf"), device=scores.device)),
                       dim=1, descending=True, stable=True).indices
    counts = keep.sum(dim=1)
    if topk >= 0:
        order, counts = order[:, :topk], counts.clamp(max=topk)
    return order, counts.tolist()  # the one host sync of the stage


def _fast_predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
    """detectron2's ``RPN.predict_proposals`` + ``find_top_rpn_proposals``, all images at once."""
    if self.training:
        return type(self).predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas,
                                            image_sizes)
    with torch.no_grad():
        proposals = self._decode_proposals(anchors, pred_anchor_deltas)
        pre, post = self.pre_nms_topk[False], self.post_nms_topk[False]
        b = len(image_sizes)
        batch_idx = torch.arange(b, device=proposals[0].device)
        top_scores, top_boxes, groups, start = [], [], [], 0
        for boxes_i, logits_i in zip(proposals, pred_objectness_logits):  # identical to detectron2
            k = min(logits_i.shape[1], pre)
            scores_i, idx = logits_i.topk(k, dim=1)
            top_scores.append(scores_i)
            top_boxes.append(boxes_i[batch_idx[:, None], idx])
            groups.append(slice(start, start + k))
            start += k
        scores = torch.cat(top_scores, dim=1)
        boxes = torch.cat(top_boxes, dim=1)
        valid = torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
        sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)
        boxes = _clip(torch.where(valid[..., None], boxes, torch.zeros_like(boxes)), sizes)
        valid &= ((boxes[..., 2] - boxes[..., 0]) > self.min_box_size) & (
            (boxes[..., 3] - boxes[..., 1]) > self.min_box_size)
        keep = _group_nms(boxes, scores, valid, groups, self.nms_thresh)
        order, counts = _top_kept(scores, keep, post)
        results = []
        for i, size in enumerate(image_sizes):
            sel = order[i, :counts[i]]
            res = Instances(size)
            res.proposal_boxes = Boxes(boxes[i, sel])
            res.objectness_logits = scores[i, sel]
            results.append(res)
        return results


def _fast_box_inference(self, predictions, proposals):
    """detectron2's ``FastRCNNOutputLayers.inference``, through :func:`batched_fast_rcnn_inference`."""
    return batched_fast_rcnn_inference(
        self.predict_boxes(predictions, proposals), self.predict_probs(predictions, proposals),
        [x.image_size for x in proposals], self.test_score_thresh, self.test_nms_thresh, self.test_topk_per_image)


def batched_fast_rcnn_inference(boxes, scores, image_shapes, score_thresh, nms_thresh, topk_per_image):
    """detectron2's ``fast_rcnn_inference`` (same arguments, same detections) for one class, all images at
    once: one NMS call instead of one per image."""
    if not boxes or boxes[0].shape[1] != 4 or scores[0].shape[1] != 2:
        return fast_rcnn_inference(boxes, scores, image_shapes, score_thresh, nms_thresh, topk_per_image)
    counts = [len(x) for x in boxes]
    n = max(counts)
    b = len(boxes)
    box = boxes[0].new_zeros((b, n, 4))
    score = scores[0].new_zeros((b, n, 2))
    present = torch.zeros((b, n), dtype=torch.bool, device=box.device)
    for i, (bx, sc) in enumerate(zip(boxes, scores)):
        box[i, :len(bx)], score[i, :len(sc)], present[i, :len(bx)] = bx, sc, True
    valid = present & torch.isfinite(box).all(dim=2) & torch.isfinite(score).all(dim=2)
    sizes = torch.tensor([tuple(x) for x in image_shapes], dtype=box.dtype, device=box.device)
    box = _clip(torch.where(valid[..., None], box, torch.zeros_like(box)), sizes)
    fg = score[..., 0]
    valid &= fg > score_thresh
    keep = _group_nms(box, fg, valid, [slice(0, n)], nms_thresh)
    order, kept = _top_kept(fg, keep, topk_per_image)
    results, indices = [], []
    for i, shape in enumerate(image_shapes):
        sel = order[i, :kept[i]]
        res = Instances(tuple(shape))
        res.pred_boxes = Boxes(box[i, sel])
        res.scores = fg[i, sel]
        res.pred_classes = torch.zeros_like(sel)
        results.append(res)
        indices.append(sel)
    return results, indices


def _fast_cascade_forward_box(self, features, proposals, targets=None):
    """Cascade R-CNN's ``_forward_box`` with the final NMS batched: detectron2's inference branch (stages in
    turn, scores averaged over stages, the last stage's boxes) with :func:`batched_fast_rcnn_inference` in
    place of its per-image ``fast_rcnn_inference``."""
    if self.training:
        return type(self)._forward_box(self, features, proposals, targets)
    features = [features[f] for f in self.box_in_features]
    image_sizes = [x.image_size for x in proposals]
    scores_per_stage, boxes = [], None
    for k in range(self.num_cascade_stages):
        if k > 0:
            proposals = self._create_proposals_from_boxes(boxes, image_sizes)
        predictions = self._run_stage(features, proposals, k)
        boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
        scores_per_stage.append(self.box_predictor[k].predict_probs(predictions, proposals))
    scores = [sum(list(per_image)) * (1.0 / self.num_cascade_stages) for per_image in zip(*scores_per_stage)]
    last = self.box_predictor[-1]
    instances, _ = batched_fast_rcnn_inference(boxes, scores, image_sizes, last.test_score_thresh,
                                               last.test_nms_thresh, last.test_topk_per_image)
    return instances


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


def final_box_predictor(model: torch.nn.Module) -> torch.nn.Module | None:
    """The box predictor whose score threshold and NMS decide the detections: Cascade R-CNN's last stage."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    return predictor[-1] if isinstance(predictor, torch.nn.ModuleList) else predictor


def speed_up_inference(model: torch.nn.Module) -> None:
    """Swap, on this model instance only, detectron2's per-image NMS loops for the batched exact ones
    and GroupNorm for the half-precision one (other models and DefaultPredictor are untouched)."""
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None and type(rpn).predict_proposals is RPN.predict_proposals:
        rpn.predict_proposals = types.MethodType(_fast_predict_proposals, rpn)
    heads = getattr(model, "roi_heads", None)
    box_predictor = getattr(heads, "box_predictor", None)
    if getattr(type(heads), "_forward_box", None) is CascadeROIHeads._forward_box:
        # the cascade runs its final NMS itself, never its stages' ``inference``
        heads._forward_box = types.MethodType(_fast_cascade_forward_box, heads)
    elif getattr(type(box_predictor), "inference", None) is FastRCNNOutputLayers.inference:
        box_predictor.inference = types.MethodType(_fast_box_inference, box_predictor)
    use_half_group_norm(model)


def diameter_to_scale(diameter: float, train_diameter: float) -> float:
    """Input rescale factor that makes nuclei of ``diameter`` px look like training ones."""
    if diameter <= 0 or train_diameter <= 0:
        return 1.0
    return train_diameter / diameter


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with detectron2's own transform (what DefaultPredictor resizes with)."""
    height, width = image.shape[:2]
    if (height, width) == tuple(size):
        return image
    return T.ResizeTransform(height, width, size[0], size[1]).apply_image(image)


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _prefetched(chunks: Sequence[Sequence[Any]], prepare: Callable[[Any], Any]) -> Iterator[list[Any]]:
    """Yield each chunk prepared, preparing the next one on a thread while the caller uses this one."""
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(lambda c: [prepare(x) for x in c], chunks[0])
        for k in range(len(chunks)):
            ready = job.result()
            if k + 1 < len(chunks):
                job = pool.submit(lambda c: [prepare(x) for x in c], chunks[k + 1])
            yield ready


class NucleusPredictor:
    """Drop-in for detectron2's ``DefaultPredictor`` that takes microscopy images as they are stored.

    ``predictor(image)`` returns ``{"instances": Instances}`` at the image's resolution, with
    ``pred_boxes``, ``scores``, ``pred_classes`` and ``pred_masks`` (NxHxW bool) on the model's
    device, as DefaultPredictor does. ``image`` is HxW or HxWxC (C 1-4, RGB(A) order as
    ``read_image`` returns it), 8/16-bit or float; as in training (the dataset mapper) it is
    normalised with ``normalize_from_cfg`` and put in ``INPUT.FORMAT`` channel order. With
    ``INPUT.NORMALIZE`` METHOD "none", GRAY False and INVERT "never", a uint8 RGB image reaches the
    model exactly as its BGR version reaches DefaultPredictor, so outputs match on the same weights
    (gray images, the default, need no flip). ``fast=False`` keeps detectron2's own per-image NMS
    and fp32 GroupNorm (``speed_up_inference`` gives the same detections, batched).
    """

    def __init__(self, cfg, *, channels_last: bool = False, fast: bool = True):
        self.cfg = cfg.clone()  # the model may modify it, as DefaultPredictor notes
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(self.cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(self.cfg.DATASETS.TEST[0])
        self.device = torch.device(self.cfg.MODEL.DEVICE)
        weights = self.cfg.MODEL.WEIGHTS
        if weights:
            if "://" not in weights and not os.path.isfile(weights):
                raise FileNotFoundError(f"MODEL.WEIGHTS {weights}: no such checkpoint file")
            DetectionCheckpointer(self.model).load(weights)
        else:
            warnings.warn(
                "MODEL.WEIGHTS is empty: the model has random weights and its output is meaningless "
                "(set MODEL.WEIGHTS to a trained checkpoint)", UserWarning, stacklevel=2,
            )
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT must be BGR or RGB, got {self.input_format!r}")
        if fast:  # same outputs, batched NMS and half-precision GroupNorm (see speed_up_inference)
            speed_up_inference(self.model)
        pred = self.cfg.NUCLEUS.PREDICT
        self.batch_size = max(1, int(pred.BATCH_SIZE))
        self.amp_dtype = inference_amp_dtype(self.device) if pred.AMP else None
        self.amp = self.amp_dtype is not None
        self.score_thresh = float(pred.SCORE_THRESH)
        self.diameter_score_thresh = float(pred.DIAMETER_SCORE_THRESH)
        self.train_diameter = float(pred.TRAIN_DIAMETER)
        self.tta = bool(pred.TTA)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(self.cfg.CUDNN_BENCHMARK)
            if channels_last:
                self.model.backbone.to(memory_format=torch.channels_last)
        if self.cfg.INPUT.MIN_SIZE_TEST:
            self.aug = T.ResizeShortestEdge(
                [self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MIN_SIZE_TEST], self.cfg.INPUT.MAX_SIZE_TEST
            )
        else:
            self.aug = None

    # ---- public API -------------------------------------------------------------------------------

    def __call__(self, original_image: np.ndarray, diameter: Diameter = None) -> dict[str, Instances]:
        """Predict one image: ``{"instances": Instances}`` at its original resolution."""
        return self.predict_batch([original_image], diameter=diameter)[0]

    def predict_batch(self, images: Sequence[np.ndarray], diameter: Diameter = None) -> list[dict]:
        """``predictor(image)`` for many images, ``NUCLEUS.PREDICT.BATCH_SIZE`` per forward pass."""
        out = []
        for det in self._detect(images, diameter):
            inst = Instances(det.image_shape)
            inst.pred_boxes = Boxes(det.boxes)
            inst.scores = det.scores
            inst.pred_classes = det.classes
            inst.pred_masks = windows_to_masks(det.windows, det.oy, det.ox, det.image_shape)
            out.append({"instances": inst})
        return out

    def predict_labels(self, images: Sequence[np.ndarray], diameter: Diameter = None,
                       score_thresh: float | None = None) -> list[LabelPrediction]:
        """One label image per input (instances scoring >= ``score_thresh``, highest score on top).

        Cheaper than ``predict_batch`` for label output: full-image masks are never made, the label
        image is painted on the device and only it comes back to the host.
        """
        thresh = self.score_thresh if score_thresh is None else float(score_thresh)
        out = []
        for det in self._detect(images, diameter, score_thresh=thresh):
            labels = windows_to_label(det.windows, det.oy, det.ox, det.scores, det.image_shape)
            out.append(finalize_labels(labels.cpu().numpy(), det.scores.cpu().numpy(),
                                       det.boxes.cpu().numpy()))
        return out

    def predict_large(self, image: np.ndarray, tile: int | None = None, overlap: int | None = None,
                      diameter: Diameter = None, score_thresh: float | None = None,
                      progress: bool = False) -> LabelPrediction:
        """Label image of an image of any size, predicted tile by tile and stitched on the fly.

        ``tile`` and ``overlap`` are in model pixels (after the diameter rescale); the overlap should
        exceed the largest nucleus. Memory: the image, its normalised copy and one label image, plus
        one batch of tiles; no per-instance full-image masks. The seam rule is in ``tiling``.
        """
        bar = tqdm(desc="tiles", unit="tile", disable=not progress, leave=False)
        for done, total, last in self.predict_large_steps(image, tile, overlap, diameter, score_thresh):
            bar.total = total
            bar.update(done - bar.n)
            result = last
        bar.close()
        return result

    def predict_large_steps(self, image: np.ndarray, tile: int | None = None, overlap: int | None = None,
                            diameter: Diameter = None, score_thresh: float | None = None,
                            ) -> Iterator[tuple[int, int, LabelPrediction | None]]:
        """``predict_large`` one batch of tiles at a time, for callers that show progress or may stop
        early (the napari widget): yields ``(tiles done, tiles in all, None)`` after each batch, and
        ``(total, total, result)`` last. Closing the generator stops the work between batches."""
        pred = self.cfg.NUCLEUS.PREDICT
        tile = int(pred.TILE_SIZE if tile is None else tile)
        overlap = int(pred.TILE_OVERLAP if overlap is None else overlap)
        thresh = self.score_thresh if score_thresh is None else float(score_thresh)
        norm = self._normalize(image)
        height, width = norm.shape[:2]
        scale = self.input_scale(diameter)
        if scale is None:
            scale = self._estimate_scale_tiled(norm, tile, overlap)
        # tiles are cut from the original image, so their size there is the model tile / scale
        tiles = make_tiles((height, width), max(1, round(tile / scale)), max(0, round(overlap / scale)))
        stitcher = Stitcher((height, width), edge_margin=max(1.0, 1.0 / scale))
        done = 0
        for dets, chunk in self._detect_tiles(norm, tiles, scale, thresh):
            for det, t in zip(dets, chunk):
                stitcher.add(t, TileInstances(
                    det.windows.cpu().numpy(),
                    torch.stack([det.oy, det.ox], dim=1).cpu().numpy(),
                    det.scores.cpu().numpy(), det.boxes.cpu().numpy(),
                ))
            done += len(chunk)
            if done < len(tiles):
                yield done, len(tiles), None
        if stitcher.num_cut:
            logger.warning(
                "%d nuclei touched tile seams (larger than the %d px overlap): their pieces were merged "
                "where they matched; a larger overlap gives cleaner results", stitcher.num_cut, overlap,
            )
        yield len(tiles), len(tiles), stitcher.finish()

    # ---- internals --------------------------------------------------------------------------------

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 in the model's channel order, exactly as the training mapper makes it."""
        norm = normalize_from_cfg(check_image_shape(np.asarray(image)), self.cfg)
        if self.input_format == "RGB" or self.cfg.INPUT.NORMALIZE.GRAY:  # gray: all channels equal
            return norm
        return np.ascontiguousarray(norm[..., ::-1])

    def input_scale(self, diameter: Diameter = None) -> float | None:
        """Model-input scale for ``diameter`` (None: the config's); None means "auto" (estimate it)."""
        value = self.cfg.NUCLEUS.PREDICT.DIAMETER if diameter is None else diameter
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return None
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"diameter must be a number of pixels or 'auto', got {value!r}") from None
        value = float(value)
        if value < 0:
            return None
        return diameter_to_scale(value, self.train_diameter)

    def _model_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        if scale == 1.0 and self.aug is not None:  # DefaultPredictor's test-time resize
            return T.ResizeShortestEdge.get_output_shape(
                height, width, self.aug.short_edge_length[0], self.aug.max_size)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _found_diameter(self, dets: Sequence[Detections], thresh: float) -> float | None:
        """Median diameter (input px) of the confident instances; None when there are none."""
        areas = [d.windows[d.scores >= thresh].sum(dim=(1, 2)) for d in dets]
        return median_diameter(torch.cat(areas).cpu().numpy() if areas else np.zeros(0))

    def _auto_scale(self, found: float) -> float:
        scale = diameter_to_scale(found, self.train_diameter)
        lo, hi = AUTO_SCALE_RANGE
        if not lo <= scale <= hi:
            warnings.warn(f"diameter 'auto': estimated {found:.1f} px, rescale x{scale:.2f} clipped to "
                          f"[{lo}, {hi}]; pass the diameter explicitly", UserWarning, stacklevel=4)
            scale = min(max(scale, lo), hi)
        logger.info("estimated nucleus diameter %.1f px, rescaling by %.3f", found, scale)
        return scale

    def _refine_scale(self, run_pass: Callable[[float], list[Detections]], dets: list[Detections],
                      thresh: float) -> tuple[float, list[Detections]]:
        """'auto' (Cellpose-style): the median diameter of the confident instances sets the scale.

        A model trained on one size band finds nuclei far from it poorly, so the estimate is refined
        from the rescaled pass, and a pass without confident nuclei is retried at AUTO_PROBE_SCALES;
        at most AUTO_MAX_PASSES passes in all. Returns (scale, detections at that scale).
        """
        first = dets
        used, passes, best = 1.0, 1, None
        probes = list(AUTO_PROBE_SCALES)
        while True:
            found = self._found_diameter(dets, thresh)
            if found is not None:
                best, probes = (used, dets), []
                want = self._auto_scale(found)
                if abs(want / used - 1.0) <= (RESCALE_TOLERANCE if passes == 1 else AUTO_REFINE_TOLERANCE):
                    break
            elif probes:
                want = probes.pop(0)
            else:
                break
            if passes == AUTO_MAX_PASSES:
                break
            used, dets, passes = want, run_pass(want), passes + 1
        if best is None:
            warnings.warn("diameter 'auto': no confident nuclei at any probed scale; not rescaling",
                          UserWarning, stacklevel=4)
            return 1.0, first
        return best

    def _detect(self, images: Sequence[np.ndarray], diameter: Diameter,
                score_thresh: float | None = None) -> list[Detections]:
        scale = self.input_scale(diameter)

        def prepare(image: np.ndarray, scale: float | None) -> tuple[np.ndarray, np.ndarray]:
            norm = self._normalize(image)
            size = self._model_size(*norm.shape[:2], 1.0 if scale is None else scale)
            return norm, _resize(norm, size)

        # Images of one size go through together: padding a smaller image up to a larger one changes
        # GroupNorm's statistics, so mixed batches would depend on their company.
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(tuple(np.shape(image)[:2]), []).append(i)
        chunks = [c for group in by_shape.values() for c in _chunks(group, self.batch_size)]
        results: list[Detections | None] = [None] * len(images)
        norms: dict[int, np.ndarray] = {}
        # 'auto' passes keep what the diameter estimate needs as well as what the output keeps
        floor = score_thresh if scale is not None or score_thresh is None else min(
            score_thresh, self.diameter_score_thresh)
        for chunk, prepared in zip(chunks, _prefetched(chunks, lambda i: prepare(images[i], scale))):
            raws = self._forward([p[1] for p in prepared], floor)
            dets = self._to_images(raws, prepared[0][0].shape[:2], floor)
            for i, (norm, _), det in zip(chunk, prepared, dets):
                results[i] = det
                if scale is None:
                    norms[i] = norm
        for i, norm in norms.items():
            def run_pass(s: float, norm: np.ndarray = norm) -> list[Detections]:
                arrays = [_resize(norm, self._model_size(*norm.shape[:2], s))]
                return self._to_images(self._forward(arrays, floor), norm.shape[:2], floor)

            det = self._refine_scale(run_pass, [results[i]], self.diameter_score_thresh)[1][0]
            results[i] = det if floor == score_thresh else _keep_scores(det, score_thresh)
        return results

    def _estimate_scale_tiled(self, norm: np.ndarray, tile: int, overlap: int) -> float:
        """'auto' for large images: the passes run on up to four tiles spread over the image."""
        def run_pass(scale: float) -> list[Detections]:
            tiles = make_tiles(norm.shape[:2], max(1, round(tile / scale)), max(0, round(overlap / scale)))
            picks = [tiles[i] for i in np.unique(np.linspace(0, len(tiles) - 1, min(4, len(tiles))).round()
                                                 .astype(int))]
            return [d for ds, _ in self._detect_tiles(norm, picks, scale, None) for d in ds]

        return self._refine_scale(run_pass, run_pass(1.0), self.diameter_score_thresh)[0]

    def _detect_tiles(self, norm: np.ndarray, tiles: Sequence[Tile], scale: float,
                      score_thresh: float | None) -> Iterator[tuple[list[Detections], Sequence[Tile]]]:
        """Detections of each tile, in full-image coordinates, one batch of tiles at a time."""
        def prepare(t: Tile) -> np.ndarray:
            crop = norm[t.y0:t.y1, t.x0:t.x1]
            return _resize(crop, (max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))))

        chunks = _chunks(tiles, self.batch_size)
        for chunk, crops in zip(chunks, _prefetched(chunks, prepare)):
            raws = self._forward(crops, score_thresh)
            yield self._to_images(raws, norm.shape[:2], score_thresh, frames=chunk), chunk

    @contextmanager
    def _score_floor(self, score_thresh: float | None) -> Iterator[None]:
        """Detections below ``score_thresh`` dropped before the mask head instead of after it.

        Label outputs keep only scores >= the threshold. Greedy NMS never lets a lower-scoring box
        suppress a higher one, so filtering first keeps exactly the same detections above it, and the
        mask head (the costliest part at hundreds of detections) runs on those alone.
        """
        box_predictor = final_box_predictor(self.model)
        if score_thresh is None or not hasattr(box_predictor, "test_score_thresh"):
            yield
            return
        old = box_predictor.test_score_thresh
        # detectron2 keeps scores > test_score_thresh; the label outputs keep scores >= score_thresh
        just_below = float(np.nextafter(np.float32(score_thresh), np.float32(-np.inf)))
        box_predictor.test_score_thresh = max(old, just_below)
        try:
            yield
        finally:
            box_predictor.test_score_thresh = old

    def _forward(self, arrays: Sequence[np.ndarray], score_thresh: float | None = None) -> list[Instances]:
        """Raw model outputs (model-input frame, soft 28x28 masks) for uint8 HxWx3 arrays; with
        ``score_thresh`` only detections scoring at least that (see ``_score_floor``)."""
        tensors: list[torch.Tensor]
        non_blocking = self.device.type == "cuda"
        if len({a.shape for a in arrays}) == 1:  # one host-to-device copy for the whole batch
            batch = torch.from_numpy(np.stack(arrays))
            if non_blocking:
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=non_blocking).permute(0, 3, 1, 2).float()
            tensors = list(batch)
        else:
            tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device).permute(2, 0, 1).float()
                       for a in arrays]
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp else nullcontext()
        if self.tta:
            with torch.no_grad(), autocast:
                return self._forward_flips(tensors)
        inputs = [{"image": t, "height": t.shape[1], "width": t.shape[2]} for t in tensors]
        with torch.no_grad(), autocast, self._score_floor(score_thresh):
            return self.model.inference(inputs, do_postprocess=False)

    def _forward_flips(self, tensors: Sequence[torch.Tensor]) -> list[Instances]:
        """Test-time augmentation by the four flips: detections fused over the views
        (``fuse_flip_detections``), then each view's mask head on the fused boxes and the soft masks,
        mapped back, averaged. One backbone pass per view (detectron2's TTA runs two)."""
        model = self.model
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

    def _to_images(self, raws: Sequence[Instances], image_shape: tuple[int, int],
                   score_thresh: float | None, frames: Sequence[Tile] | None = None) -> list[Detections]:
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
            return [d for k, r in enumerate(raws) for d in self._to_images(
                [r], image_shape, score_thresh, None if frames is None else [frames[k]])]
        (model_h, model_w), (out_h, out_w) = model_sizes.pop(), out_sizes.pop()
        device = raws[0].scores.device
        counts = torch.tensor([len(r) for r in raws], device=device)
        owner = torch.repeat_interleave(torch.arange(len(raws), device=device), counts)
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
            offsets = torch.tensor([[t.x0, t.y0, t.x0, t.y0] for t in frames], dtype=box.dtype, device=device)
            box = box + offsets[owner]
        probs = torch.cat([r.pred_masks[:, 0] for r in raws])[idx]
        windows, oy, ox = paste_mask_windows(probs, box, image_shape)
        classes = torch.cat([r.pred_classes for r in raws])[idx]
        sizes = torch.bincount(owner, minlength=len(raws)).tolist()
        shape = (int(image_shape[0]), int(image_shape[1]))
        parts = [t.split(sizes) for t in (box, scores[idx], classes, windows, oy, ox)]
        return [Detections(shape, *fields) for fields in zip(*parts)]
