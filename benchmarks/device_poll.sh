#!/usr/bin/env bash
# Polling step for a run longer than one call on a lent GPU machine. The machine is handed back ~30 s
# after a call ends, so such a run is started detached (setsid nohup bash -c '...; echo $? > RC' &) and
# every later call runs this at once: wait up to SECONDS for RC, then pack every small result written so far
# (JSON, logs, the training log, the real-sample PNGs, predicted label TIFFs) into OUT/partial.tgz. A machine
# lost between calls then loses only what came after the last poll (session 5 lost four finished trainings that
# way).
# Usage: benchmarks/device_poll.sh RC_FILE SECONDS OUT [DIR ...]   (default DIRs: /tmp/suite_out /tmp/arm_* /tmp/acc)
set -uo pipefail
RC=$1; WAIT=$2; OUT=$3; shift 3
DIRS=("$@")
[ ${#DIRS[@]} -gt 0 ] || DIRS=(/tmp/suite_out /tmp/arm_* /tmp/acc)
# a machine handed back between calls comes back bare: say so at once instead of polling it for WAIT seconds
# (session 7 spent 9 device-minutes polling a fresh machine after a reply was delayed past the idle release)
found=0; for d in "${DIRS[@]}"; do [ -e "$d" ] && found=1; done
if [ ! -f "$RC" ] && [ $found = 0 ]; then
  echo "no run on this machine: none of ${DIRS[*]} exists (it was handed back; this one is fresh)"; exit 3
fi
end=$(( $(date +%s) + WAIT ))
while [ ! -f "$RC" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
if [ -f "$RC" ]; then echo "finished: exit $(cat "$RC")"; else echo "still running"; fi
mkdir -p "$OUT"
find "${DIRS[@]}" -type f -size -4M \( -name '*.json' -o -name '*.jsonl' -o -name 'profile*.txt' -o -name '*.log' -o -name 'log.txt' -o -name 'tuned.yaml' \
  -o -path '*nucleus_dsb_sample/*.png' -o -name 'training_loss.png' -o -name 'image_overlay.png' \
  -o -name 'robustness_grid.png' -o -name 'adapt_grid.png' -o -name 'before_after.png' -o -name '*_labels.tif' \) 2>/dev/null \
  | tar czf "$OUT/partial.tgz" -T - 2>/dev/null
echo "packed $(tar tzf "$OUT/partial.tgz" 2>/dev/null | wc -l) files, $(du -h "$OUT/partial.tgz" | cut -f1)"
