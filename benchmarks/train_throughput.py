"""Training throughput: vanilla detectron2 vs nucleus-train's trainer, same model, config and data.

(a) vanilla: ``DefaultTrainer`` + detectron2's ``DatasetMapper`` (bitmask masks, resize to 512, flip),
    detectron2's default loader settings; no nucleus_seg code in the training loop.
(b) ours: ``NucleusTrainer`` exactly as ``nucleus-train`` builds it from the same YAML, in one or more
    variants ``PxB`` = P processes on the GPU (``nucleus-train --procs-per-gpu P``) with B images each.
Each side runs in its own process (clean CUDA state). Prints one JSON line with img/s (median after
warm-up), data time, peak GPU memory and the loss after N iterations for both, and ``train_speedup``
(fastest variant) and ``train_speedup_same_batch`` (the fastest variant 1xB[+FLAGS], B = --batch: the same step as
vanilla).

    python benchmarks/train_throughput.py --iters 120 --warmup 30 --variants 1x8,2x8 --save train.jsonl
    python benchmarks/train_throughput.py --side scaling --num-gpus 2 --iters 200 --save scaling.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_dataset, device_facts, emit  # noqa: E402


def _cfg(args, output_dir: str, dataset: str):
    from detectron2.engine import DefaultTrainer

    from nucleus_seg.config import get_nucleus_cfg

    cfg = get_nucleus_cfg(args.config_file, args.opts)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.DATASETS.TEST = ()
    world = args.num_gpus * args.procs_per_gpu
    # batch and LR x (images per step / the config's batch), iterations, warm-up and LR steps / the same factor
    # (counted in images), by detectron2's own rule, as nucleus-train scales with SOLVER.REFERENCE_WORLD_SIZE: for
    # more processes and for more images per process alike. With the warm-up left in iterations, 3 processes
    # warmed up over 3x the images and their loss after the same images came out 7-8% above vanilla's (2026-12-02)
    reference = cfg.SOLVER.IMS_PER_BATCH
    if (args.batch * world) % reference:
        raise SystemExit(f"--batch {args.batch} x {world} processes is not a multiple of the config's "
                         f"SOLVER.IMS_PER_BATCH {reference}")
    scale = args.batch * world // reference
    cfg.SOLVER.MAX_ITER = args.iters * scale
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 1
    cfg = DefaultTrainer.auto_scale_workers(cfg, scale)
    cfg.SOLVER.REFERENCE_WORLD_SIZE = world  # scaled already: the trainer's own auto scaling leaves it as it is
    cfg.OUTPUT_DIR = output_dir
    cfg.SEED = 42
    return cfg


LOSS_WINDOW_IMAGES = 160  # loss_end: the mean loss over the last this many images (20 steps of 8, 10 of 16)


def run_side(args) -> dict:
    import torch
    from detectron2.engine import DefaultTrainer, HookBase
    from detectron2.utils.logger import setup_logger

    setup_logger(name="detectron2")
    dataset = benchmark_dataset(Path(args.data_root), args.num_images)
    out = os.path.join(args.out_dir, args.side)
    cfg = _cfg(args, out, dataset)
    if args.side == "vanilla":
        # detectron2's own defaults for what nucleus_seg changes outside the model
        cfg.INPUT.MIN_SIZE_TRAIN = (512,)
        cfg.INPUT.RANDOM_FLIP = "horizontal"
        cfg.DATALOADER.NUM_WORKERS = args.vanilla_workers  # detectron2's default is 4
        cfg.DATALOADER.ASPECT_RATIO_GROUPING = True
        trainer_cls = DefaultTrainer
    else:
        from nucleus_seg.engine.trainer import NucleusTrainer

        trainer_cls = NucleusTrainer
    cfg.freeze()

    stamps: list[float] = []

    class StepClock(HookBase):
        def after_step(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    trainer = trainer_cls(cfg)
    trainer.register_hooks([StepClock()])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    from detectron2.utils import comm

    if not comm.is_main_process():
        return {}  # detectron2 records metrics on rank 0 only
    steps = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])] or [wall / args.iters]
    storage = trainer.storage
    data_times = [v for v, _ in storage.history("data_time").values()][args.warmup:]
    losses = [v for v, _ in storage.history("total_loss").values()]
    step = statistics.median(steps)
    return {
        "img_per_s": cfg.SOLVER.IMS_PER_BATCH / step,
        "num_gpus": args.num_gpus,
        "procs_per_gpu": args.procs_per_gpu,
        "batch_per_proc": args.batch,
        "iters": args.iters,
        "s_per_iter": step,
        "data_time_s": statistics.median(data_times) if data_times else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "loss_start": statistics.mean(losses[:10]),
        # over the last LOSS_WINDOW_IMAGES images, whatever the batch: ten steps were 80 images at batch 8 and 240
        # at batch 24, whose mean then reached back to higher losses (a bias against larger batches)
        "loss_end": statistics.mean(losses[-max(1, LOSS_WINDOW_IMAGES // cfg.SOLVER.IMS_PER_BATCH):]),
        "loss_end_last10": statistics.mean(losses[-10:]),
        "wall_s": wall,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "amp": cfg.SOLVER.AMP.ENABLED,
        "amp_dtype": "float16" if args.side == "vanilla" else cfg.NUCLEUS.TRAIN.AMP_DTYPE,
    }


def _write_side(args) -> None:
    """One side in this process (or in each rank of a launch()); rank 0 writes the result."""
    from detectron2.utils import comm

    from nucleus_seg.utils.dist import close_process_group

    result = run_side(args)
    if comm.is_main_process():
        if args.child_out:  # a side run by main() for the comparison
            Path(args.child_out).write_text(json.dumps(result))
        else:  # one side asked for on the command line (--side vanilla / ours): its own JSON line
            emit({"benchmark": f"train_throughput_{args.side}", **device_facts(), "config": args.config_file,
                  "opts": args.opts, "weights": "random init (from scratch)",
                  "variant": f"{args.procs_per_gpu}x{args.batch}", **result}, args.save)
    close_process_group()


def _child(args, side: str, num_gpus: int, iters: int, warmup: int, out_dir: str, *, procs_per_gpu: int = 1,
           batch: int | None = None, extra_opts: list[str] = ()) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, __file__, "--side", side, "--child-out", tmp.name, "--num-gpus", str(num_gpus),
               "--procs-per-gpu", str(procs_per_gpu), "--config-file", args.config_file, "--iters", str(iters),
               "--warmup", str(warmup), "--batch", str(batch or args.batch), "--num-images", str(args.num_images),
               "--data-root", args.data_root, "--out-dir", out_dir, "--vanilla-workers", str(args.vanilla_workers),
               *args.opts, *extra_opts]
        subprocess.run(cmd, check=True)
        return json.loads(Path(tmp.name).read_text())


# a variant's flags, as config overrides of our side. fp16 + d2aug make the loss comparable with vanilla's:
# its AMP precision, and its data (whole 512 px images, flips, no scale jitter, no photometric changes)
VARIANT_FLAGS = {
    "compile": ["NUCLEUS.TRAIN.COMPILE", "True"],  # CUDA graphs give way to it
    "d2rpn": ["NUCLEUS.TRAIN.BATCHED_PROPOSALS", "False"],  # detectron2's per-image proposals
    "graphs": ["NUCLEUS.TRAIN.CUDA_GRAPHS", "True"],  # the default since session 25
    "eager": ["NUCLEUS.TRAIN.CUDA_GRAPHS", "False"],
    "d2labels": ["NUCLEUS.TRAIN.BATCHED_ANCHOR_LABELS", "False"],  # detectron2's per-image anchor labels
    "d2sampling": ["NUCLEUS.TRAIN.BATCHED_ROI_SAMPLING", "False"],  # and ROI sampling
    "fp16": ["NUCLEUS.TRAIN.AMP_DTYPE", "float16"],
    "d2aug": ["INPUT.NUCLEUS.SCALE_RANGE", "(1.0, 1.0)", "INPUT.NUCLEUS.ROT90", "False",
              "INPUT.NUCLEUS.BRIGHTNESS", "0.0", "INPUT.NUCLEUS.CONTRAST", "0.0", "INPUT.NUCLEUS.GAMMA", "(1.0, 1.0)",
              "INPUT.NUCLEUS.BLUR_PROB", "0.0", "INPUT.NUCLEUS.NOISE_PROB", "0.0"],
}


def parse_variants(text: str) -> list[tuple[int, int, list[str]]]:
    """"1x8,3x8+compile" -> [(1, 8, []), (3, 8, ["NUCLEUS.TRAIN.COMPILE", "True"])]: processes per GPU x
    images per process, then the overrides of the flags."""
    variants = []
    for v in (v for v in text.split(",") if v):
        shape, *flags = v.lower().split("+")
        try:
            procs, batch = (int(n) for n in shape.split("x"))
        except ValueError as exc:
            raise SystemExit(f"--variants: expected PxB[+FLAG][,...] such as 1x8,3x8+compile, got {v!r}") from exc
        if not set(flags) <= set(VARIANT_FLAGS):
            raise SystemExit(f"--variants: unknown flag in {v!r} (flags: {', '.join(VARIANT_FLAGS)})")
        variants.append((procs, batch, [o for f in flags for o in VARIANT_FLAGS[f]]))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--iters", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("--out-dir", default=tempfile.mkdtemp(prefix="train_bench_"),
                        help="each side trains into OUT_DIR/<side> (model_final.pth is kept)")
    parser.add_argument("--side", choices=["both", "vanilla", "ours", "scaling"], default="both",
                        help="both: vanilla vs ours on one GPU; scaling: ours on 1 vs --num-gpus GPUs")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs per side (scaling: the N compared to 1)")
    parser.add_argument("--procs-per-gpu", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default="1x8", help="ours: PxB,... = P processes per GPU x B images each")
    parser.add_argument("--vanilla-workers", type=int, default=4,
                        help="vanilla's DATALOADER.NUM_WORKERS (detectron2's default 4 starves an H100 on "
                        "80-nucleus bitmask images; give it more to compare GPU-side speed)")
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--save", help="append the JSON line to benchmarks/results/<SAVE>")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for both sides")
    args = parser.parse_args()

    benchmark_dataset(Path(args.data_root), args.num_images)  # once, before any rank or side starts
    if args.side in ("vanilla", "ours"):
        if args.num_gpus * args.procs_per_gpu > 1:
            from nucleus_seg.utils.dist import launch

            launch(_write_side, args.num_gpus, procs_per_gpu=args.procs_per_gpu, dist_url="auto", args=(args,))
        else:
            _write_side(args)
        return
    if args.side == "scaling":
        # the same number of images on 1 and N GPUs (per-GPU batch fixed), so the losses compare
        n = args.num_gpus
        one = _child(args, "ours", 1, args.iters, args.warmup, os.path.join(args.out_dir, "1gpu"))
        many = _child(args, "ours", n, args.iters // n, args.warmup // n, os.path.join(args.out_dir, f"{n}gpu"))
        result = {
            "benchmark": "train_scaling",
            **device_facts(),
            "config": args.config_file,
            "weights": "random init (from scratch)",
            "variant": f"1 vs {n} GPUs, batch {args.batch} per GPU",
            "opts": args.opts,
            "batch_per_gpu": args.batch,
            "images": args.iters * args.batch,
            "one_gpu": one,
            f"{n}_gpus": many,
            "scaling": many["img_per_s"] / one["img_per_s"],
        }
        emit(result, args.save)
        return
    variants = zip(parse_variants(args.variants), (v for v in args.variants.split(",") if v))  # typos fail here
    vanilla = _child(args, "vanilla", 1, args.iters, args.warmup, args.out_dir)  # trains in OUT_DIR/vanilla
    ours = {}
    for (procs, batch, extra), name in variants:
        # the same number of images in every variant
        iters = max(args.warmup + 10, args.iters * args.batch // (procs * batch))
        try:
            ours[name] = _child(args, "ours", 1, iters, args.warmup * args.batch // (procs * batch),
                                args.out_dir if name == f"1x{args.batch}" else os.path.join(args.out_dir, name),
                                procs_per_gpu=procs, batch=batch, extra_opts=extra)
        except subprocess.CalledProcessError as exc:  # one failed variant must not lose the others' figures
            print(f"variant {name} failed (exit {exc.returncode}); the others go on", file=sys.stderr)
            ours[name] = {"failed": f"exit {exc.returncode}", "img_per_s": 0.0}
    best = max(ours, key=lambda k: ours[k]["img_per_s"])
    # the same step as vanilla: one process of --batch images, whatever else the variant changes (the fastest)
    same_batch = [k for k in ours if k.split("+")[0] == f"1x{args.batch}"]
    same = max((ours[k] for k in same_batch), key=lambda v: v["img_per_s"], default=None)
    result = {
        "benchmark": "train_throughput",
        **device_facts(),
        "config": args.config_file,
        "weights": "random init (from scratch)",
        "variant": best,
        "opts": args.opts,
        "batch": args.batch,
        "iters": args.iters,
        "image_size": 512,
        "vanilla": vanilla,
        "nucleus_seg": {"variant": best, **ours[best]},
        "nucleus_seg_variants": ours,
        "train_speedup": ours[best]["img_per_s"] / vanilla["img_per_s"],
        "train_speedup_same_batch": same["img_per_s"] / vanilla["img_per_s"] if same else None,
    }
    emit(result, args.save)


if __name__ == "__main__":
    main()
