"""Where ``nucleus-predict`` leaves the GPU idle: one run under ``torch.profiler``, its GPU gaps, and what each host
thread was in during them.

``predict_throughput.py`` measures how busy the GPU is (NVML, 100 ms windows); this says why it is not busier. The
run's main stages are wrapped in ``record_function`` ranges from here (the package is not changed): reading ahead,
taking a batch, the forward, the detections' post-processing, copies to the host, handing images to the writers.
For every gap between GPU kernels/copies of at least ``--min-gap-us``, each host thread's innermost range (or
aten op / CUDA runtime call) overlapping it is charged with the overlap. Prints a JSON line and a table; the
Chrome trace (gzip) goes to ``--trace`` when given.

    python benchmarks/trace_predict.py --config-file CFG --weights W [--num-images 64] [--trace OUT.json.gz]
    python benchmarks/trace_predict.py --analyse OUT.json.gz      # the table again from a saved trace
"""

from __future__ import annotations

import argparse
import bisect
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

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "cuda_runtime", "cuda_driver", "user_annotation"}
LONG_US = 50_000


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


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def analyse(trace: dict, min_gap_us: float = 100.0, top: int = 25) -> dict:
    """GPU busy share over the traced span, and the gaps' time charged to each thread's innermost host range."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = merged([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES])
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES]
    if not gpu or not host:
        return {"error": "no GPU or host events in the trace"}
    span_start = min(min(e["ts"] for e in host), gpu[0][0])
    span_end = max(max(e["ts"] + e["dur"] for e in host), gpu[-1][1])
    busy = sum(b - a for a, b in gpu)
    gaps = [(a, b) for a, b in zip([span_start] + [g[1] for g in gpu], [g[0] for g in gpu] + [span_end])
            if b - a >= min_gap_us]
    charged: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for e in host:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for thread, evs in by_thread.items():
        # events over LONG_US are few (whole-run ranges) and always looked at; the others are found by start time
        long = [e for e in evs if e["dur"] > LONG_US]
        short = sorted((e for e in evs if e["dur"] <= LONG_US), key=lambda e: e["ts"])
        starts = [e["ts"] for e in short]
        # each gap split at the edges of the events inside it; a piece is charged to the innermost (shortest)
        # event covering it and the innermost ns: range (events nest on a thread)
        for a, b in gaps:
            cuts = {a, b}
            near = short[bisect.bisect_left(starts, a - LONG_US):bisect.bisect_left(starts, b)]
            inside = [e for e in long + near if e["ts"] < b and e["ts"] + e["dur"] > a]
            for e in inside:
                cuts.add(max(a, e["ts"]))
                cuts.add(min(b, e["ts"] + e["dur"]))
            cuts = sorted(cuts)
            for lo, hi in zip(cuts, cuts[1:]):
                mid = (lo + hi) / 2
                covering = [e for e in inside if e["ts"] <= mid < e["ts"] + e["dur"]]
                name = min(covering, key=lambda e: e["dur"])["name"] if covering else "(idle thread)"
                innermost_range = min((e for e in covering if e["name"].startswith("ns:")), key=lambda e: e["dur"],
                                      default=None)
                key = f"{innermost_range['name'] if innermost_range else '-'} > {name}"
                charged[str(thread[1])][key] += hi - lo
    total_gap = sum(b - a for a, b in gaps)
    threads = {}
    for tid, names in charged.items():
        if sum(names.values()) - names.get("- > (idle thread)", 0.0) < 0.01 * total_gap:
            continue  # a thread that was idle through the gaps
        threads[tid] = [[k, round(v / 1000, 1)] for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:top]]
    return {"span_ms": round((span_end - span_start) / 1000, 1), "gpu_busy_ms": round(busy / 1000, 1),
            "gpu_busy_percent": round(100 * busy / (span_end - span_start), 1),
            "gaps": len(gaps), "gap_ms": round(total_gap / 1000, 1), "min_gap_us": min_gap_us,
            "gap_ms_by_thread_and_range": threads}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--weights", default="")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "trace_predict"))
    parser.add_argument("--trace", help="write the Chrome trace here (gzip)")
    parser.add_argument("--analyse", metavar="TRACE", help="only analyse a saved trace")
    parser.add_argument("--min-gap-us", type=float, default=100.0)
    parser.add_argument("--save")
    parser.add_argument("opts", nargs="*", default=[])
    args = parser.parse_args(argv)
    if args.analyse:
        with gzip.open(args.analyse, "rt") as f:
            found = analyse(json.load(f), args.min_gap_us)
        print(json.dumps(found, indent=1))
        return found

    import shutil

    import torch
    from predict_throughput import make_images

    from nucleus_seg.cli.predict import main as nucleus_predict
    from nucleus_seg.config import get_nucleus_cfg

    opts = ["NUCLEUS.PREDICT.DIAMETER", "0.0", "INPUT.MIN_SIZE_TEST", "0", "NUCLEUS.PREDICT.MIN_SIGNIFICANCE", "0.0",
            "NUCLEUS.PREDICT.BOUNDARY_LEVEL", "0.0", *args.opts]
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
    with torch.profiler.profile(activities=activities) as prof:
        run(paths, out / "traced")
    seconds = time.perf_counter() - start
    raw = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    if args.trace:
        with gzip.open(args.trace, "wt") as f:
            json.dump(trace, f)
    found = {"benchmark": "trace_predict", **device_facts(), "config": args.config_file,
             "weights": args.weights or "random init (seeded)", "variant": "nucleus-predict under torch.profiler",
             "num_images": len(paths), "image_size": args.size, "traced_seconds": round(seconds, 2),
             **analyse(trace, args.min_gap_us)}
    emit(found, args.save)
    return found


if __name__ == "__main__":
    main()
