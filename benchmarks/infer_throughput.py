"""Inference throughput: detectron2's ``DefaultPredictor`` vs ``NucleusPredictor.predict_batch``.

Same weights, same 512x512 images (8-bit, passed to both as the same uint8 BGR arrays), 400 detections
per image. Prints one JSON line with img/s of both sides, ``infer_speedup``, and agreement of the outputs:
instance counts and, for instances matched one-to-one (Hungarian on mask IoU), the mask IoU.

    python benchmarks/infer_throughput.py --weights model.pth --num-images 64 --save infer_throughput.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_facts, emit, inference_cfg, inference_images, weights_or_random_init  # noqa: E402


def mask_agreement(a, b) -> tuple[list[float], int, int]:
    """IoUs of one-to-one matched masks (Hungarian on IoU), and the two instance counts."""
    import torch
    from scipy.optimize import linear_sum_assignment

    if len(a) == 0 or len(b) == 0:
        return [], len(a), len(b)
    dtype = torch.float16 if a.is_cuda else torch.float32  # exact: 0/1 products, sums < 2**11 per row
    fa = a.reshape(len(a), -1).to(dtype)
    fb = b.reshape(len(b), -1).to(dtype)
    inter = (fa @ fb.T).float()
    union = fa.sum(1, dtype=torch.float32)[:, None] + fb.sum(1, dtype=torch.float32)[None] - inter
    iou = (inter / union.clamp(min=1)).cpu().numpy()
    rows, cols = linear_sum_assignment(-iou)
    return iou[rows, cols].tolist(), len(a), len(b)


def instances_agreement(reference: list, ours: list) -> dict:
    """Per image pair of ``Instances``: masks matched one to one (their IoUs) and the count difference relative
    to the reference's count."""
    ious, count_diffs = [], []
    for a, b in zip(reference, ours):
        matched, na, nb = mask_agreement(a.pred_masks, b.pred_masks.to(a.pred_masks.device))
        ious += matched
        count_diffs.append(abs(na - nb) / max(na, 1))
    ious_np = np.asarray(ious)
    return {
        "matched_instances": int(ious_np.size),
        "frac_iou_ge_0.99": float((ious_np >= 0.99).mean()) if ious_np.size else None,
        "median_iou": float(np.median(ious_np)) if ious_np.size else None,
        "max_count_diff_frac": max(count_diffs),
    }


VARIANT_FLAGS = ("cl", "compile", "graphs", "allstages")


def parse_variant(text: str) -> tuple[int, set[str]]:
    """"32+cl+compile" -> (32, {"cl", "compile"}): batch size, then flags."""
    batch, *flags = text.split("+")
    if not batch.isdigit() or not set(flags) <= set(VARIANT_FLAGS):
        raise SystemExit(f"--variants: expected BATCH[+FLAG...] with flags from {VARIANT_FLAGS}, got {text!r}")
    return int(batch), set(flags)


def main() -> None:
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor

    from nucleus_seg.inference.predictor import NucleusPredictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--weights", default="", help="checkpoint; random init (seeded) when empty")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--variants", default="",
                        help="more of ours to time, e.g. 32,32+compile,16+cl (batch size, then flags: cl = "
                        "channels-last model, the GPU default; without it NCHW, compile = NUCLEUS.PREDICT.COMPILE, "
                        "graphs = NUCLEUS.PREDICT.CUDA_GRAPHS, allstages = Cascade R-CNN's later stages on every "
                        "proposal, as detectron2 runs them)")
    parser.add_argument("--score-thresh", type=float, default=0.0,
                        help="MODEL.ROI_HEADS.SCORE_THRESH_TEST of both sides (default 0: every side keeps "
                        "--detections; with trained weights, e.g. the 0.9 nucleus-eval --tune picked)")
    parser.add_argument("--detections", type=int, default=400)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("--save", help="append the JSON line to benchmarks/results/<SAVE>")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    cfg = inference_cfg(args.config_file, args.opts, args.detections, args.batch)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.score_thresh
    weights = cfg.MODEL.WEIGHTS = weights_or_random_init(cfg, args.weights)

    images = inference_images(Path(args.data_root), args.num_images)

    vanilla = DefaultPredictor(cfg)
    DetectionCheckpointer(vanilla.model).load(weights)
    variants = [str(args.batch)] + [v for v in args.variants.split(",") if v and v != str(args.batch)]
    for v in variants:
        parse_variant(v)  # a typo fails here, not after the vanilla side has run

    def make(variant: str) -> NucleusPredictor:
        batch, flags = parse_variant(variant)
        c = cfg.clone()
        c.NUCLEUS.PREDICT.BATCH_SIZE = batch
        c.NUCLEUS.PREDICT.COMPILE = "compile" in flags
        c.NUCLEUS.PREDICT.CUDA_GRAPHS = "graphs" in flags
        predictor = NucleusPredictor(c, channels_last="cl" in flags)
        if hasattr(predictor.model.roi_heads, "cascade_early_exit"):
            predictor.model.roi_heads.cascade_early_exit = "allstages" not in flags
        return predictor

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(fn):
        def run():
            outs = fn()
            sync()
            return outs
        return run

    sides = {"vanilla": timed(lambda: [vanilla(img) for img in images])}
    predictors = {v: make(v) for v in variants}
    for v, predictor in predictors.items():
        sides[v] = timed(partial(predictor.predict_batch, images))
    for fn in sides.values():  # warm-up: cudnn autotuning, allocator, lazy init
        fn()
    timings: dict[str, list[float]] = {side: [] for side in sides}
    # only vanilla's outputs are kept, each variant's compared as its last run ends: every side's full-size masks
    # at once (256 images x 400 detections, ~27 GB a side) ran the H200 out of memory (session 29)
    reference, agreements = None, {}
    for repeat in range(3):
        for side, fn in sides.items():
            t0 = time.perf_counter()
            outs = fn()
            timings[side].append(time.perf_counter() - t0)
            if repeat == 2 and side == "vanilla":
                reference = [r["instances"] for r in outs]
            elif repeat == 2:
                agreements[side] = instances_agreement(reference, [r["instances"] for r in outs])
            del outs
    ips = {side: len(images) / statistics.median(t) for side, t in timings.items()}
    best = max(variants, key=ips.get)
    best_batch, best_flags = parse_variant(best)
    v_ips, o_ips = ips["vanilla"], ips[best]

    result = {
        "benchmark": "infer_throughput",
        **device_facts(),
        "config": args.config_file,
        "weights": "random init (seeded)" if not args.weights else args.weights,
        "variant": best,
        "num_images": len(images),
        "image_size": 512,
        "detections_per_image": args.detections,
        "score_thresh": args.score_thresh,
        "batch": best_batch,
        "channels_last": "cl" in best_flags,
        "compile": "compile" in best_flags,
        "amp": str(predictors[best].amp_dtype).removeprefix("torch.") if predictors[best].amp else None,
        "vanilla": {"img_per_s": v_ips, "ms_per_img": 1000 / v_ips},
        "nucleus_seg": {"variant": best, "img_per_s": o_ips, "ms_per_img": 1000 / o_ips},
        "nucleus_seg_variants": {v: {"img_per_s": ips[v], "ms_per_img": 1000 / ips[v]} for v in variants},
        "infer_speedup": o_ips / v_ips,
        "agreement": agreements[best],
    }
    emit(result, args.save)


if __name__ == "__main__":
    main()
