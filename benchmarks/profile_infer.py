"""Where NucleusPredictor.predict_batch's time goes: wall time vs GPU busy time, top operators.

A table for deciding what to optimise (not a result to compare): if the GPU is busy for a small part
of the wall time, the host (Python, launches, syncs) is the limit.

    python benchmarks/profile_infer.py --weights model.pth --num-images 64 --batch 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_dataset  # noqa: E402


def main() -> None:
    import torch
    from detectron2.data import DatasetCatalog

    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.data.io import read_image
    from nucleus_seg.engine.predictor import NucleusPredictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--weights", default="")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    cfg = get_nucleus_cfg(args.config_file, args.opts)
    cfg.TEST.DETECTIONS_PER_IMAGE = 400
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # as infer_throughput: always 400 instances
    cfg.INPUT.NORMALIZE.METHOD = "none"
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = args.batch
    cfg.MODEL.WEIGHTS = args.weights
    name = benchmark_dataset(Path(args.data_root), max(args.num_images, 16), name="bench_infer")
    images = [read_image(d["file_name"]) for d in DatasetCatalog.get(name)[: args.num_images]]
    images = [np.ascontiguousarray(np.repeat(g[..., None], 3, axis=2)) if g.ndim == 2 else g[..., :3]
              for g in images]
    predictor = NucleusPredictor(cfg)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    predictor.predict_batch(images)  # warm-up
    sync()
    t0 = time.perf_counter()
    predictor.predict_batch(images)
    sync()
    wall = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        predictor.predict_batch(images)
        sync()
    averages = prof.key_averages()
    gpu_busy = sum(e.self_device_time_total for e in averages) / 1e6
    print(f"unprofiled wall {wall:.3f} s for {len(images)} images ({1000 * wall / len(images):.2f} ms/img); "
          f"GPU kernel time {gpu_busy:.3f} s ({100 * gpu_busy / wall:.0f}% of the wall time)")
    for key in ("self_device_time_total", "self_cpu_time_total", "cpu_time_total"):
        print(f"--- top by {key}")
        print(averages.table(sort_by=key, row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
