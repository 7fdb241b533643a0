#!/usr/bin/env bash
# Recipe ablation: the accuracy recipe (scripts/train_synthetic.sh) once per arm, each arm alone on one GPU,
# all at once. An arms file has one arm per line, "name [KEY VALUE ...]" (config overrides; '#' comments);
# arms beyond the GPU count are skipped. Each arm writes OUT/arm_<name>.json (the recipe's accuracy JSON)
# and OUT/arm_<name>.log.
# Usage: [ABLATION_ARMS=benchmarks/arms/scale.txt] benchmarks/accuracy_ablation.sh OUT [KEY VALUE ...]
# (trailing opts go to every arm, before the arm's own)
set -uo pipefail
set -f  # arm values such as [0.6] are config literals, not file globs
cd "$(dirname "$0")/.."
OUT=$1; shift
ARMS_FILE=${ABLATION_ARMS:-benchmarks/arms/scale.txt}
mkdir -p "$OUT"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
# each arm is the recipe exactly, as from a clean checkout: its own data generation, into its own
# NUCLEUS_DATASETS folder, inside its own time budget (the budget counts from nucleus-train's launch)
mapfile -t ARMS < <(grep -v '^\s*#' "$ARMS_FILE" | grep -v '^\s*$')
pids=()
for i in "${!ARMS[@]}"; do
  [ "$i" -lt "$NGPU" ] || break
  read -r -a opts <<< "${ARMS[$i]}"
  name=${opts[0]}
  CUDA_VISIBLE_DEVICES=$i NUCLEUS_ACCURACY_JSON="$OUT/arm_$name.json" \
    NUCLEUS_DATASETS="${NUCLEUS_DATASETS:-/tmp/nucleus_datasets}/arm_$name" \
    bash scripts/train_synthetic.sh "/tmp/arm_$name" "$@" "${opts[@]:1}" > "$OUT/arm_$name.log" 2>&1 &
  pids+=($!)
  echo "arm $name (${opts[*]:1}) on GPU $i: pid ${pids[-1]}"
done
for pid in "${pids[@]}"; do wait "$pid"; echo "pid $pid exit $?"; done
