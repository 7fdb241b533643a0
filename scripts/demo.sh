#!/usr/bin/env bash
# `make demo`: generate synthetic nuclei, train a model on them (the CPU demo config without a GPU, the full
# scratch config with one), score it and the classical watershed on held-out synthetic images and on the real
# DSB-2018 sample, predict the real sample, and say where everything is. Writes $NUCLEUS_DEMO_OUT (default
# output/demo): train/ (model_final.pth, curves, log), eval/ and baseline/ (metrics.json, PNGs), predict/,
# summary.json (wall minutes per phase, the two real-sample scores, the CPU and whether it has bfloat16).
# NUCLEUS_DEMO_OPTS="KEY VALUE ..." adds config overrides (the test shortens the schedule with it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${NUCLEUS_DEMO_OUT:-output/demo}
t0=$(date +%s)
started=${NUCLEUS_DEMO_STARTED:-$t0}  # set by `make demo` before the set-up
if python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  CFG=${NUCLEUS_DEMO_CONFIG:-configs/nucleus_R101_FPN_scratch.yaml}
else
  CFG=${NUCLEUS_DEMO_CONFIG:-configs/nucleus_R18_FPN_cpu_demo.yaml}
fi
read -r -a OPTS <<< "${NUCLEUS_DEMO_OPTS:-}"
say() { printf '[demo %s] %s\n' "$(date -u -d @$(( $(date +%s) - started )) +%M:%S)" "$*"; }
say "config $CFG, outputs in $OUT"

say "1/4 synthetic training and validation images"
python - "$CFG" "${OPTS[@]}" <<'PY'
import sys
from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.data.catalog import generate_synthetic_data
generate_synthetic_data(get_nucleus_cfg(sys.argv[1], sys.argv[2:]))
PY
t1=$(date +%s)

say "2/4 training (a line every few iterations, with the time left)"
# DATASETS.TEST "()": the evaluation below is the one that counts; no second one at the end of training
nucleus-train --config-file "$CFG" --overwrite OUTPUT_DIR "$OUT/train" DATASETS.TEST "()" "${OPTS[@]}"
t2=$(date +%s)
WEIGHTS="$OUT/train/model_final.pth"

say "3/4 scoring the model and the watershed baseline (synthetic validation images, the real DSB-2018 sample)"
nucleus-eval --config-file "$OUT/train/config.yaml" --dataset nucleus_synth_val --dataset nucleus_dsb_sample \
  --output "$OUT/eval" MODEL.WEIGHTS "$WEIGHTS" 2>&1 | grep -E "dsb_score=|error" || true
nucleus-eval --config-file "$OUT/train/config.yaml" --baseline watershed --dataset nucleus_synth_val \
  --dataset nucleus_dsb_sample --output "$OUT/baseline" 2>&1 | grep -E "dsb_score=|error" || true
say "4/4 predicting the real sample"
nucleus-predict --config-file "$OUT/train/config.yaml" --input nucleus_seg/data/sample/image.tif \
  --output "$OUT/predict" MODEL.WEIGHTS "$WEIGHTS" 2>&1 | grep -E "images have outputs|error" || true
t3=$(date +%s)

python - "$OUT" "$CFG" "$started" "$t0" "$t1" "$t2" "$t3" <<'PY'
import json, platform, sys
from pathlib import Path
from nucleus_seg.modeling.precision import cpu_has_native_bfloat16
from nucleus_seg.utils.files import write_json

out, cfg = Path(sys.argv[1]), sys.argv[2]
started, t0, t1, t2, t3 = (int(t) for t in sys.argv[3:])
minutes = lambda a, b: round((b - a) / 60, 2)  # noqa: E731
def score(kind, dataset):
    path = out / kind / dataset / "metrics.json"
    return round(json.loads(path.read_text())["dsb_score"], 4) if path.is_file() else None
cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
summary = {
    "benchmark": "demo", "config": cfg, "wall_minutes": minutes(started, t3),
    "minutes": {"setup": minutes(started, t0), "data": minutes(t0, t1), "training": minutes(t1, t2),
                "evaluation": minutes(t2, t3)},
    "dsb_sample": score("eval", "nucleus_dsb_sample"), "watershed_sample": score("baseline", "nucleus_dsb_sample"),
    "dsb_synthetic_val": score("eval", "nucleus_synth_val"),
    "watershed_synthetic_val": score("baseline", "nucleus_synth_val"),
    "cpu": cpu, "cpu_count": __import__("os").cpu_count(), "bfloat16": cpu_has_native_bfloat16(),
}
write_json(out / "summary.json", summary)
print(f"""
[demo] done in {summary['wall_minutes']:.1f} min ({', '.join(f'{k} {v:.1f}' for k, v in summary['minutes'].items())})
[demo] real DSB-2018 sample, DSB score: model {summary['dsb_sample']}, watershed {summary['watershed_sample']}
[demo] synthetic validation, DSB score: model {summary['dsb_synthetic_val']}, watershed {summary['watershed_synthetic_val']}
[demo] outputs: {out}/predict (label TIFF, overlay PNG, measurements CSV), {out}/eval and {out}/baseline
       (metrics.json, curves.png, worst-image overlays), {out}/train (model_final.pth, curves), {out}/summary.json
[demo] your own images:
       nucleus-predict --config-file {out}/train/config.yaml --input 'your_images/*.tif' --output predictions \\
           MODEL.WEIGHTS {out}/train/model_final.pth""")
PY
