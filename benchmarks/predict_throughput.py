"""``nucleus-predict`` end to end against the plain loop a user would write around ``DefaultPredictor``.

Both sides get the same folder of 16-bit TIFFs (default 256 synthetic fields of 1024x1024) and the same
weights, and are timed from building the predictor to the last file written, after an untimed ``nucleus-predict``
of 4 images (``--warm-up``: Triton's kernels compiled into its on-disk cache, as after a user's first run):

* plain loop: read each TIFF (tifffile), normalise it as nucleus_seg does (so both sides see the same pixels),
  ``DefaultPredictor`` (fp32), paint a label image from the masks scoring >= ``NUCLEUS.PREDICT.SCORE_THRESH``
  (lowest score first, so the highest wins), write it with tifffile;
* ``nucleus-predict --formats labels,overlay,csv,submission,coco`` (every output), in this process.

GPU busy: ``nvidia-smi --query-gpu=utilization.gpu -lms 100`` sampled beside each side; ``gpu_busy_percent`` is
the mean utilization over that side's wall time (the share of 100 ms windows in which a kernel ran, as NVML
counts it), ``gpu_busy_steady_percent`` the mean over the steady window below. Pace: ``first_output_s`` (start to
the first label file: imports, model, writers, the first batches) and ``steady_img_per_s`` (label files'
modification times over the last three quarters of the images); ``writer_wait_s``: how long ``nucleus-predict``'s
predicting process waited for its writer processes, and ``images_left_for_writers`` / ``model_done_s``: how many
images were still to write when the model was done, and when that was (its log; many left: the writers set the
pace).
Images larger than a tile: ``nucleus-predict`` scales the config's proposal and detection caps with the image's
area; the plain loop keeps them (a user's loop would), so on dense fields it finds fewer nuclei and does less work
(``agreement.nuclei``: the plain loop's and nucleus-predict's totals; ``images_at_detection_cap``). On 8 fields
of 1024 px with a CPU demo model it found 270 nuclei to nucleus-predict's 763: its 500 proposals (the demo
config's, for one tile) were too few.
Agreement: per image, the instance counts of the two label TIFFs and the mask IoU of matched nuclei.
Fast-path agreement: ``NucleusPredictor``'s batched post-processing against detectron2's own on tile-sized crops.

    python benchmarks/predict_throughput.py --config-file CFG --weights W [--num-images 256] [--size 1024]
        [--save predict_throughput.jsonl]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_facts, emit, weights_or_random_init  # noqa: E402

# nucleus-predict's overrides for the comparison: no rescale (the plain loop has no diameter estimate), so the
# models see the same pixels; no significance rule nor boundary step (the plain loop keeps every detection and mask
# as made), so the same instances (a --variant may turn them on)
AS_PLAIN_LOOP = ["NUCLEUS.PREDICT.DIAMETER", "0.0", "INPUT.MIN_SIZE_TEST", "0", "NUCLEUS.PREDICT.MIN_SIGNIFICANCE",
                 "0.0", "NUCLEUS.PREDICT.BOUNDARY_LEVEL", "0.0"]


def make_images(folder: Path, num: int, size: int, seed: int = 4321) -> list[Path]:
    """``num`` 16-bit synthetic fields as TIFFs (made once)."""
    import tifffile

    from nucleus_seg.data.synth import generate_image, image_rng

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"field_{i:04d}.tif" for i in range(num)]
    for i, path in enumerate(paths):
        if not path.exists():
            tifffile.imwrite(path, generate_image(image_rng(seed, 3, i), size, "fluorescence", 16)[0])
    return paths


class GpuBusy:
    """GPU utilization while the ``with`` block runs, from nvidia-smi samples every 100 ms (None on CPU): the mean
    over the block, and over a window of it (``mean_between``, e.g. the run's steady state)."""

    def __enter__(self):
        self.samples: list[tuple[float, float]] = []  # (time.time() when read, utilization %)
        self.proc = self.reader = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100",
                 "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                stdout=subprocess.PIPE, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            value = line.strip()
            if value.replace(".", "", 1).isdigit():
                self.samples.append((time.time(), float(value)))

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(5)

    @property
    def mean(self) -> float | None:
        return round(float(np.mean([v for _, v in self.samples])), 1) if self.samples else None

    def mean_between(self, start: float, end: float) -> float | None:
        """Mean utilization of the samples read between two ``time.time()`` s."""
        inside = [v for t, v in self.samples if start <= t <= end]
        return round(float(np.mean(inside)), 1) if inside else None


def release_cached_memory() -> None:
    """Give the caching allocator's blocks back between sides: the plain loop's full-size masks (400 of
    1024x1024 per image) left ~127 GB reserved on the H200 and the next predictor ran out of memory
    (session 26)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def plain_loop(cfg, paths: list[Path], out: Path) -> int:
    """What a user writes around detectron2: read, DefaultPredictor, paint, write. Returns how many images hit the
    config's detection cap (``TEST.DETECTIONS_PER_IMAGE``, meant for one tile: nuclei past it are lost here, where
    ``nucleus-predict`` scales the caps with the image's area)."""
    import tifffile
    from detectron2.engine import DefaultPredictor

    from nucleus_seg.data.io import normalize_from_cfg

    predictor = DefaultPredictor(cfg)
    thresh = float(cfg.NUCLEUS.PREDICT.SCORE_THRESH)
    out.mkdir(parents=True, exist_ok=True)
    capped = 0
    for path in paths:
        image = normalize_from_cfg(tifffile.imread(path), cfg)[..., ::-1]  # BGR, as DefaultPredictor wants
        instances = predictor(np.ascontiguousarray(image))["instances"].to("cpu")
        capped += len(instances) >= cfg.TEST.DETECTIONS_PER_IMAGE
        keep = instances.scores >= thresh
        masks, scores = instances.pred_masks[keep].numpy(), instances.scores[keep].numpy()
        labels = np.zeros(image.shape[:2], np.uint16)
        for rank, k in enumerate(np.argsort(scores, kind="stable"), start=1):  # lowest first: highest on top
            labels[masks[k]] = rank
        tifffile.imwrite(out / f"{path.stem}_labels.tif", labels)
    return capped


def agreement(a: Path, b: Path, stems: list[str]) -> dict:
    import tifffile

    from nucleus_seg.evaluation.matching import label_overlap, match_pairs

    ious, diffs, totals = [], [], [0, 0]
    for stem in stems:
        la, lb = (tifffile.imread(d / f"{stem}_labels.tif") for d in (a, b))
        overlap = label_overlap(la, lb)
        ious += overlap.iou[match_pairs(overlap, 0.5)].tolist()
        na, nb = len(overlap.gt_ids), len(overlap.pred_ids)
        diffs.append(abs(na - nb) / max(na, 1))
        totals = [totals[0] + na, totals[1] + nb]
    ious_np = np.asarray(ious)
    # nuclei in all of a's and b's label images: the plain loop keeps the config's proposal and detection caps on
    # a whole 1024 px image (meant for one tile) and finds fewer nuclei than nucleus-predict on dense fields
    return {"nuclei": totals, "matched_instances": int(ious_np.size),
            "median_iou": float(np.median(ious_np)) if ious else None,
            "max_count_diff_frac": max(diffs) if diffs else None,
            "mean_count_diff_frac": float(np.mean(diffs)) if diffs else None}


def fast_path_agreement(cfg, paths: list[Path], count: int = 32) -> dict:
    """The batched fast path (one NMS over many groups, GroupNorm in half precision) against detectron2's own
    per-image post-processing, same predictor settings, on up to ``count`` tile-sized crops at the default batch
    size. Session 14's parallel-NMS bug dropped detections only past one chunk of NMS groups (batch >= 16 on a
    GPU) and no timing run noticed; this check is in every line."""
    import tifffile
    from infer_throughput import instances_agreement

    from nucleus_seg.inference.predictor import NucleusPredictor

    tile = int(cfg.NUCLEUS.PREDICT.TILE_SIZE)
    crops: list[np.ndarray] = []
    for path in paths:
        image = tifffile.imread(path)
        crops += [image[y:y + tile, x:x + tile] for y in range(0, max(1, image.shape[0] - tile + 1), tile)
                  for x in range(0, max(1, image.shape[1] - tile + 1), tile)]
        if len(crops) >= count:
            break
    crops = crops[:count]
    predictors = [NucleusPredictor(cfg, fast=fast) for fast in (True, False)]
    found = [[r["instances"] for r in p.predict_batch(crops)] for p in predictors]
    return {"crops": len(crops), "batch": predictors[0].batch_size, "instances": int(sum(len(b) for b in found[1])),
            **instances_agreement(found[1], found[0])}


def pace(folder: Path, start_wall: float, busy: GpuBusy | None = None) -> dict:
    """When the label files appeared: the first after ``start_wall`` (a ``time.time()``), and the rate over the
    last three quarters of them (the run's steady state, its start-up left out), with the GPU's utilization over
    that window (``busy``)."""
    times = sorted(p.stat().st_mtime for p in folder.glob("*_labels.tif"))
    if not times:
        return {}
    first = len(times) // 4
    span = times[-1] - times[first]
    found = {"first_output_s": round(times[0] - start_wall, 2),
             "steady_img_per_s": round((len(times) - 1 - first) / span, 3) if span > 0 else None}
    if busy is not None and span > 0:
        found["gpu_busy_steady_percent"] = busy.mean_between(times[first], times[-1])
    return found


class WriterWait(logging.Handler):
    """What ``nucleus-predict``'s log says of its writer processes: the seconds its predicting process waited for
    them, and how many images were still to write when the model had done its last one (``left``, at ``model_done``,
    a ``time.time()``): many left means the writers set the pace, not the model."""

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.seconds, self.left, self.model_done = 0.0, 0, None

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"waited ([0-9.]+) s for the", record.getMessage())
        if found:
            self.seconds += float(found.group(1))
        found = re.search(r"writing the files of the last (\d+) images", record.getMessage())
        if found:
            self.left, self.model_done = int(found.group(1)), record.created


