"""``predict_large`` on a big synthetic mosaic: wall time, peak GPU and host memory, and the DSB score
of the stitched label image against the mosaic's ground truth (seams must not cost accuracy).

    python benchmarks/predict_large.py --weights model.pth --size 8192 --save predict_large.jsonl
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_facts, emit  # noqa: E402


def _block(index: int, block: int, seed: int):
    from nucleus_seg.data.synth import generate_image, image_rng

    return generate_image(image_rng(seed, 7, index), block, "fluorescence", 16)


def mosaic(size: int, block: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A size x size 16-bit image of generated fields, and its label image (ids unique across fields)."""
    n = size // block
    image = np.zeros((n * block, n * block), np.uint16)
    label = np.zeros(image.shape, np.int32)
    offset = 0
    with ProcessPoolExecutor() as pool:
        fields = pool.map(_block, range(n * n), [block] * (n * n), [seed] * (n * n), chunksize=8)
        for k, (img, lab) in enumerate(fields):
            r, c = divmod(k, n)
            image[r * block:(r + 1) * block, c * block:(c + 1) * block] = img
            lab = lab.astype(np.int32)
            lab[lab > 0] += offset
            offset = max(offset, int(lab.max()))
            label[r * block:(r + 1) * block, c * block:(c + 1) * block] = lab
    return image, label


def main() -> None:
    import torch

    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.evaluation.matching import dsb_score, matching_stats
    from nucleus_seg.inference.predictor import NucleusPredictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--weights", default="")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--save", help="append the JSON line to benchmarks/results/<SAVE>")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    t0 = time.perf_counter()
    image, truth = mosaic(args.size)
    gen_s = time.perf_counter() - t0
    cfg = get_nucleus_cfg(args.config_file, [*args.opts, "MODEL.WEIGHTS", args.weights])
    predictor = NucleusPredictor(cfg)
    predictor.predict_large(image[:1024, :1024], tile=args.tile, overlap=args.overlap)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = predictor.predict_large(image, tile=args.tile, overlap=args.overlap, progress=True)
    wall = time.perf_counter() - t0
    stats = matching_stats(truth, result.labels, 0.5)
    emit({
        "benchmark": "predict_large",
        **device_facts(),
        "config": args.config_file,
        "weights": args.weights or "random init",
        "variant": f"predict_large, tile {args.tile}, overlap {args.overlap}",
        "image": f"{image.shape[0]}x{image.shape[1]} uint16 synthetic mosaic",
        "tile": args.tile,
        "overlap": args.overlap,
        "wall_s": wall,
        "megapixels_per_s": image.size / 1e6 / wall,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "n_true": int(len(np.unique(truth)) - 1),
        "n_pred": len(result),
        "dsb_score": dsb_score(truth, result.labels),
        "f1_50": float(stats["f1"]),
        "mosaic_generation_s": gen_s,
    }, args.save)


if __name__ == "__main__":
    main()
