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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import inference_cfg, inference_images  # noqa: E402


def main() -> None:
    import torch

    from nucleus_seg.inference.predictor import NucleusPredictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--weights", default="")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    cfg = inference_cfg(args.config_file, args.opts, 400, args.batch)  # as infer_throughput
    cfg.MODEL.WEIGHTS = args.weights
    images = inference_images(Path(args.data_root), args.num_images)
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