def profiled(fn, argv: list[str], path: Path) -> int:
    """``fn(argv)`` under cProfile; the 40 costliest functions (cumulative, then own time) go to ``path``."""
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    status = profile.runcall(fn, argv)
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(40)
    path.write_text(text.getvalue())
    return status


def main(argv: list[str] | None = None) -> dict:
    from nucleus_seg.cli.predict import main as nucleus_predict
    from nucleus_seg.config import get_nucleus_cfg

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--weights", default="", help="checkpoint; random init (seeded) when empty")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "predict_throughput"))
    parser.add_argument("--save", help="append the JSON line to benchmarks/results/<SAVE>")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                        help="one more nucleus-predict side with these overrides, e.g. "
                        "--variant compile NUCLEUS.PREDICT.COMPILE=True (repeatable)")
    parser.add_argument("--profile", metavar="FILE",
                        help="one more nucleus-predict side (default settings) under cProfile, not counted in the "
                        "speed-up: the predicting process's top functions (not its writers') go to FILE")
    parser.add_argument("--warm-up", type=int, default=4, metavar="N",
                        help="first run nucleus-predict on N images, untimed: Triton compiles its kernels once per "
                        "machine into its on-disk cache, as on a user's first run, and every later run finds them "
                        "(0: time the first run too)")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides (KEY VALUE)")
    args = parser.parse_args(argv)
    variants = {"nucleus_predict": []}
    for name, *pairs in args.variant:
        if not all("=" in p for p in pairs):
            parser.error(f"--variant {name}: overrides are KEY=VALUE, got {pairs}")
        variants[f"nucleus_predict+{name}"] = [t for p in pairs for t in p.split("=", 1)]

    opts = [*AS_PLAIN_LOOP, *args.opts]
    cfg = get_nucleus_cfg(args.config_file, opts)
    weights = cfg.MODEL.WEIGHTS = weights_or_random_init(cfg, args.weights)
    paths = make_images(Path(args.data_root) / f"tiff16_{args.size}", args.num_images, args.size)
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)

    def predict_argv(images: list[Path], folder: Path, extra: list[str]) -> list[str]:
        """nucleus-predict's command line for ``images`` into ``folder``, the run's overrides, then ``extra``."""
        return ["--config-file", args.config_file, "--input", *map(str, images), "--output", str(folder), *opts,
                *extra, "MODEL.WEIGHTS", weights]

    if args.warm_up > 0:
        nucleus_predict(predict_argv(paths[:args.warm_up], out / "warm_up", []))
    sides: dict[str, dict] = {}
    waits = WriterWait()
    logging.getLogger("nucleus_seg").addHandler(waits)
    profile_side = ["nucleus_predict+profiled"] if args.profile else []  # cProfile slows it: not counted
    for side in ("plain_loop", *variants, *profile_side):
        folder = out / side
        release_cached_memory()
        waits.reset()
        with GpuBusy() as busy:
            start, start_wall = time.perf_counter(), time.time()
            if side == "plain_loop":
                at_cap = plain_loop(cfg, paths, folder)
            else:
                argv_side = predict_argv(paths, folder, variants.get(side, []))
                try:
                    if side in profile_side:
                        status = profiled(nucleus_predict, argv_side, Path(args.profile))
                    else:
                        status = nucleus_predict(argv_side)
                except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others' figures
                    status = f"{type(exc).__name__}: {exc}"
                if status != 0:
                    if side == "nucleus_predict":
                        raise SystemExit(f"nucleus-predict exited with status {status}")
                    sides[side] = {"failed": str(status)[:500], "img_per_s": 0.0}
                    continue
            seconds = time.perf_counter() - start
        sides[side] = {"seconds": round(seconds, 2), "img_per_s": round(len(paths) / seconds, 3),
                       "gpu_busy_percent": busy.mean, **pace(folder, start_wall, busy)}
        if side != "plain_loop":
            sides[side]["writer_wait_s"] = round(waits.seconds, 2)
            sides[side]["images_left_for_writers"] = waits.left  # at the model's last image (0: none logged)
            if waits.model_done is not None:
                sides[side]["model_done_s"] = round(waits.model_done - start_wall, 2)
        else:
            sides[side]["images_at_detection_cap"] = at_cap
        print(json.dumps({"side": side, **sides[side]}), flush=True)  # kept in the log should a later step fail
    logging.getLogger("nucleus_seg").removeHandler(waits)
    release_cached_memory()
    best = max(variants, key=lambda side: sides[side]["img_per_s"])
    speedup = {side: round(sides[side]["img_per_s"] / sides["plain_loop"]["img_per_s"], 3) for side in variants}
    result = {
        "benchmark": "predict_throughput", **device_facts(), "config": args.config_file,
        "weights": args.weights or "random init (seeded)", "variant": f"{best}, every output format",
        "variant_overrides": {side: variants[side] for side in variants},
        "num_images": len(paths), "image_size": args.size, "bit_depth": 16, "warm_up_images": args.warm_up, **sides,
        "predict_speedup": speedup[best], "predict_speedup_variants": speedup,
        "agreement": agreement(out / "plain_loop", out / best, [p.stem for p in paths]),
        "fast_path_agreement": fast_path_agreement(cfg, paths),
    }
    emit(result, args.save)
    return result


if __name__ == "__main__":
    main()
