#!/usr/bin/env bash
# Accuracy recipe: train R101-FPN from scratch on synthetic nuclei only, then score it on held-out
# synthetic images and on the real DSB-2018 sample, next to the classical watershed baseline.
# Usage: [NUCLEUS_NUM_GPUS=2] [NUCLEUS_PROCS_PER_GPU=2] scripts/train_synthetic.sh [OUT] [KEY VALUE ...]
# With N training processes in all (GPUs x processes per GPU) the batch and LR scale by N and MAX_ITER
# by 1/N (SOLVER.REFERENCE_WORLD_SIZE 1).
# Writes OUT/train (checkpoints, curves), OUT/eval/<dataset>/metrics.json + overlays, OUT/baseline/...,
# and benchmarks/results/accuracy_<date>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/synth_h100}; shift || true
CFG=${NUCLEUS_RECIPE_CONFIG:-configs/nucleus_R101_FPN_synth_h100.yaml}
start=$(date +%s)
nucleus-train --config-file "$CFG" --num-gpus "${NUCLEUS_NUM_GPUS:-1}" \
  --procs-per-gpu "${NUCLEUS_PROCS_PER_GPU:-1}" OUTPUT_DIR "$OUT/train" DATASETS.TEST "()" "$@"
train_end=$(date +%s)
nucleus-eval --config-file "$CFG" --dataset nucleus_synth_val --dataset nucleus_dsb_sample \
  --output "$OUT/eval" MODEL.WEIGHTS "$OUT/train/model_final.pth" "$@"
nucleus-eval --config-file "$CFG" --baseline watershed --dataset nucleus_synth_val --dataset nucleus_dsb_sample \
  --output "$OUT/baseline" "$@"
nucleus-predict --config-file "$CFG" --input nucleus_seg/data/sample/image.tif --output "$OUT/predict" \
  MODEL.WEIGHTS "$OUT/train/model_final.pth" "$@"
python scripts/accuracy_report.py --run "$OUT" --config "$CFG" \
  --train-minutes "$(python -c "print(round(($train_end - $start) / 60, 2))")" \
  --total-minutes "$(python -c "import time; print(round((time.time() - $start) / 60, 2))")" -- "$@"
