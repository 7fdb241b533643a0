"""Choosing ``NUCLEUS.PREDICT.BOUNDARY_LEVEL`` (and the band and smoothing widths of
``nucleus_seg.inference.boundaries``) on labelled validation images, clean and with the robustness suite's
photometric variants.

Each image is predicted once with the step off; every setting is then applied to that prediction exactly as the
predictor applies it (``snap_boundaries`` on the label image) and scored (mean DSB per image). Choose on synthetic
validation (e.g. ``nucleus_synth_val`` or a folder of held-out generated fields), never on the real sample.

    python benchmarks/boundary_sweep.py --config-file CFG [--weights W] --dataset DATASET [--images 12]
        [--variants noise_snr5] [--levels 0,0.4,0.5] [--bands 0.0625] [--smooths 0.0625] [KEY VALUE ...]

Prints one JSON line: per variant (``clean`` and each photometric one) ``{"level/band/smooth": mean DSB}``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_facts, emit, validation_sweep_parser  # noqa: E402
from robustness import _pairs, photometric  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


def run(args: argparse.Namespace) -> dict:
    from nucleus_seg import NucleusPredictor, get_nucleus_cfg
    from nucleus_seg.evaluation.matching import dsb_score
    from nucleus_seg.inference import boundaries

    cfg = get_nucleus_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights] if args.weights else [])
    cfg.merge_from_list(args.opts + ["NUCLEUS.PREDICT.BOUNDARY_LEVEL", "0.0"])
    predictor = NucleusPredictor(cfg)
    settings = list(itertools.product(_floats(args.levels), _floats(args.bands), _floats(args.smooths)))
    pairs = _pairs(args.dataset)[:args.images]
    report: dict = {}
    widths = boundaries.BAND_PER_DIAMETER, boundaries.SMOOTH_PER_DIAMETER
    for variant in ["clean"] + [v for v in args.variants.split(",") if v]:
        scores: list[list[float]] = [[] for _ in settings]
        for image, labels in pairs:
            shown = image if variant == "clean" else photometric(image, labels, variant)
            pred = predictor.predict_labels([shown])[0]
            norm = predictor.normalize(shown)
            for k, (level, band, smooth) in enumerate(settings):
                boundaries.BAND_PER_DIAMETER, boundaries.SMOOTH_PER_DIAMETER = band, smooth
                try:
                    scores[k].append(dsb_score(labels, boundaries.snap_boundaries(pred, norm, level).labels))
                finally:
                    boundaries.BAND_PER_DIAMETER, boundaries.SMOOTH_PER_DIAMETER = widths
        report[variant] = {f"{lv:g}/{b:.4g}/{s:.4g}": round(float(np.mean(v)), 4)
                           for (lv, b, s), v in zip(settings, scores)}
        print(f"[boundary] {variant:12s} " + "  ".join(f"{k}: {v:.4f}" for k, v in report[variant].items()),
              file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = validation_sweep_parser(__doc__)
    parser.add_argument("--levels", default="0,0.4,0.5", help="BOUNDARY_LEVEL values (0: off)")
    parser.add_argument("--bands", default="0.0625", help="band widths, per typical diameter")
    parser.add_argument("--smooths", default="0.0625", help="smoothing sigmas, per typical diameter")
    args = parser.parse_args(argv)
    line = {"benchmark": "boundary_sweep", **device_facts(), "config": args.config_file,
            "weights": args.weights or "(config)", "dataset": args.dataset, "images": args.images,
            "variant": f"variants {args.variants}; levels {args.levels}; bands {args.bands}; "
                       f"smooths {args.smooths}", **run(args)}
    emit(line, args.save)
    return line


if __name__ == "__main__":
    main()
