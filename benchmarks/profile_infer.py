"""Where NucleusPredictor.predict_batch's time goes: wall time vs GPU busy time, top operators, idle gaps.

A table for deciding what to optimise (not a result to compare): if the GPU is busy for a small part
of the wall time, the host (Python, launches, syncs) is the limit. ``--gaps`` says which host code that is:
the GPU's idle time on a timeline, each idle microsecond charged to the innermost Python frame of
nucleus_seg or detectron2 (and the innermost operator) the host was in at that moment.

    python benchmarks/profile_infer.py --weights model.pth --num-images 64 --batch 32 --gaps 30
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import inference_cfg, inference_images  # noqa: E402

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
PROJECT_FRAMES = ("nucleus_seg/", "detectron2/")


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The union of the device's activity (kernels, copies, sets on any stream) as sorted disjoint intervals."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_CATEGORIES)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_intervals(busy: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """Where the device did nothing between ``start`` and ``end``."""
    gaps, cursor = [], start
    for a, b in busy:
        if a > cursor:
            gaps.append((cursor, min(a, end)))
        cursor = max(cursor, b)
        if cursor >= end:
            break
    if cursor < end:
        gaps.append((cursor, end))
    return [(a, b) for a, b in gaps if b > a]


def innermost_segments(spans: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Properly nested ``(start, end, name)`` spans of one thread, flattened to the innermost one at each time."""
    out: list[tuple[float, float, str]] = []
    stack: list[tuple[float, str]] = []  # (end, name)
    cursor = None

    def emit_until(t: float) -> None:
        nonlocal cursor
        while stack and stack[-1][0] <= t:  # close spans that end before t
            end, name = stack.pop()
            if end > cursor:
                out.append((cursor, end, name))
                cursor = end
        if stack and t > cursor:
            out.append((cursor, t, stack[-1][1]))
        cursor = max(cursor, t)

    for start, end, name in sorted(spans, key=lambda s: (s[0], -s[1])):
        if cursor is None:
            cursor = start
        emit_until(start)
        stack.append((end, name))
    if stack:
        emit_until(max(end for end, _ in stack))
    return out


def charge_gaps(gaps: list[tuple[float, float]], segments: list[tuple[float, float, str]]) -> dict[str, float]:
    """Idle time (same unit as the trace) per segment name; time no segment covers goes to "(none)"."""
    charged: dict[str, float] = defaultdict(float)
    starts = [s[0] for s in segments]
    for g0, g1 in gaps:
        covered = 0.0
        i = max(0, bisect.bisect_right(starts, g0) - 1)
        while i < len(segments) and segments[i][0] < g1:
            a, b = max(segments[i][0], g0), min(segments[i][1], g1)
            if b > a:
                charged[segments[i][2]] += b - a
                covered += b - a
            i += 1
        if g1 - g0 > covered:
            charged["(none)"] += g1 - g0 - covered
    return dict(charged)


def gap_report(trace_path: str, top: int) -> str:
    """The GPU's idle time in a chrome trace, charged to the host's innermost project frame and operator."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    busy = busy_intervals(events)
    if not busy:
        return "no device activity in the trace (CPU run): no gaps to report"
    host = [e for e in events if e.get("cat") in ("python_function", "cpu_op", "cuda_runtime", "user_annotation")]
    # the main thread: the one with the longest project frame (predict_batch; a helper thread's frames are shorter)
    per_thread: dict = defaultdict(float)
    for e in host:
        if e["cat"] == "python_function" and any(p in e["name"] for p in PROJECT_FRAMES):
            per_thread[(e["pid"], e["tid"])] = max(per_thread[(e["pid"], e["tid"])], e["dur"])
    main = max(per_thread, key=per_thread.get) if per_thread else None
    host = [e for e in host if (e["pid"], e["tid"]) == main]
    start, end = min(e["ts"] for e in host), max(e["ts"] + e["dur"] for e in host)
    gaps = idle_intervals(busy, start, end)
    idle = sum(b - a for a, b in gaps)
    lines = [f"host window {(end - start) / 1e3:.2f} ms, GPU busy {sum(b - a for a, b in busy) / 1e3:.2f} ms, "
             f"idle {idle / 1e3:.2f} ms in {len(gaps)} gaps ({sum(b - a > 50 for a, b in gaps)} over 50 us)"]
    views = {
        "innermost nucleus_seg/detectron2 frame": [e for e in host if e["cat"] == "python_function"
                                                  and any(p in e["name"] for p in PROJECT_FRAMES)],
        "innermost Python frame": [e for e in host if e["cat"] == "python_function"],
        "innermost operator or runtime call": [e for e in host if e["cat"] in ("cpu_op", "cuda_runtime")],
    }
    for title, chosen in views.items():
        charged = charge_gaps(gaps, innermost_segments([(e["ts"], e["ts"] + e["dur"], e["name"]) for e in chosen]))
        lines.append(f"--- GPU idle time by {title} (ms, share of idle)")
        for name, t in sorted(charged.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{t / 1e3:9.2f}  {100 * t / idle:5.1f}%  {name[:150]}")
    return "\n".join(lines)


def main() -> None:
    import torch

    from nucleus_seg.inference.predictor import NucleusPredictor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--weights", default="")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("--nchw", action="store_true", help="the NCHW model (the GPU default is channels-last)")
    parser.add_argument("--gaps", type=int, default=0, metavar="N",
                        help="also a timeline profile: the N host frames where the GPU idles longest")
    parser.add_argument("--trace", default="", help="where to keep that timeline (chrome trace, .json.gz)")
    parser.add_argument("--shapes", type=int, default=0, metavar="N",
                        help="also the N costliest operators by input shape (which tensors the copies and "
                        "elementwise kernels work on)")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    cfg = inference_cfg(args.config_file, args.opts, 400, args.batch)  # as infer_throughput
    cfg.MODEL.WEIGHTS = args.weights
    images = inference_images(Path(args.data_root), args.num_images)
    predictor = NucleusPredictor(cfg, channels_last=False if args.nchw else None)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    predictor.predict_batch(images)  # warm-up
    sync()
    t0 = time.perf_counter()
    predictor.predict_batch(images)
    sync()
    wall = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                record_shapes=args.shapes > 0) as prof:
        predictor.predict_batch(images)
        sync()
    averages = prof.key_averages()
    gpu_busy = sum(e.self_device_time_total for e in averages) / 1e6
    print(f"unprofiled wall {wall:.3f} s for {len(images)} images ({1000 * wall / len(images):.2f} ms/img); "
          f"GPU kernel time {gpu_busy:.3f} s ({100 * gpu_busy / wall:.0f}% of the wall time)")
    for key in ("self_device_time_total", "self_cpu_time_total", "cpu_time_total"):
        print(f"--- top by {key}")
        print(averages.table(sort_by=key, row_limit=25, max_name_column_width=70))
    if args.shapes:
        print("--- top by self_device_time_total, by input shape")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_device_time_total", row_limit=args.shapes, max_name_column_width=40,
            max_shapes_column_width=90))
    if args.gaps:
        trace = args.trace or os.path.join(tempfile.gettempdir(), "infer_trace.json.gz")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA], with_stack=True) as prof:
            predictor.predict_batch(images)
            sync()
        prof.export_chrome_trace(trace)
        print(gap_report(trace, args.gaps))


if __name__ == "__main__":
    main()
