"""Accuracy across magnifications: one trained model on a dataset rescaled by each zoom (``NAME@xZ``, nuclei
Z times as wide), three ways:

* ``auto``: the config's inference with the diameter estimated per image (``NUCLEUS.PREDICT.DIAMETER -1``);
* ``own_scale``: no rescale (``DIAMETER 0``), the input as detectron2's ``DefaultPredictor`` sees it;
* ``watershed``: the classical baseline (``nucleus-eval --baseline watershed``).

Real nuclei come at ~4 to ~60 px radius depending on magnification; the DSB sample's are ~12 px, so
zooms 0.33-5 span most of that range. Prints one JSON line (``--save`` appends it to benchmarks/results/).

    python benchmarks/scale_sweep.py --config-file CFG [--weights W] [--dataset nucleus_dsb_sample]
        [--zooms 0.33,0.5,0.7,1,1.4,2,3] [--output DIR] [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_facts, emit  # noqa: E402

METRICS = ("dsb_score", "ap50", "f1_50", "pq", "n_pred")


def evaluate(args: argparse.Namespace, datasets: list[str], mode: str, out: Path) -> dict[str, dict]:
    """One nucleus-eval run (one model build) over every zoomed copy; metrics per dataset."""
    from nucleus_seg.cli.evaluate import main as eval_main
    from nucleus_seg.data.catalog import dataset_dirname

    argv = ["--config-file", args.config_file, "--output", str(out / mode), "--num-worst", "0"]
    argv += [a for d in datasets for a in ("--dataset", d)]
    if mode == "watershed":
        argv[:0] = ["--baseline", "watershed"]
    else:
        argv += ["NUCLEUS.PREDICT.DIAMETER", "-1.0" if mode == "auto" else "0.0"]
        if args.weights:
            argv += ["MODEL.WEIGHTS", args.weights]
    start = time.perf_counter()
    if eval_main(argv) != 0:
        raise RuntimeError(f"nucleus-eval {' '.join(argv)} failed")
    rows = {}
    for dataset in datasets:
        metrics = json.loads((out / mode / dataset_dirname(dataset) / "metrics.json").read_text())
        rows[dataset] = {k: round(float(metrics[k]), 4) for k in METRICS if k in metrics}
        print(f"[scale_sweep] {dataset:30s} {mode:10s} dsb {rows[dataset]['dsb_score']:.3f}  "
              f"ap50 {rows[dataset]['ap50']:.3f}", file=sys.stderr, flush=True)
    rows["seconds"] = round(time.perf_counter() - start, 1)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="MODEL.WEIGHTS (default: the config's)")
    parser.add_argument("--dataset", default="nucleus_dsb_sample")
    parser.add_argument("--zooms", default="0.33,0.5,0.7,1,1.4,2,3")
    parser.add_argument("--modes", default="auto,own_scale,watershed")
    parser.add_argument("--output", default="", help="evaluation outputs (default: a temp folder)")
    parser.add_argument("--save", default="")
    args = parser.parse_args(argv)

    zooms = [float(z) for z in args.zooms.split(",")]
    modes = args.modes.split(",")
    out = Path(args.output or tempfile.mkdtemp(prefix="scale_sweep_"))
    names = {f"x{z:g}": f"{args.dataset}@x{z:g}" for z in zooms}
    rows: dict[str, dict[str, dict]] = {}
    seconds = {}
    for mode in modes:
        by_name = evaluate(args, list(names.values()), mode, out)
        seconds[mode] = by_name.pop("seconds")
        rows[mode] = {key: by_name[name] for key, name in names.items()}
    summary = {mode: {"mean_dsb": round(sum(r["dsb_score"] for r in by_zoom.values()) / len(by_zoom), 4),
                      "min_dsb": min(r["dsb_score"] for r in by_zoom.values())}
               for mode, by_zoom in rows.items()}
    emit({"benchmark": "scale_sweep", **device_facts(), "config": args.config_file,
          "weights": args.weights or "(config)", "variant": "auto diameter vs own scale vs watershed",
          "dataset": args.dataset, "zooms": zooms,
          "summary": summary, "by_mode": rows, "seconds": seconds}, args.save)


if __name__ == "__main__":
    main()
