#!/usr/bin/env bash
# One GPU session's worth of measurements, for a node with no network (e.g. the lent H100s):
#   1. install nucleus_seg from an offline wheelhouse (scripts/wheelhouse.py --pack) and prove it:
#      --version and 20 training iterations, from outside the repository;
#   2. the accuracy recipe (scripts/train_synthetic.sh) in the background on the last GPU;
#   3. on GPU 0: training throughput, inference throughput, predict_large on an 8192^2 mosaic.
# Usage: benchmarks/gpu_suite.sh WHEELHOUSE_TAR_XZ OUT_DIR [stages...]
# stages: install smoke ablation accuracy train profile profile_infer infer predict large scaling adapt (default:
# all but predict and adapt). JSON lines go to OUT_DIR/results.jsonl.
# The speed issue's three ratios in one run (one GPU, ~10 min on an H200): stages "install train infer predict" (training
# like for like against vanilla with 16 loader workers; inference on the standard and the recipe config; nucleus-predict
# on 256 TIFFs of 1024 px against a plain DefaultPredictor loop, with the training benchmark's weights).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
TARBALL=$1; OUT=$2; shift 2
STAGES=${*:-install smoke accuracy train profile infer large scaling}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NUCLEUS_DATASETS=/tmp/nucleus_datasets MPLBACKEND=Agg
mkdir -p "$OUT"
has() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "[suite $(date +%T)] $*"; }
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
LAST_GPU=$((NGPU - 1))

if has install; then
  log "installing from $TARBALL"
  tar xJf "$TARBALL" -C /tmp || exit 1
  python3 -m pip install -q --no-index --find-links /tmp/wheelhouse ${EXTRA_WHEELS:+--find-links $EXTRA_WHEELS} \
    nucleus_seg 2>&1 | grep -v WARNING | tail -3
fi
if has smoke; then
  log "wheelhouse proof: installed package, outside the repository"
  (cd /tmp && python3 -m nucleus_seg --version && CUDA_VISIBLE_DEVICES=0 nucleus-train \
     --config-file "$REPO/configs/nucleus_R101_FPN_scratch.yaml" SOLVER.MAX_ITER 20 SOLVER.IMS_PER_BATCH 8 \
     NUCLEUS.SYNTH.NUM_TRAIN 32 NUCLEUS.SYNTH.NUM_VAL 0 DATASETS.TEST "()" OUTPUT_DIR /tmp/smoke 2>&1 \
     | grep -E "iter: (0|9|19) |Overall training|Total|Error|error" | cut -c1-400)
fi
# from here on the repository's code (it may be newer than the wheel)
export PYTHONPATH=$REPO
cd "$REPO"
ACC_PID=""
collect_accuracy() {
  tail -5 "$OUT/accuracy.log"
  cp benchmarks/results/accuracy_*.json "$OUT/" 2>/dev/null
  cp /tmp/acc/predict/image_overlay.png "$OUT/dsb_sample_overlay.png" 2>/dev/null; cp /tmp/acc/eval/nucleus_dsb_sample/worst_01_*.png "$OUT/dsb_sample_gt_vs_pred.png" 2>/dev/null
  cp /tmp/acc/train/training_loss.png "$OUT/" 2>/dev/null
  cp /tmp/acc/robustness/robustness_grid.png /tmp/acc/robustness/robustness.json "$OUT/" 2>/dev/null
}
if has ablation; then
  log "generator ablation: one accuracy recipe per GPU (benchmarks/accuracy_ablation.sh)"
  timeout "${ABLATION_TIMEOUT:-100000}" bash benchmarks/accuracy_ablation.sh "$OUT" ${ACC_OPTS:-}
  log "ablation exit $?"
  (cd /tmp && tar czf "$OUT/arm_details.tgz" arm_*/tune/tune.json arm_*/eval/*/metrics.json \
     arm_*/eval_untuned/*/metrics.json arm_*/eval/nucleus_dsb_sample/*.png arm_*/predict/image_overlay.png \
     arm_*/train/log.txt "$OUT"/arm_*.log 2>/dev/null)
  rm -f "$OUT"/arm_*.log
