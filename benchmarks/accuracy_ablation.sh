#!/usr/bin/env bash
# Generator ablation: the accuracy recipe (scripts/train_synthetic.sh) once per generator feature set, each
# arm alone on one GPU, all at once. Each arm writes OUT/arm_<name>.json (the recipe's accuracy JSON) and
# OUT/arm_<name>.log. Usage: benchmarks/accuracy_ablation.sh OUT [KEY VALUE ...]  (opts go to every arm)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$1; shift
mkdir -p "$OUT"
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
# name and NUCLEUS.SYNTH.FEATURES of each arm, most informative first (arms beyond the GPU count are skipped)
ARMS=("all:['contact','daughters','bright_tail']" "v1:[]" "contact:['contact']"
      "no_contact:['daughters','bright_tail']")
pids=()
for i in "${!ARMS[@]}"; do
  [ "$i" -lt "$NGPU" ] || break
  name=${ARMS[$i]%%:*}; features=${ARMS[$i]#*:}
  CUDA_VISIBLE_DEVICES=$i NUCLEUS_ACCURACY_JSON="$OUT/arm_$name.json" \
    bash scripts/train_synthetic.sh "/tmp/arm_$name" NUCLEUS.SYNTH.FEATURES "$features" "$@" \
    > "$OUT/arm_$name.log" 2>&1 &
  pids+=($!)
  echo "arm $name (features $features) on GPU $i: pid ${pids[-1]}"
done
for pid in "${pids[@]}"; do wait "$pid"; echo "pid $pid exit $?"; done
