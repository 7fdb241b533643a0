"""Exact, batched replacements for detectron2's per-image inference loops, patched onto one model instance.

torchvision's CUDA NMS ends in a one-block kernel that walks the boxes one by one (~1 us each), and
detectron2 calls it image by image, each call followed by a host sync. With ~7000 RPN boxes and 2000
detections per 512 px image that was a third of the GPU time. Here all images (and FPN levels) go
through one greedy NMS at once; the result is the same keep set (same IoU arithmetic, same order).

:func:`speed_up_inference` installs these (and half-precision GroupNorm) on one model instance: other
models, and detectron2's ``DefaultPredictor``, are untouched. The RPN's proposals are the same computation
in training (only the counts differ), so :func:`batch_rpn_proposals` also serves ``nucleus-train``
(``NUCLEUS.TRAIN.BATCHED_PROPOSALS``); the training targets are :mod:`.training_targets`' and the ROI heads'
losses detectron2's own.
"""

from __future__ import annotations

import functools
import re
import types

import torch
import torchvision
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads.cascade_rcnn import CascadeROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import Boxes, Instances

from .nms_bits import suppression_bits, suppression_bits_usable
from .precision import HALF_DTYPES, fuse_group_norm_relu, use_half_group_norm
from .roi_align import use_nucleus_roi_align

__all__ = ["batch_rpn_proposals", "batched_fast_rcnn_inference", "batched_nms_keep", "final_box_predictor",
           "speed_up_inference"]

# torchvision.ops.batched_nms switches from its coordinate-offset trick to one NMS per class above
# this many box coordinates; the offsets change the IoU rounding, so the same switch is mirrored here.
_TV_TRICK_LIMIT = {"cpu": 4000, "cuda": 100_000 if tuple(
    int(v) for v in re.findall(r"\d+", torchvision.__version__)[:2]) >= (0, 22) else 20_000}
NMS_CHUNK = 1 << 26  # IoU matrix entries per step (bounds temporary memory)
# Devices where each group goes through torchvision's own serial kernel instead: on a CPU the fixed point
# below costs n^2 work per step and took 45% of a 1024 px image's tiled inference (8.5 of 19 s, 2 cores)
SERIAL_NMS_DEVICES = ("cpu",)
# parallel NMS steps between host syncs (most groups settle within 4-12 steps): 8 since a step reads packed bits
# (the syncs were nucleus-predict's largest host cost in the H200 profile of 2026-12-05: torch.equal, 1.6 s of 17)
CONVERGENCE_CHECK = 8
EXIT_MARGIN = 1e-3  # far above the float32 rounding of a sum of three probabilities (~1e-7)


