"""Evaluation speed on one CPU core: label-image matching (DSB score + stats) and COCO mask AP.

1. ``nucleus_seg.evaluation.matching`` on 100 pairs of 1024x1024 label images with 300 nuclei each
   (target: < 2 s in all, i.e. < 20 ms per image).
2. COCO segm AP at maxDets 1000 on the same kind of data, faster-coco-eval (C++, what
   ``NucleusEvaluator`` uses) against detectron2's fallback without ``detectron2._C``
   (``_evaluate_predictions_on_coco`` with pycocotools' pure-Python ``COCOeval``). pycocotools takes
   seconds per image here, so part 2 uses fewer images (``--coco-images``).

Prints one JSON line.

    python benchmarks/eval_speed.py [--images 100] [--nuclei 300] [--size 1024] [--coco-images 10]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"
if hasattr(os, "sched_setaffinity"):  # one core, also for faster-coco-eval's IoU thread pool
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def synthetic_pair(rng: np.random.Generator, size: int, nuclei: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of ``nuclei`` touching/overlapping ellipses and a prediction that shifts them by a
    pixel or two, misses 8% and adds 8% false blobs (ids shuffled), as a decent model would."""
    yy, xx = np.mgrid[-14:15, -14:15]
    gt = np.zeros((size, size), np.int32)
    pred = np.zeros((size, size), np.int32)
    pred_ids = rng.permutation(np.arange(1, 2 * nuclei + 1))
    n_pred = 0
    for k in range(1, nuclei + 1):
        a, b = rng.uniform(5, 13, 2)
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        blob = ((xx * c + yy * s) / a) ** 2 + ((-xx * s + yy * c) / b) ** 2 <= 1
        cy, cx = rng.integers(16, size - 16, 2)
        gt[cy - 14 : cy + 15, cx - 14 : cx + 15][blob] = k
        if rng.random() > 0.08:
            dy, dx = rng.integers(-2, 3, 2)
            pred[cy - 14 + dy : cy + 15 + dy, cx - 14 + dx : cx + 15 + dx][blob] = pred_ids[n_pred]
            n_pred += 1
    for _ in range(int(0.08 * nuclei)):
        cy, cx = rng.integers(16, size - 16, 2)
        pred[cy - 14 : cy + 15, cx - 14 : cx + 15][yy**2 + xx**2 <= 36] = pred_ids[n_pred]
        n_pred += 1
    return gt, pred


def bench_matching(pairs: list[tuple[np.ndarray, np.ndarray]], repeats: int = 3) -> dict:
    from nucleus_seg.evaluation.matching import aggregate_metrics, image_counts, image_metrics

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        summary = aggregate_metrics(image_metrics(image_counts(gt, pred)) for gt, pred in pairs)
        best = min(best, time.perf_counter() - t0)
    return {
        "match_images": len(pairs),
        "match_total_s": round(best, 4),
        "match_ms_per_image": round(1000 * best / len(pairs), 2),
        "match_dsb_score": round(summary["dsb_score"], 4),
        "match_f1_50": round(summary["f1_50"], 4),
        "match_n_gt": summary["n_gt"],
    }


def bench_coco(pairs: list[tuple[np.ndarray, np.ndarray]], seed: int) -> dict:
    from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from nucleus_seg.evaluation.coco import coco_evaluate, dataset_dicts_to_coco
    from nucleus_seg.structures import label_image_to_annotations

    rng = np.random.default_rng(seed)
    dicts, results = [], []
    for image_id, (gt, pred) in enumerate(pairs):
        dicts.append(
            {
                "image_id": image_id,
                "file_name": f"{image_id}.png",
                "height": gt.shape[0],
                "width": gt.shape[1],
                "annotations": label_image_to_annotations(gt),
            }
        )
        for ann in label_image_to_annotations(pred):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "score": float(rng.random()),
                    "segmentation": ann["segmentation"],
                    "bbox": ann["bbox"],
                }
            )
    coco_gt = dataset_dicts_to_coco(dicts)

    t0 = time.perf_counter()
    fast, _ = coco_evaluate(coco_gt, results, ("segm",), (100, 1000))
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = json.loads(json.dumps(coco_gt))
        api.createIndex()
        slow = _evaluate_predictions_on_coco(
            api, results, "segm", cocoeval_fn=COCOeval, max_dets_per_image=[1, 10, 1000]
        )
    t_slow = time.perf_counter() - t0
    return {
        "coco_images": len(pairs),
        "coco_dets": len(results),
        "coco_gt": len(coco_gt["annotations"]),
        "coco_faster_s": round(t_fast, 3),
        "coco_pycocotools_s": round(t_slow, 3),
        "coco_speedup": round(t_slow / t_fast, 1),
        "coco_faster_AP@1000": round(fast["segm"]["AP@1000"], 3),
        "coco_pycocotools_AP@1000": round(float(slow.stats[0]) * 100, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--nuclei", type=int, default=300)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--coco-images", type=int, default=10, help="0 skips the COCO comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    pairs = [synthetic_pair(rng, args.size, args.nuclei) for _ in range(args.images)]
    result = {
        "benchmark": "eval_speed",
        "cores": 1,
        "size": args.size,
        "nuclei": args.nuclei,
        "cpu": platform.processor() or platform.machine(),
        "numpy": np.__version__,
    }
    result.update(bench_matching(pairs))
    if args.coco_images:
        result.update(bench_coco(pairs[: args.coco_images], args.seed))
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
