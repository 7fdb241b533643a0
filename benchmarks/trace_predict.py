"""Where ``nucleus-predict`` leaves the GPU idle: one run under ``torch.profiler``, its GPU gaps, and what each host
thread was in during them.

``predict_throughput.py`` measures how busy the GPU is (NVML, 100 ms windows); this says why it is not busier. The
run's main stages are wrapped in ``record_function`` ranges from here (the package is not changed): reading ahead,
taking a batch, the forward, the detections' post-processing, copies to the host, handing images to the writers.
For every gap between GPU kernels/copies of at least ``--min-gap-us``, each host thread's innermost range (or
the innermost aten op or CUDA runtime call) running then is charged with it (``profile_infer.py``'s
timeline helpers, per thread). Prints one JSON line; the Chrome trace (gzip) goes to ``--trace`` when given.

    python benchmarks/trace_predict.py --config-file CFG --weights W [--num-images 64] [--trace OUT.json.gz]
    python benchmarks/trace_predict.py --analyse OUT.json.gz      # the figures again from a saved trace
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import gzip
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_facts, emit, weights_or_random_init  # noqa: E402
from profile_infer import busy_intervals, charge_gaps, idle_intervals, innermost_segments  # noqa: E402

STAGE_PREFIX = "ns:"


def _wrap(owner, name: str, label: str) -> None:
    import torch

    fn = getattr(owner, name)

    @functools.wraps(fn)
    def ranged(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    setattr(owner, name, ranged)


def annotate() -> None:
    """``record_function`` ranges around nucleus-predict's stages (names start with ``ns:``)."""
    from nucleus_seg.inference import batch, predictor

    _wrap(batch, "read_image", "ns:read_image")
    _wrap(predictor.NucleusPredictor, "normalize", "ns:normalize")
    _wrap(predictor.TileBatcher, "_take_batch", "ns:take_batch")
    _wrap(predictor.TileBatcher, "_finish", "ns:finish_batch")
    _wrap(predictor.NucleusPredictor, "_forward", "ns:forward")
    _wrap(predictor, "detections_from_outputs", "ns:detections_from_outputs")
    _wrap(predictor, "_host_instances", "ns:host_instances")
    _wrap(batch.ImageWriter, "submit", "ns:writer_submit")
    _wrap(batch.ImageWriter, "close", "ns:writer_close")
    _wrap(batch, "_write_folder_files", "ns:write_folder_files")
    _wrap(concurrent.futures.Future, "result", "ns:wait_future")


def analyse(events: list[dict], min_gap_us: float = 100.0, top: int = 20) -> dict:
    """The GPU's busy share over the traced span and its idle gaps (of ``min_gap_us`` or more), charged on each
    host thread to the innermost stage range and to the innermost operator or runtime call running then."""
    events = [e for e in events if e.get("ph") == "X" and "dur" in e]
    busy = busy_intervals(events)
    host = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "user_annotation")]
    if not busy or not host:
        return {"error": "no GPU or host events in the trace"}
    start = min(min(e["ts"] for e in host), busy[0][0])
    end = max(max(e["ts"] + e["dur"] for e in host), busy[-1][1])
    gaps = [(a, b) for a, b in idle_intervals(busy, start, end) if b - a >= min_gap_us]
    idle = sum(b - a for a, b in gaps)
    threads: dict[tuple, list[dict]] = defaultdict(list)
    for e in host:
        threads[(e["pid"], e["tid"])].append(e)
    by_thread = {}
    for (_, tid), evs in threads.items():
        views = {}
        for view, chosen in (("stage", [e for e in evs if e["name"].startswith(STAGE_PREFIX)]),
                             ("op", [e for e in evs if e["cat"] != "user_annotation"])):
            segments = innermost_segments([(e["ts"], e["ts"] + e["dur"], e["name"]) for e in chosen])
            charged = charge_gaps(gaps, segments) if segments else {"(none)": idle}
            views[view] = [[name, round(t / 1e3, 1)] for name, t in sorted(charged.items(), key=lambda kv: -kv[1])
                           [:top]]
        if sum(t for name, t in views["stage"] if name != "(none)") >= 0.01 * idle / 1e3:
            by_thread[str(tid)] = views  # threads idle through the gaps are left out
    return {"span_ms": round((end - start) / 1e3, 1), "gpu_busy_ms": round(sum(b - a for a, b in busy) / 1e3, 1),
            "gpu_busy_percent": round(100 * sum(b - a for a, b in busy) / (end - start), 1),
            "gaps": len(gaps), "gap_ms": round(idle / 1e3, 1), "min_gap_us": min_gap_us,
            "gap_ms_by_thread": by_thread}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--weights", default="")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "trace_predict"))
    parser.add_argument("--trace", help="write the Chrome trace here (a .json.gz name)")
    parser.add_argument("--analyse", metavar="TRACE", help="only analyse a saved trace")
    parser.add_argument("--min-gap-us", type=float, default=100.0)
    parser.add_argument("--save")
    parser.add_argument("opts", nargs="*", default=[])
    args = parser.parse_args(argv)
    if args.analyse:
        with gzip.open(args.analyse, "rt") as f:
            found = analyse(json.load(f)["traceEvents"], args.min_gap_us)
        print(json.dumps(found, indent=1))
        return found

    import shutil

    import torch
    from predict_throughput import AS_PLAIN_LOOP, make_images

    from nucleus_seg.cli.predict import main as nucleus_predict
    from nucleus_seg.config import get_nucleus_cfg

    opts = [*AS_PLAIN_LOOP, *args.opts]  # the settings predict_throughput.py times
    cfg = get_nucleus_cfg(args.config_file, opts)
    weights = weights_or_random_init(cfg, args.weights)
    paths = make_images(Path(args.data_root) / f"tiff16_{args.size}", args.num_images, args.size)
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)

    def run(images, folder):
        status = nucleus_predict(["--config-file", args.config_file, "--input", *map(str, images), "--output",
                                  str(folder), *opts, "MODEL.WEIGHTS", weights])
        if status != 0:
            raise SystemExit(f"nucleus-predict exited with status {status}")

    run(paths[:4], out / "warm_up")
    annotate()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities, **_every_thread()) as prof:
        run(paths, out / "traced")
    seconds = time.perf_counter() - start
    path = args.trace or str(Path(tempfile.mkdtemp()) / "trace.json.gz")
    prof.export_chrome_trace(path)  # gzip-compressed, by its suffix
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    found = {"benchmark": "trace_predict", **device_facts(), "config": args.config_file,
             "weights": args.weights or "random init (seeded)", "variant": "nucleus-predict under torch.profiler",
             "num_images": len(paths), "image_size": args.size, "traced_seconds": round(seconds, 2),
             **analyse(trace["traceEvents"], args.min_gap_us)}
    emit(found, args.save)
    return found


def _every_thread() -> dict:
    """The profiler's option to record every thread's operators: by default only the thread that started it is
    recorded, and nucleus-predict's forwards run on its stream threads (session 32's trace charged every gap to the
    main thread, waiting for them). Older PyTorch without the option: the main thread only, as before."""
    import torch

    try:
        return {"experimental_config": torch._C._profiler._ExperimentalConfig(profile_all_threads=True)}
    except (AttributeError, TypeError):
        return {}


if __name__ == "__main__":
    main()
