"""Where ``nucleus-predict`` spends an image's time: each stage of its path timed alone, in ms per image.

``predict_throughput.py`` gives the end-to-end figure; this splits it. On the same 16-bit TIFFs (made by
``predict_throughput.make_images``) and weights, each stage runs over every image with the device synchronised
before the clock stops:

* ``read`` (``read_image``), ``normalize`` (the predictor's ``_normalize``);
* ``forward_tiles``: the model alone on the image's tiles (``TILE_SIZE``/``TILE_OVERLAP`` crops, batches of
  ``BATCH_SIZE``); ``detect_tiles``: the same plus each tile's detections brought to the host, as the stitcher
  gets them; ``predict_large``: tiles, detections and stitching, one image at a time; ``tile_batcher``: the
  tiles of all images in shared batches, unstitched (what ``nucleus-predict``'s predicting process does);
  ``stitch``: stitching one image's tile detections (what its writer processes do first);
* ``forward_whole`` / ``predict_labels_whole``: the untiled path (images in batches of ``BATCH_SIZE``);
* ``write_*``: each output file of ``write_image_outputs`` in this process (what a writer process does).

    python benchmarks/predict_stages.py --config-file CFG --weights W [--num-images 32] [--size 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_facts, emit, weights_or_random_init  # noqa: E402
from predict_throughput import make_images  # noqa: E402


def timed(device, fn, repeat: int) -> float:
    """Seconds per call of ``fn()`` over ``repeat`` calls, the device synchronised at both ends."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def stage_times(predictor, paths: list[Path], out: Path) -> dict[str, float]:
    """ms per image of each stage (see the module docstring)."""
    from nucleus_seg.data.io import read_image
    from nucleus_seg.inference.batch import write_image_outputs
    from nucleus_seg.inference.predictor import _chunks
    from nucleus_seg.inference.tiling import make_tiles

    cfg, device = predictor.cfg, predictor.device
    tile, overlap = int(cfg.NUCLEUS.PREDICT.TILE_SIZE), int(cfg.NUCLEUS.PREDICT.TILE_OVERLAP)
    n = len(paths)
    raws = [read_image(p) for p in paths]
    norms = [predictor.normalize(r) for r in raws]
    thresh = predictor.score_thresh
    it = iter(range(10**9))

    def each(fn):
        return lambda: fn(next(it) % n)

    def forward_tiles(i: int) -> None:
        norm = norms[i]
        tiles = make_tiles(norm.shape[:2], tile, overlap)
        for chunk in _chunks(tiles, predictor.batch_size):
            predictor._forward([norm[t.y0:t.y1, t.x0:t.x1] for t in chunk], thresh)

    def detect_tiles(i: int) -> None:
        norm = norms[i]
        for dets, _ in predictor._detect_tiles(norm, make_tiles(norm.shape[:2], tile, overlap), 1.0, thresh):
            for det in dets:
                det.windows.cpu().numpy(), det.scores.cpu().numpy(), det.boxes.cpu().numpy()

    preds = {}

    def predict_large(i: int) -> None:
        preds[i] = predictor.predict_large(raws[i], diameter=0)

    whole = _chunks(list(range(n)), predictor.batch_size)

    def forward_whole() -> None:
        for chunk in whole:
            predictor._forward([norms[i] for i in chunk], thresh)

    def predict_labels_whole() -> None:
        for chunk in whole:
            predictor.predict_labels([raws[i] for i in chunk], diameter=0)

    formats = {"labels", "overlay", "csv", "submission", "coco"}
    for i in range(min(2, n)):  # warm-up: cuDNN autotuning and allocator growth stay out of the figures
        predict_large(i)
    forward_whole()
    tiled = []

    def tile_batcher() -> None:
        batcher = predictor.tile_batcher()
        for i in range(n):
            tiled.extend(batcher.add(i, norms[i], 1.0))
        tiled.extend(batcher.flush())
        batcher.close()

    times = {
        "read": timed(device, each(lambda i: read_image(paths[i])), n),
        "normalize": timed(device, each(lambda i: predictor.normalize(raws[i])), n),
        "forward_tiles": timed(device, each(forward_tiles), n),
        "detect_tiles": timed(device, each(detect_tiles), n),
        "predict_large": timed(device, each(predict_large), n),
        "tile_batcher": timed(device, tile_batcher, 1) / n,
        "forward_whole": timed(device, forward_whole, 1) / n,
        "predict_labels_whole": timed(device, predict_labels_whole, 1) / n,
    }
    times["stitch"] = timed(device, each(lambda i: tiled[i][1].stitch()), n)
    for fmt in ("labels", "overlay", "csv", "submission", "coco"):
        only = {fmt}
        times[f"write_{fmt}"] = timed(device, each(lambda i, only=only: write_image_outputs(
            out, only, paths[i], raws[i], preds[i].labels, preds[i].scores, cfg)), n)
    times["write_all"] = timed(device, each(lambda i: write_image_outputs(
        out, formats, paths[i], raws[i], preds[i].labels, preds[i].scores, cfg)), n)
    return {k: round(v * 1000, 2) for k, v in times.items()}


def write_torch_profile(predictor, paths: list[Path], path: Path) -> None:
    """torch.profiler's table of ``predict_large`` over ``paths`` (sorted by host time, then device time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nucleus_seg.data.io import read_image

    raws = [read_image(p) for p in paths]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if predictor.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for raw in raws:
            predictor.predict_large(raw, diameter=0)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages()
    device_key = "self_cuda_time_total" if predictor.device.type == "cuda" else "self_cpu_time_total"
    path.write_text(table.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n"
                    + table.table(sort_by=device_key, row_limit=25))


def main(argv: list[str] | None = None) -> dict:
    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.inference import NucleusPredictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--weights", default="", help="checkpoint; random init (seeded) when empty")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "predict_stages"))
    parser.add_argument("--variant", default="default", help="a name for the overrides, in the JSON line")
    parser.add_argument("--save", help="append the JSON line to benchmarks/results/<SAVE>")
    parser.add_argument("--torch-profile", metavar="FILE",
                        help="also write torch.profiler's op table (host and device time) of predict_large on 4 "
                        "images to FILE: where the host waits for the device")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides (KEY VALUE)")
    args = parser.parse_args(argv)
    cfg = get_nucleus_cfg(args.config_file, ["NUCLEUS.PREDICT.DIAMETER", "0.0", "INPUT.MIN_SIZE_TEST", "0",
                                             *args.opts])
    weights = cfg.MODEL.WEIGHTS = weights_or_random_init(cfg, args.weights)
    paths = make_images(Path(args.data_root) / f"tiff16_{args.size}", args.num_images, args.size)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    predictor = NucleusPredictor(cfg)
    ms = stage_times(predictor, paths, out)
    if args.torch_profile:
        write_torch_profile(predictor, paths[:4], Path(args.torch_profile))
    result = {"benchmark": "predict_stages", **device_facts(), "config": args.config_file,
              "weights": weights if args.weights else "random init (seeded)", "variant": args.variant,
              "overrides": args.opts, "num_images": len(paths), "image_size": args.size,
              "tile_size": int(cfg.NUCLEUS.PREDICT.TILE_SIZE), "batch_size": predictor.batch_size,
              "ms_per_image": ms}
    emit(result, args.save)
    return result


if __name__ == "__main__":
    main()
