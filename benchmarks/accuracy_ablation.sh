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
CFG=${NUCLEUS_RECIPE_CONFIG:-configs/nucleus_R101_FPN_synth_h100.yaml}
# arms that share generator settings would each generate the same images: make each set once, all cores
mapfile -t ARMS < <(grep -v '^\s*#' "$ARMS_FILE" | grep -v '^\s*$')
gen_start=$(date +%s)
python3 -c 'import sys
from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.engine.trainer import generate_synthetic_data
args = sys.argv[2:]
arms, common = args[:args.index("--")], args[args.index("--") + 1:]
for arm in arms:  # one process: one import; a set already made is only re-read
    generate_synthetic_data(get_nucleus_cfg(sys.argv[1], common + arm.split()[1:]))' \
  "$CFG" "${ARMS[@]:0:$NGPU}" -- "$@"
# a recipe run generates inside its training time; here it happened before: the report adds it back
NUCLEUS_DATA_GENERATION_MINUTES=$(python3 -c "print(round(($(date +%s) - $gen_start) / 60, 2))")
export NUCLEUS_DATA_GENERATION_MINUTES
echo "data generation: $NUCLEUS_DATA_GENERATION_MINUTES min"
pids=()
for i in "${!ARMS[@]}"; do
  [ "$i" -lt "$NGPU" ] || break
  read -r -a opts <<< "${ARMS[$i]}"
  name=${opts[0]}
  CUDA_VISIBLE_DEVICES=$i NUCLEUS_ACCURACY_JSON="$OUT/arm_$name.json" \
    bash scripts/train_synthetic.sh "/tmp/arm_$name" "$@" "${opts[@]:1}" > "$OUT/arm_$name.log" 2>&1 &
  pids+=($!)
  echo "arm $name (${opts[*]:1}) on GPU $i: pid ${pids[-1]}"
done
for pid in "${pids[@]}"; do wait "$pid"; echo "pid $pid exit $?"; done
