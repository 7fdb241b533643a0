"""DSB-layout loading speed at the real DSB-2018 stage1_train size: 670 images of ~256-512 px with ~29k
8-bit 0/255 mask PNGs. Times the first load (parse, parallel over the available cores, writes the cache)
and a cached load (goals: < 60 s and < 3 s). Prints one JSON line.

    .venv/bin/python benchmarks/load_speed.py [--root DIR] [--workers N]

The folder is built once (random ellipses, about a minute) and reused. Its files were just written, so the
first load reads them from the page cache; from a cold disk it takes longer.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SHAPES = [(256, 256), (256, 320), (260, 347), (360, 360), (512, 512), (512, 640)]


def build(root: Path, images: int, masks: int, seed: int) -> int:
    """Write the benchmark folder (DSB layout, masks as real DSB stores them: disjoint 8-bit 0/255 PNGs);
    per-image mask counts are skewed like DSB's (a few crowded fields, many sparse ones)."""
    import cv2
    import numpy as np
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    weights = rng.exponential(1.0, images)
    counts = 1 + rng.multinomial(masks - images, weights / weights.sum())
    tmp = root.with_name(root.name + ".partial")
    written = 0
    for i in tqdm(range(images), desc="building benchmark folder"):
        h, w = SHAPES[rng.integers(len(SHAPES))]
        name = f"{i:04d}" + "".join(rng.choice(list("0123456789abcdef"), 60))
        sample = tmp / name
        (sample / "images").mkdir(parents=True)
        (sample / "masks").mkdir()
        image = np.full((h, w, 4), 255, np.uint8)
        image[..., :3] = rng.integers(0, 40, (h, w, 1), dtype=np.uint8)
        taken = np.zeros((h, w), bool)
        r_max = int(np.clip(np.sqrt(h * w / counts[i] / np.pi), 4, 20))
        for k in range(counts[i]):
            for _ in range(20):  # a few tries to find free space, as real nuclei do not overlap
                mask = np.zeros((h, w), np.uint8)
                center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
                axes = (int(rng.integers(3, r_max + 1)), int(rng.integers(3, r_max + 1)))
                cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
                mask[taken] = 0
                if mask.any():
                    break
            taken |= mask > 0
            cv2.imwrite(str(sample / "masks" / f"{k:04d}{name[:8]}.png"), mask)
            image[mask > 0, :3] = 150
            written += 1
        cv2.imwrite(str(sample / "images" / f"{name}.png"), image)
    tmp.rename(root)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="default /tmp/nucleus_load_bench_<images>_<masks>")
    parser.add_argument("--images", type=int, default=670)
    parser.add_argument("--masks", type=int, default=29000, help="total mask files (DSB stage1_train: ~29k)")
    parser.add_argument("--workers", type=int, default=None, help="parse processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    args.root = args.root or Path(f"/tmp/nucleus_load_bench_{args.images}_{args.masks}")
    if not args.root.is_dir():
        build(args.root, args.images, args.masks, args.seed)
    from nucleus_seg.data.cache import cache_paths
    from nucleus_seg.data.datasets import load_dsb_dataset

    for path in cache_paths("dsb", args.root):
        path.unlink(missing_ok=True)
    start = time.perf_counter()
    records = load_dsb_dataset(args.root, num_workers=args.workers)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached = load_dsb_dataset(args.root, num_workers=args.workers)
    second = time.perf_counter() - start
    assert cached == records, "cached dicts differ from parsed ones"
    masks = sum(len(list(os.scandir(os.path.join(args.root, r["image_name"], "masks")))) for r in records)
    print(json.dumps({
        "benchmark": "load_speed", "images": len(records), "mask_files": masks,
        "instances": sum(len(r["annotations"]) for r in records),
        "workers": args.workers or min(os.cpu_count() or 1, 8), "cpu_count": os.cpu_count(),
        "first_load_s": round(first, 2), "cached_load_s": round(second, 3),
        "goal_first_s": 60, "goal_cached_s": 3,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
