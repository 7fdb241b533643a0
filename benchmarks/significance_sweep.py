"""Choosing ``NUCLEUS.PREDICT.MIN_SIGNIFICANCE`` (``--rule significance``) or ``MIN_EDGE_SIGNIFICANCE`` (``--rule
edge``, judged after the config's ``MIN_SIGNIFICANCE`` as the predictor does) on labelled validation images, clean
and with the robustness suite's photometric variants, plus the suite's background-only fields.

Each image is predicted once with the rule off; every threshold is then applied to that prediction exactly as the
predictor applies it (``keep_significant`` on the label image), and scored (mean DSB per image) and counted.
Choose on synthetic validation (e.g. ``nucleus_synth_val`` or a folder of held-out generated fields), never on
the real sample.

    python benchmarks/significance_sweep.py --config-file CFG [--weights W] --dataset DATASET [--images 12]
        [--variants noise_snr5] [--background all] [--thresholds 0,5,6,8,10,12,16] [--rule significance|edge]
        [KEY VALUE ...]

Prints one JSON line: per variant (``clean`` and each photometric one) ``{threshold: [mean DSB, instances]}``,
per background field ``{threshold: detections}``. ``--on-labels`` runs no model and reports, per variant, the
share of the labelled nuclei each threshold would drop, judged on the labels' own outlines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_facts, emit, validation_sweep_parser  # noqa: E402
from robustness import BACKGROUND, _pairs, _true_diameter, background, photometric  # noqa: E402


def below_on_labels(cfg, pairs, variant: str, measure, thresholds: list[float]) -> dict:
    """``{threshold: share of the labelled nuclei the rule would drop}``: the rule judged on the labels' own
    outlines, so the figure does not depend on which nuclei a given model finds (a weak model misses the faint
    nuclei a rule would wrongly drop, and then looks unharmed by it)."""
    from nucleus_seg.data.io import normalize_from_cfg
    from nucleus_seg.inference.significance import gray_image

    values = []
    for image, labels in pairs:
        shown = image if variant == "clean" else photometric(image, labels, variant)
        found = measure(labels, gray_image(normalize_from_cfg(shown, cfg)))
        values.append(found[np.bincount(labels.ravel(), minlength=len(found) + 1)[1:len(found) + 1] > 0])
    values = np.concatenate(values)
    row = {f"{t:g}": round(float(np.mean(values < t)), 4) for t in thresholds}
    print(f"[labels] {variant:12s} " + "  ".join(f"{t}: {v:.3f}" for t, v in row.items()), file=sys.stderr, flush=True)
    return {"nuclei": int(values.size), "dropped": row}


def run(args: argparse.Namespace) -> dict:
    from nucleus_seg import NucleusPredictor, get_nucleus_cfg
    from nucleus_seg.evaluation.matching import dsb_score
    from nucleus_seg.inference.significance import keep_significant, label_edge_significance, label_significance

    cfg = get_nucleus_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights] if args.weights else [])
    cfg.merge_from_list(args.opts)
    first = float(cfg.NUCLEUS.PREDICT.MIN_SIGNIFICANCE) if args.rule == "edge" else 0.0  # applied before the sweep
    cfg.merge_from_list(["NUCLEUS.PREDICT.MIN_SIGNIFICANCE", "0.0", "NUCLEUS.PREDICT.MIN_EDGE_SIGNIFICANCE", "0.0"])
    measure = label_edge_significance if args.rule == "edge" else label_significance
    thresholds = [float(t) for t in args.thresholds.split(",")]
    pairs = _pairs(args.dataset)[:args.images]
    variants = ["clean"] + [v for v in args.variants.split(",") if v]
    if args.on_labels:
        return {variant: below_on_labels(cfg, pairs, variant, measure, thresholds) for variant in variants}
    predictor = NucleusPredictor(cfg)
    report: dict = {}

    def judged(image: np.ndarray):
        norm = predictor.normalize(image)
        pred = keep_significant(predictor.predict_labels([image])[0], norm, first)
        return [keep_significant(pred, norm, t, measure) for t in thresholds]

    for variant in variants:
        scores: list[list[float]] = [[] for _ in thresholds]
        counts = [0] * len(thresholds)
        for image, labels in pairs:
            shown = image if variant == "clean" else photometric(image, labels, variant)
            for k, pred in enumerate(judged(shown)):
                scores[k].append(dsb_score(labels, pred.labels))
                counts[k] += len(pred)
        report[variant] = {f"{t:g}": [round(float(np.mean(s)), 4), c] for t, s, c in zip(thresholds, scores, counts)}
        print(f"[{args.rule}] {variant:12s} " + "  ".join(f"{t}: {v[0]:.4f}" for t, v in report[variant].items()),
              file=sys.stderr, flush=True)
    diameters = [d for d in (_true_diameter(labels) for _, labels in pairs) if d]
    diameter = float(np.median(diameters)) if diameters else 24.0
    fields = BACKGROUND if args.background == "all" else [b for b in args.background.split(",") if b]
    report["background"] = {kind: {f"{t:g}": len(p) for t, p in zip(thresholds, judged(background(kind, diameter)))}
                            for kind in fields}
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = validation_sweep_parser(__doc__)
    parser.add_argument("--background", default="all", help=f"comma list of {', '.join(BACKGROUND)}, or all")
    parser.add_argument("--thresholds", default="0,5,6,8,10,12,16")
    parser.add_argument("--rule", choices=("significance", "edge"), default="significance")
    parser.add_argument("--on-labels", action="store_true",
                        help="no model: the share of the labelled nuclei each threshold drops, per variant")
    args = parser.parse_args(argv)
    line = {"benchmark": "significance_sweep", **device_facts(), "config": args.config_file,
            "weights": args.weights or "(config)", "dataset": args.dataset, "images": args.images,
            "variant": f"rule {args.rule}{' on labels' if args.on_labels else ''}; variants {args.variants}; "
                       f"background {'none' if args.on_labels else args.background}", **run(args)}
    emit(line, args.save)
    return line


if __name__ == "__main__":
    main()
