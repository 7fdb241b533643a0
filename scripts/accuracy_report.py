#!/usr/bin/env python3
"""Collect one accuracy-recipe run into ``benchmarks/results/accuracy_<date>.json``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

KEYS = ("dsb_score", "ap50", "f1_50", "pq", "mean_matched_iou", "n_images", "n_gt", "n_pred")


def _metrics(path: Path) -> dict | None:
    if not path.is_file():  # a step the run skipped (NUCLEUS_SKIP_BASELINE)
        return None
    data = json.loads(path.read_text())
    out = {k: data.get(k) for k in KEYS}
    curve = data.get("iou_curve")
    if curve:  # where the score is lost: detection (IoU 0.5) or boundaries (IoU >= 0.85)
        out["accuracy_per_iou"] = {f"{t:.2f}": round(a, 4) for t, a in zip(curve["thresholds"], curve["accuracy"])}
    return out


def _robustness(path: Path) -> dict | None:
    """benchmarks/robustness.py's report (per-variant figures and background counts), if it ran."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("datasets", "background", "summary", "seconds")}


def _by_zoom(robustness: dict | None) -> dict | None:
    """The real sample's DSB score per magnification, for the model (estimated diameter) and the watershed."""
    rows = (robustness or {}).get("datasets", {}).get("nucleus_dsb_sample")
    if not rows:
        return None
    zooms = {k: v for k, v in rows.items() if k.startswith("x")}
    return {"auto": {k: v["dsb"] for k, v in zooms.items()},
            "watershed": {k: v["watershed_dsb"] for k, v in zooms.items()}}


def _final_iteration(path: Path) -> int | None:
    return json.loads(path.read_text()).get("iteration") if path.is_file() else None


def _features(config: str, opts: list[str]) -> list[str]:
    from nucleus_seg.config import get_nucleus_cfg

    return list(get_nucleus_cfg(config, opts).NUCLEUS.SYNTH.FEATURES)


def main() -> None:
    import torch

    from nucleus_seg.data.synth import GENERATOR_VERSION

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--train-minutes", type=float, required=True)
    parser.add_argument("--total-minutes", type=float, required=True)
    parser.add_argument("--out", type=Path, help="JSON to write (default benchmarks/results/accuracy_<date>.json)")
    parser.add_argument("opts", nargs="*")
    args = parser.parse_args()
    run = args.run
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "num_gpus": int(os.environ.get("NUCLEUS_NUM_GPUS", "1")),
        "procs_per_gpu": int(os.environ.get("NUCLEUS_PROCS_PER_GPU", "1")),
        "torch": torch.__version__,
        "config": args.config,
        "opts": args.opts,
        "config_text": Path(args.config).read_text(),
        "train_minutes": args.train_minutes,
        "iterations": _final_iteration(run / "train" / "final_metrics.json"),
        "total_minutes": args.total_minutes,
        "dsb_sample": _metrics(run / "eval" / "nucleus_dsb_sample" / "metrics.json"),
        "synthetic_val": _metrics(run / "eval" / "nucleus_synth_val" / "metrics.json"),
        "baseline_dsb_sample": _metrics(run / "baseline" / "nucleus_dsb_sample" / "metrics.json"),
        "baseline_synthetic_val": _metrics(run / "baseline" / "nucleus_synth_val" / "metrics.json"),
        "untuned_dsb_sample": _metrics(run / "eval_untuned" / "nucleus_dsb_sample" / "metrics.json"),
        "untuned_synthetic_val": _metrics(run / "eval_untuned" / "nucleus_synth_val" / "metrics.json"),
        "tuned_inference": json.loads((run / "tune" / "tune.json").read_text())["best"],
        "robustness": _robustness(run / "robustness" / "robustness.json"),
        "robustness_synthetic_val": _robustness(run / "robustness_synth" / "robustness.json"),
        "generator": {"version": GENERATOR_VERSION, "features": _features(args.config, args.opts)},
    }
    report["dsb_sample_by_zoom"] = _by_zoom(report["robustness"])
    out = args.out or (Path(__file__).resolve().parent.parent / "benchmarks" / "results"
                       / f"accuracy_{report['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("dsb_sample", "synthetic_val", "untuned_dsb_sample",
                                             "baseline_dsb_sample", "tuned_inference", "train_minutes")}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
