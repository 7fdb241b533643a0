#!/usr/bin/env bash
# The README's main job on the embedded default: generate synthetic nuclei, train the R101-FPN model
# (short CPU schedule without a GPU, the full one with), evaluate on held-out synthetic images and on
# the real DSB-2018 sample next to the classical baseline, and predict on the real image.
# Outputs land in $NUCLEUS_DEMO_OUT (default output/demo): metrics.json files and PNG overlays.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${NUCLEUS_DEMO_OUT:-output/demo}
if python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  CFG=${NUCLEUS_DEMO_CONFIG:-configs/nucleus_R101_FPN_scratch.yaml}
else
  CFG=${NUCLEUS_DEMO_CONFIG:-configs/nucleus_R101_FPN_cpu_demo.yaml}
fi
echo "[demo] config $CFG, outputs in $OUT"
# DATASETS.TEST "()": the evaluation below is the one that counts; no second one at the end of training
nucleus-train --config-file "$CFG" --overwrite OUTPUT_DIR "$OUT/train" DATASETS.TEST "()"
WEIGHTS="$OUT/train/model_final.pth"
nucleus-eval --config-file "$CFG" --dataset nucleus_synth_val --dataset nucleus_dsb_sample \
  --output "$OUT/eval" MODEL.WEIGHTS "$WEIGHTS"
nucleus-eval --config-file "$CFG" --baseline watershed --dataset nucleus_synth_val --dataset nucleus_dsb_sample \
  --output "$OUT/baseline"
nucleus-predict --config-file "$CFG" --input nucleus_seg/data/sample/image.tif --output "$OUT/predict" \
  MODEL.WEIGHTS "$WEIGHTS"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for kind in ("eval", "baseline"):
    for f in sorted((out / kind).rglob("metrics.json")):
        m = json.loads(f.read_text())
        keys = ("dsb_score", "ap50", "f1_50", "pq", "n_images")
        print(f"[demo] {kind:8s} {f.parent.name:22s} " + "  ".join(f"{k}={m.get(k, float('nan')):.3f}" for k in keys))
print("[demo] pictures:", *sorted(str(p) for p in out.rglob("*.png")), sep="\n  ")
PY