def batched_nms_keep(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                     iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of G independent groups at once: ``(G, n)`` keep mask, exactly torchvision's.

    Same visiting order (stable, by descending score), same IoU arithmetic as torchvision's kernel;
    instead of a serial walk, "kept" is iterated to its fixed point (a box is kept unless a kept,
    higher-scoring box overlaps it), which is the greedy result and takes a few parallel steps.
    On ``SERIAL_NMS_DEVICES`` each group is torchvision's ``nms`` itself.
    """
    g, n = scores.shape
    keep_out = torch.zeros((g, n), dtype=torch.bool, device=scores.device)
    if g == 0 or n == 0:
        return keep_out
    if scores.device.type in SERIAL_NMS_DEVICES:
        for i in range(g):
            idx = valid[i].nonzero().squeeze(1)
            if idx.numel():  # float32 like torchvision's autocast wrapper of nms
                box, score = boxes[i, idx], scores[i, idx]
                if box.dtype in HALF_DTYPES:
                    box, score = box.float(), score.float()
                keep_out[i, idx[torchvision.ops.nms(box, score, iou_threshold)]] = True
        return keep_out
    # groups whose n x n suppression matrices are built at once: IoU matrices in PyTorch (~16 bytes a pair in
    # temporaries), 32x as many as bits from the kernel (1/4 byte a pair with the fixed point's AND): the RPN of 64
    # images, 320 groups of 2000 boxes, is one chunk and one fixed point with its few syncs, instead of 20
    per_chunk = max(1, NMS_CHUNK * (32 if suppression_bits_usable(boxes) else 1) // (n * n))
    bits = _bit_weights(scores.device)
    for lo in range(0, g, per_chunk):
        sl = slice(lo, min(g, lo + per_chunk))
        score = torch.where(valid[sl], scores[sl], float("-inf"))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        box = torch.gather(boxes[sl], 1, order[..., None].expand(-1, -1, 4))
        ok = torch.gather(valid[sl], 1, order)
        # no mask of invalid boxes in the suppression matrix: keep starts as ok and stays within it, so an
        # invalid box neither suppresses nor is kept
        suppressed_by = _suppression_matrix(box, _below_or_at(iou_threshold, box.dtype), bits)
        keep = ok
        for steps in range(1, n + 1):
            # box j stays unless a kept box before it overlaps it: 8 boxes a byte (a bool per pair read 8x more)
            new = ok & ~(suppressed_by & _pack_bits(keep, bits)[:, None, :]).any(dim=2)
            # past the fixed point a step changes nothing, so convergence is checked (a host sync, which
            # stalls the GPU) only every CONVERGENCE_CHECK steps
            if steps % CONVERGENCE_CHECK == 0 and torch.equal(new, keep):
                break
            keep = new
        keep_out[sl] = torch.zeros_like(keep).scatter_(1, order, keep)
    return keep_out


def _suppression_matrix(box: torch.Tensor, threshold: float, bits: torch.Tensor) -> torch.Tensor:
    """``(G, n, ceil(n / 8))`` uint8 for ``(G, n, 4)`` boxes in visiting order: row j lists, 8 a byte, the boxes
    before box j whose IoU with it exceeds ``threshold`` (IoUs are symmetric, so these are the boxes that may
    suppress it). One Triton kernel on a GPU (:mod:`.nms_bits`), else IoU matrices in PyTorch; the same bits."""
    if suppression_bits_usable(box):
        return suppression_bits(box, threshold)
    n = box.shape[1]
    x1, y1, x2, y2 = box.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :]))
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :]))
    inter = w.clamp(min=0) * h.clamp(min=0)
    del w, h
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)
    del inter
    before = torch.ones((n, n), dtype=torch.bool, device=box.device).tril(-1)  # [j, i]: i before j
    return _pack_bits((iou > threshold) & before, bits)


def _bit_weights(device: torch.device) -> torch.Tensor:
    """1, 2, 4, ... 128 as uint8, made on ``device`` (from a Python list it was a host-to-device copy per step)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    return torch.ones_like(shifts) << shifts


def _pack_bits(flags: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """(..., n) bool as (..., ceil(n / 8)) uint8, 8 flags a byte (the last dimension zero-padded); ``bits`` from
    :func:`_bit_weights`."""
    n = flags.shape[-1]
    if n % 8:
        flags = torch.nn.functional.pad(flags, (0, 8 - n % 8))
    return (flags.unflatten(-1, (-1, 8)).view(torch.uint8) * bits).sum(-1, dtype=torch.uint8)


@functools.lru_cache(maxsize=32)
def _below_or_at(threshold: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` at or below ``threshold``: for x of that dtype, x > it exactly when
    x > threshold in float64, torchvision's comparison (IoU > 0.7 needed a float64 copy of every IoU matrix)."""
    t = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    if t.double().item() > threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return t.item()


def _clip(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``Boxes.clip`` for many boxes at once: (..., 4) boxes, (..., 2) image (h, w) broadcast against them."""
    h, w = sizes[..., 0], sizes[..., 1]
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
        top = torch.where(valid[..., None], boxes, float("-inf")).amax(dim=(1, 2))
        shift = torch.where(trick, top + 1, torch.zeros_like(top))
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


def _top_kept(scores: torch.Tensor, keep: torch.Tensor, topk: int,
              flag: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    """Per row, indices of kept entries by descending score (stable), at most ``topk``; and counts (followed
    by ``flag``, a 0-d integer tensor, when one is given: it comes to the host with them)."""
    order = torch.sort(torch.where(keep, scores, float("-inf")),
                       dim=1, descending=True, stable=True).indices
    counts = keep.sum(dim=1)
    if topk >= 0:
        order, counts = order[:, :topk], counts.clamp(max=topk)
    if flag is not None:
        counts = torch.cat([counts, flag.to(counts.dtype).view(1)])
    return order, counts.tolist()  # the one host sync of the stage


def _fast_predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
    """detectron2's ``RPN.predict_proposals`` + ``find_top_rpn_proposals``, all images at once.

    In training (its pre/post-NMS counts) a non-finite box or score raises detectron2's FloatingPointError, as
    there; detectron2 checks each image with a host sync, here the check comes back with the counts.
    """
    training = bool(self.training)
    with torch.no_grad():
        proposals = self._decode_proposals(anchors, pred_anchor_deltas)
        pre, post = self.pre_nms_topk[training], self.post_nms_topk[training]
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
        diverged = ~valid.all() if training else None
        sizes = torch.tensor(image_sizes, dtype=boxes.dtype).to(boxes.device, non_blocking=True)  # no sync
        boxes = _clip(torch.where(valid[..., None], boxes, torch.zeros_like(boxes)), sizes[:, None])
        valid &= ((boxes[..., 2] - boxes[..., 0]) > self.min_box_size) & (
            (boxes[..., 3] - boxes[..., 1]) > self.min_box_size)
        keep = _group_nms(boxes, scores, valid, groups, self.nms_thresh)
        order, counts = _top_kept(scores, keep, post, diverged)
        if training and counts.pop():
            raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
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
    sizes = torch.tensor([tuple(x) for x in image_shapes], dtype=box.dtype).to(box.device, non_blocking=True)
    box = _clip(torch.where(valid[..., None], box, torch.zeros_like(box)), sizes[:, None])
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
    place of its per-image ``fast_rcnn_inference``, and proposals that can no longer reach the final score
    threshold left out of the later stages (:func:`_drop_hopeless`)."""
    if self.training:
        return type(self)._forward_box(self, features, proposals, targets)
    features = [features[f] for f in self.box_in_features]
    image_sizes = [x.image_size for x in proposals]
    stages = self.num_cascade_stages
    last = self.box_predictor[-1]
    totals, boxes = None, None  # per image: each proposal's class probabilities summed over the stages so far
    for k in range(stages):
        if k > 0:
            if self.cascade_early_exit:
                boxes, totals = _drop_hopeless(boxes, totals, stages - k, stages * last.test_score_thresh)
            proposals = self._create_proposals_from_boxes(boxes, image_sizes)
        predictions = self._run_stage(features, proposals, k)
        boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
        probs = self.box_predictor[k].predict_probs(predictions, proposals)
        # detectron2 adds the stages' probabilities in this order (``sum``): the same floats
        totals = list(probs) if totals is None else [t + p for t, p in zip(totals, probs)]
    scores = [t * (1.0 / stages) for t in totals]
    instances, _ = batched_fast_rcnn_inference(boxes, scores, image_sizes, last.test_score_thresh,
                                               last.test_nms_thresh, last.test_topk_per_image)
    return instances


def _drop_hopeless(boxes: list[torch.Tensor], totals: list[torch.Tensor], stages_left: int,
                   needed: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each image's proposals (``boxes``, ``totals`` of their probabilities so far) without those whose best
    class cannot reach ``needed`` (stages x the final threshold) even if every one of the ``stages_left`` later
    stages gives it probability 1: exact, since the final score is the mean over stages and a probability is
    at most 1. Of three stages, at a threshold of 0.9 stage two runs only on what stage one scored >= 0.7 and
    stage three on what the two scored >= 1.7 together; at 0.5 stage three on what they scored >= 0.5. A margin
    (EXIT_MARGIN, or 16 rounding steps of the sums' precision) keeps their rounding on the safe side. Where
    nothing can be left out (stage two at 2/3 or below) nothing is done; else one host sync for the batch."""
    if not totals:
        return boxes, totals
    bound = needed - stages_left - max(EXIT_MARGIN, 16 * torch.finfo(totals[0].dtype).eps * needed)
    if bound <= 0:
        return boxes, totals
    counts = [len(t) for t in totals]
    every = torch.cat(totals)
    keep = (every[:, :-1].amax(dim=1) >= bound).cpu()
    kept = [int(part.sum()) for part in keep.split(counts)]
    if sum(kept) == sum(counts):
        return boxes, totals
    index = torch.nonzero(keep).squeeze(1).to(every.device, non_blocking=True)
    return list(torch.cat(boxes)[index].split(kept)), list(every[index].split(kept))


def _fast_create_proposals_from_boxes(self, boxes, image_sizes):
    """Cascade R-CNN's ``_create_proposals_from_boxes`` at inference, all images at once: detectron2 clips each
    image's boxes with ``Boxes.clip``, whose finiteness check is a host sync (32 per stage at batch 32, with the
    GPU idle between them); here one check covers the batch and raises the same error."""
    if self.training or not boxes:
        return type(self)._create_proposals_from_boxes(self, boxes, image_sizes)
    counts = [len(b) for b in boxes]
    flat = torch.cat([b.detach() for b in boxes])
    assert torch.isfinite(flat).all(), "Box tensor contains infinite or NaN!"
    sizes = torch.tensor([tuple(s) for s in image_sizes], dtype=flat.dtype).to(flat.device, non_blocking=True)
    repeats = torch.tensor(counts).to(flat.device, non_blocking=True)
    per_box = sizes.repeat_interleave(repeats, dim=0, output_size=len(flat))  # no sync: the size is given
    proposals = []
    for part, size in zip(_clip(flat, per_box).split(counts), image_sizes):
        prop = Instances(size)
        prop.proposal_boxes = Boxes(part)
        proposals.append(prop)
    return proposals


def final_box_predictor(model: torch.nn.Module) -> torch.nn.Module | None:
    """The box predictor whose score threshold and NMS decide the detections: Cascade R-CNN's last stage."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    return predictor[-1] if isinstance(predictor, torch.nn.ModuleList) else predictor


def batch_rpn_proposals(model: torch.nn.Module) -> None:
    """The RPN's proposals of all images at once (:func:`_fast_predict_proposals`), in training and inference,
    on this model instance only (a subclass of RPN with its own ``predict_proposals`` keeps it)."""
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None and type(rpn).predict_proposals is RPN.predict_proposals:
        rpn.predict_proposals = types.MethodType(_fast_predict_proposals, rpn)


def speed_up_inference(model: torch.nn.Module, half_group_norm: bool = True) -> None:
    """Swap, on this model instance only, detectron2's per-image NMS loops for the batched exact ones
    and (``half_group_norm``) GroupNorm for the half-precision one; other models and DefaultPredictor are
    untouched; in training mode the ROI heads' patched methods run detectron2's own code."""
    batch_rpn_proposals(model)
    heads = getattr(model, "roi_heads", None)
    box_predictor = getattr(heads, "box_predictor", None)
    if getattr(type(heads), "_forward_box", None) is CascadeROIHeads._forward_box:
        # the cascade runs its final NMS itself, never its stages' ``inference``
        heads._forward_box = types.MethodType(_fast_cascade_forward_box, heads)
        # at a final score threshold above 1/3 (label outputs: NUCLEUS.PREDICT.SCORE_THRESH; nucleus-eval --tune
        # picked 0.9 for the recipe's model) later stages skip proposals that cannot reach it (_drop_hopeless);
        # False runs every proposal through every stage, as detectron2 does
        heads.cascade_early_exit = True
        if type(heads)._create_proposals_from_boxes is CascadeROIHeads._create_proposals_from_boxes:
            heads._create_proposals_from_boxes = types.MethodType(_fast_create_proposals_from_boxes, heads)
    elif getattr(type(box_predictor), "inference", None) is FastRCNNOutputLayers.inference:
        box_predictor.inference = types.MethodType(_fast_box_inference, box_predictor)
    if half_group_norm:
        use_half_group_norm(model)
        fuse_group_norm_relu(model)
    use_nucleus_roi_align(model)  # float32 boxes under autocast; fp32 inference is unchanged