fi
if has accuracy && [ "${ACC_GPUS:-1}" -gt 1 ]; then
  log "accuracy recipe on $ACC_GPUS GPUs (foreground)"
  NUCLEUS_NUM_GPUS=$ACC_GPUS env ${ACC_PROCS:+NUCLEUS_PROCS_PER_GPU=$ACC_PROCS} bash scripts/train_synthetic.sh /tmp/acc ${ACC_OPTS:-} > "$OUT/accuracy.log" 2>&1
  log "accuracy recipe exit $?"; collect_accuracy
elif has accuracy; then
  log "accuracy recipe on GPU $LAST_GPU (background)"
  # the recipe's own process count (2 per GPU) unless ACC_PROCS says otherwise
  CUDA_VISIBLE_DEVICES=$LAST_GPU env ${ACC_PROCS:+NUCLEUS_PROCS_PER_GPU=$ACC_PROCS} bash scripts/train_synthetic.sh /tmp/acc ${ACC_OPTS:-} > "$OUT/accuracy.log" 2>&1 &
  ACC_PID=$!
fi
# the training benchmark's weights: one folder per variant (/tmp/train_bench/VARIANT/ours); a one-process
# variant ran the most iterations (session 13's suite missed them at the old path and ran on random weights)
train_bench_weights() { ls /tmp/train_bench/1x*/ours/model_final.pth /tmp/train_bench/*/ours/model_final.pth 2>/dev/null | head -1; }
# inference benchmarks use the accuracy recipe's model when there is one (trained weights make the
# AMP-vs-fp32 mask agreement meaningful), else the training benchmark's
WEIGHTS=/tmp/acc/train/model_final.pth INFER_CONFIG=configs/nucleus_R101_FPN_synth_h100.yaml
# weights and config always from the same run: the recipe's Cascade heads do not load into the standard
# config (the predictor now refuses such a checkpoint; it used to give median mask IoU 0.36 silently)
[ -f "$WEIGHTS" ] || { WEIGHTS=$(train_bench_weights); INFER_CONFIG=configs/nucleus_R101_FPN_scratch.yaml; }
INFER_GPU=0
SIDE_PID=""
if [ "$NGPU" -gt 1 ] && [ -z "$ACC_PID" ] && [ -f "$WEIGHTS" ]; then
  INFER_GPU=$LAST_GPU  # inference benchmarks beside the training benchmark, on the other GPU
fi
infer_stages() {
  if has large; then
    log "predict_large 8192^2 on GPU $INFER_GPU (weights: $WEIGHTS)"
    CUDA_VISIBLE_DEVICES=$INFER_GPU python3 benchmarks/predict_large.py --config-file "$INFER_CONFIG" \
      --weights "$WEIGHTS" --size 8192 \
      --save "$OUT/results.jsonl" 2>&1 | grep -E '^\{|Error|error' | cut -c1-3000
  fi
  if has infer; then
    # INFER_CONFIGS: more configs to time; one other than the weights' config runs on random (seeded) weights;
    # INFER_ARGS: more options (e.g. "--score-thresh 0.9" with the recipe's weights, INFER_VARIANTS "64+cl,64+cl+allstages")
    # by default both configs of the speed issue: the standard (scratch) one and the recipe's Cascade R-CNN; 128
    # images at batch 64 (two batches: the second one's images are prepared while the first runs)
    other=configs/nucleus_R101_FPN_synth_h100.yaml
    [ "$INFER_CONFIG" = "$other" ] && other=configs/nucleus_R101_FPN_scratch.yaml
    for config in "$INFER_CONFIG" ${INFER_CONFIGS-$other}; do
      w=$WEIGHTS; [ "$config" = "$INFER_CONFIG" ] || w=""
      log "inference throughput on GPU $INFER_GPU ($config, weights: ${w:-random init})"
      CUDA_VISIBLE_DEVICES=$INFER_GPU python3 benchmarks/infer_throughput.py --config-file "$config" \
        ${w:+--weights "$w"} --num-images "${INFER_IMAGES:-128}" --batch "${INFER_BATCH:-64}" \
        --variants "${INFER_VARIANTS-64+cl}" ${INFER_ARGS:-} --save "$OUT/results.jsonl" 2>&1 | grep -E '^\{|Error|error' | cut -c1-3000
    done
  fi
  if has predict && [ -z "$WEIGHTS" ]; then
    # random weights give ~400 detections per 512 px tile: the run took over 16 minutes (session 12) and timed
    # post-processing no trained model would ask for
    log "predict stage skipped: no trained weights (run the train or accuracy stage first)"
  elif has predict; then
    # PREDICT_VARIANTS: "NAME:KEY=VALUE,KEY=VALUE NAME2:..." more nucleus-predict sides in the same run
    variant_args=()
    # by default also tiled (tiles of 448 px: a 1024 px image is then past two tiles on a side, 9 tiles; with the
    # default 512 it goes through the model whole), with the backbone as CUDA graphs, and at batch 32 (8 whole
    # 1024 px images per forward instead of 4)
    for v in ${PREDICT_VARIANTS-tiles448:NUCLEUS.PREDICT.TILE_SIZE=448 graphs:NUCLEUS.PREDICT.CUDA_GRAPHS=True batch32:NUCLEUS.PREDICT.BATCH_SIZE=32}; do pairs=${v#*:}; variant_args+=(--variant "${v%%:*}" ${pairs//,/ }); done
    log "nucleus-predict end to end vs a plain DefaultPredictor loop on GPU $INFER_GPU (weights: $WEIGHTS)"
    CUDA_VISIBLE_DEVICES=$INFER_GPU python3 benchmarks/predict_throughput.py --config-file "$INFER_CONFIG" \
      ${WEIGHTS:+--weights "$WEIGHTS"} --num-images "${PREDICT_IMAGES:-256}" "${variant_args[@]}" \
      --profile "$OUT/profile_predict.txt" \
      --save "$OUT/results.jsonl" 2>&1 | grep -E '^\{|Error|error' | cut -c1-3000
  fi
}
if [ "$INFER_GPU" != 0 ]; then infer_stages & SIDE_PID=$!; fi
if has train; then
  log "train throughput on GPU 0"
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/train_throughput.py --iters ${TRAIN_ITERS:-120} --warmup 30 \
    --variants ${TRAIN_VARIANTS:-1x8+fp16+d2aug,1x16+fp16+d2aug,1x24+fp16+d2aug} --vanilla-workers ${VANILLA_WORKERS:-16} \
    --out-dir /tmp/train_bench --save "$OUT/results.jsonl" ${TRAIN_OPTS:-} 2>&1 | grep -E '^\{|Error|error' | cut -c1-3000
fi
if has profile; then
  log "profile of NucleusTrainer on GPU 0"
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/profile_train.py --iters 40 --profile-iters 8 ${TRAIN_OPTS:-} \
    > "$OUT/profile.txt" 2>&1; grep -E "median s/iter" "$OUT/profile.txt"
fi
[ -f "$WEIGHTS" ] || { WEIGHTS=$(train_bench_weights); INFER_CONFIG=configs/nucleus_R101_FPN_scratch.yaml; }
[ -f "$WEIGHTS" ] || WEIGHTS=""  # random (seeded) weights: timings only
if has profile_infer; then
  log "profile of NucleusPredictor.predict_batch on GPU 0"
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/profile_infer.py --num-images 64 --batch 32 \
    --config-file "$INFER_CONFIG" ${WEIGHTS:+--weights "$WEIGHTS"} > "$OUT/profile_infer.txt" 2>&1; grep -E "unprofiled wall" "$OUT/profile_infer.txt"
fi
if [ "$INFER_GPU" = 0 ]; then infer_stages; else wait "$SIDE_PID"; fi
if has scaling && [ "$NGPU" -gt 1 ]; then
  log "training scaling: 1 vs $NGPU GPUs, same images"
  python3 benchmarks/train_throughput.py --side scaling --num-gpus "$NGPU" --iters ${SCALING_ITERS:-200} \
    --warmup 40 --out-dir /tmp/scaling --save "$OUT/results.jsonl" 2>&1 | grep -E '^\{|Error|error' | cut -c1-3000
  log "nucleus-predict on 1 vs $NGPU GPUs"
  W=${WEIGHTS:-/tmp/scaling/1gpu/ours/model_final.pth}
  for g in 1 "$NGPU"; do
    nucleus-predict --config-file configs/nucleus_R101_FPN_scratch.yaml --input /tmp/nucleus_bench/*/*/images/*.png \
      --output "/tmp/pred_${g}gpu" --num-gpus "$g" MODEL.WEIGHTS "$W" > /dev/null 2>&1
  done
  python3 - "$NGPU" <<'PY'
import filecmp, sys
from pathlib import Path
import numpy as np, tifffile
a, b = Path("/tmp/pred_1gpu"), Path(f"/tmp/pred_{sys.argv[1]}gpu")
names = sorted(p.name for p in a.iterdir())
same = sorted(p.name for p in b.iterdir()) == names and all(
    np.array_equal(tifffile.imread(a / n), tifffile.imread(b / n)) if n.endswith(".tif") else
    filecmp.cmp(a / n, b / n, shallow=False) for n in names if not n.endswith(".png"))
print(f"nucleus-predict 1 vs {sys.argv[1]} GPUs: {len(names)} files, identical: {same}")
PY
fi
if [ -n "$ACC_PID" ]; then
  log "waiting for the accuracy recipe"
  wait "$ACC_PID"; log "accuracy recipe exit $?"; collect_accuracy
fi
if has adapt; then
  # the starting model: the recipe's when it ran, else a short run of it (ADAPT_START_MINUTES, 2000 images) made
  # once per machine (a later call on the same machine reuses it)
  START_CFG=/tmp/acc/train/config.yaml START_W=/tmp/acc/train/model_final.pth
  [ -f "$START_W" ] || START_CFG=/tmp/adapt_start/config.yaml START_W=/tmp/adapt_start/model_final.pth
  if [ ! -f "$START_W" ]; then
    log "adaptation's starting model: the recipe's config for ${ADAPT_START_MINUTES:-5.0} min"
    CUDA_VISIBLE_DEVICES=0 python3 -m nucleus_seg.cli.train --config-file configs/nucleus_R101_FPN_synth_h100.yaml \
      --procs-per-gpu 2 NUCLEUS.TRAIN.TIME_BUDGET_MINUTES "${ADAPT_START_MINUTES:-5.0}" NUCLEUS.SYNTH.NUM_TRAIN 2000 \
      NUCLEUS.TRAIN.FINAL_ONLY True OUTPUT_DIR /tmp/adapt_start > "$OUT/adapt_start.log" 2>&1
    log "starting model exit $?"
  fi
  # one suite per target group, so the first group's figures (with their control arms) exist early
  # groups "TARGETS:CONTROLS[:FIELD=VALUE,...]" separated by spaces (the third part: AdaptSettings for that group,
  # as adapt_suite.py --set; ADAPT_OPTS go to every group)
  # (first the real sample and the variants at its own scale, each with its control arm: 2026-12-02's run lost
  # every control to one stalled target)
  for group in ${ADAPT_GROUPS:-x1,gamma2,dim16:x1,gamma2,dim16 ramp,blur2,noise_snr5:ramp x0.25,x3,synth_he,synth_brightfield:}; do
    IFS=: read -r targets controls sets <<< "$group"
    set_args=(); for item in ${sets//,/ }; do set_args+=(--set "$item"); done
    arm=${targets%%,*}${sets:+_${sets//[=,]/_}}
    log "adaptation suite: targets $targets, controls $controls${sets:+, settings $sets}"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/adapt_suite.py --config-file "$START_CFG" --weights "$START_W" \
      --targets "$targets" --control "$controls" --minutes "${ADAPT_MINUTES:-1.0}" "${set_args[@]}" \
      --output "/tmp/adapt_out/$arm" ${ADAPT_OPTS:-} 2>&1 | grep -E '^\{|\[adapt\]|Error|error' | cut -c1-3000 | tee -a "$OUT/adapt.log"
  done
fi
log "done"
