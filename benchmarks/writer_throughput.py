"""How fast ``nucleus-predict``'s writer processes write, on this host's CPU (no GPU, no model).

Each writer task is :func:`~nucleus_seg.inference.batch.stitch_and_write` of one image's detections: stitch them into
a label image and write every output asked for (default: every default format). The image is a synthetic 16-bit
field of ``--size`` px (the one ``predict_throughput.py`` makes first) and its detections ``--nuclei`` elliptic
masks of 16-28 px at random places (overlaps decided by score, as the model's are), so the work does not depend on
a trained model. ``--writers 1,8,12`` runs that many processes at once, each writing ``--num-images`` images after
one untimed: ``img_per_s`` (all of them together) says how many writers keep up with a given model rate;
``ms_per_img`` is one writer's time per image at that load. ``NUCLEUS.PREDICT.WRITERS`` -1 picks
:func:`~nucleus_seg.inference.batch.writer_count` of them; the figures behind its cap came from this script.

    python benchmarks/writer_throughput.py [--writers 1,8,12,16] [--nuclei 300] [--num-images 10] [--save F]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_facts, emit  # noqa: E402

CONFIG = "configs/nucleus_R101_FPN_scratch.yaml"


def dense_detections(size: int, nuclei: int, seed: int = 0):
    """``nuclei`` elliptic masks of 16-28 px at random places of a ``size`` px image, as one tile's detections."""
    from nucleus_seg.inference.tiling import TiledDetections, TileInstances, make_tiles

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :40]
    masks, origins, boxes = [], [], []
    for _ in range(nuclei):
        radius, aspect = rng.uniform(8, 14), rng.uniform(0.7, 1.0)
        window = ((yy - 20) / radius) ** 2 + ((xx - 20) / (radius * aspect)) ** 2 <= 1
        y0, x0 = (int(v) for v in rng.integers(0, size - 40, 2))
        ys, xs = np.nonzero(window)
        masks.append(window)
        origins.append((y0, x0))
        boxes.append((x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1))
    scores = np.sort(rng.uniform(0.5, 1.0, nuclei))[::-1].astype(np.float32)
    found = TileInstances(np.array(masks), np.array(origins), scores, np.array(boxes, np.float32))
    return TiledDetections((size, size), make_tiles((size, size), size, 0), [found], 1.0, 0)


def write_images(task: tuple[int, str, int, int, int, list[str], str]) -> float:
    """One writer process: ``count`` images written after one untimed; seconds taken."""
    index, image, size, nuclei, count, formats, out_root = task
    import cv2

    cv2.setNumThreads(1)  # as nucleus-predict's writers (batch._one_thread_each)
    from predict_throughput import AS_PLAIN_LOOP

    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.data.io import read_image
    from nucleus_seg.inference.batch import stitch_and_write

    cfg = get_nucleus_cfg(CONFIG, AS_PLAIN_LOOP)
    path, out = Path(image), Path(out_root) / str(index)
    out.mkdir(parents=True, exist_ok=True)
    raw, found = read_image(path), dense_detections(size, nuclei)
    stitch_and_write(out, set(formats), path, raw, found, cfg)
    start = time.perf_counter()
    for _ in range(count):
        stitch_and_write(out, set(formats), path, raw, found, cfg)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    from nucleus_seg.inference.batch import DEFAULT_FORMATS, FORMATS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", default="1,8,12,16", help="process counts to run, comma-separated")
    parser.add_argument("--nuclei", type=int, default=300)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--num-images", type=int, default=10, help="timed images per writer")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("--save", help="append the JSON lines to benchmarks/results/<SAVE>")
    args = parser.parse_args(argv)
    from predict_throughput import make_images

    formats = args.formats.split(",")
    counts = [int(v) for v in args.writers.split(",")]
    if set(formats) - set(FORMATS) or min(counts) < 1 or args.num_images < 1 or args.size < 64:
        parser.error(f"--formats from {','.join(FORMATS)}; --writers, --num-images >= 1; --size >= 64")
    image = make_images(Path(args.data_root) / f"tiff16_{args.size}", 1, args.size)[0]
    results = []
    out_root = Path(tempfile.mkdtemp(prefix="writer_bench_"))
    try:
        for count in counts:
            tasks = [(i, str(image), args.size, args.nuclei, args.num_images, formats, str(out_root))
                     for i in range(count)]
            with multiprocessing.get_context("spawn").Pool(count) as pool:
                seconds = pool.map(write_images, tasks)
            result = {**device_facts(), "benchmark": "writer_throughput", "config": CONFIG,
                      "weights": "none (synthetic detections)", "variant": f"{count} writers", "writers": count,
                      "nuclei": args.nuclei, "image_size": args.size, "formats": formats,
                      "ms_per_img": round(1000 * float(np.mean(seconds)) / args.num_images, 1),
                      "img_per_s": round(count * args.num_images / float(np.max(seconds)), 1)}
            emit(result, args.save)
            results.append(result)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
