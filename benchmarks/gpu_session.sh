#!/usr/bin/env bash
# Every GPU row of BENCHMARKS.md and the GPU training recipes in ONE call on the lent GPU machine
# (/work/.library/device/README.md: 15 device minutes a session, start-up included, so one call of at most
# 9 minutes). From the repo root, with .whl/ (../shared/gpu/wheels.sh) and .bccd/ (a copy of
# ../shared/datasets/BCCD) carried:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".bccd"], timeout_s=560)
# Phase 1 times the GPU benchmarks one after another on the idle GPU (each under its own time limit);
# phase 2 trains the GPU recipes side by side (shapes SSD300, BCCD SSD300), bounded by trainer.max_time
# so both end, validate and test before the call's limit; phase 3 runs the CPU-heavy benchmarks (COCO
# evaluation against pycocotools, the 16-worker loader) with what is left. Every log goes into $OUT/logs.tar.gz (the
# device returns at most 8 files); the last lines printed are the summary table.
# BUDGET (seconds, default 530) is the whole script's; a step that would not fit is skipped and says so.
set -uo pipefail
START=$(date +%s)
BUDGET=${BUDGET:-530}
OUT=${OUT:-/tmp/out}
LOGS=logs/gpu
mkdir -p "$OUT" "$LOGS"
SUMMARY="$LOGS/summary.txt"
: > "$SUMMARY"

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT_S CMD...: run CMD under a time limit (cut to what is left), log to $LOGS/NAME.log
step() {
  local name=$1 limit=$2 t0 rc l
  shift 2
  if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then return; fi
  l=$(left)
  if ((l < 25)); then echo "$name: skipped, ${l}s left" | tee -a "$SUMMARY"; return; fi
  ((limit > l - 5)) && limit=$((l - 5))
  t0=$(date +%s)
  echo "== $name (limit ${limit}s, ${l}s left)"
  timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name: rc $rc, $(($(date +%s) - t0)) s" | tee -a "$SUMMARY"
  tail -n 12 "$LOGS/$name.log"
}

# (SKIP_WHEELS=1: a dry run of the script's flow here, in the project's venv)
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
python -c "import torch, torchvision, lightning; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__)" | tee -a "$LOGS/gpu.txt"

PHASES=${PHASES:-1 2 3}  # a dry run (or a second call) may take some: PHASES=2; STEPS="nms inference" runs only those steps
phase() { [[ " $PHASES " == *" $1 "* ]]; }

# ---- phase 1: GPU benchmarks, one at a time on the idle GPU (about 4 minutes) ----
if phase 1; then
step train_ssd300 45 python benchmarks/train_throughput.py --warmup 3 --iters 10 --json "$LOGS/throughput.json"
step train_ssd300_vgg16 30 python benchmarks/train_throughput.py --warmup 3 --iters 8 --json "$LOGS/throughput_vgg16.json" backbone=vgg16
step step_yolov2 30 python benchmarks/step_breakdown.py --model yolov2 --warmup 3 --iters 10 --json "$LOGS/step_yolov2.json"
step step_yolov3 30 python benchmarks/step_breakdown.py --model yolov3 --warmup 3 --iters 10 --json "$LOGS/step_yolov3.json"
step rcnn 60 python benchmarks/rcnn_throughput.py --warmup 3 --iters 8 --json "$LOGS/rcnn.json"
step backbones 45 python benchmarks/backbones.py --warmup 2 --iters 8 --json "$LOGS/backbones.json"
step loop_ssd300 35 python benchmarks/loop_throughput.py --warmup 5 --iters 20 --json "$LOGS/loop.json"
step loop_ssdlite 35 python benchmarks/loop_throughput.py --size 320 --warmup 5 --iters 20 --json "$LOGS/loop_ssdlite.json" model=ssdlite
step inference 30 python benchmarks/inference.py --warmup 3 --iters 8 --json "$LOGS/inference.json"
step loop_ssdlite_nocallbacks 35 python benchmarks/loop_throughput.py --size 320 --warmup 5 --iters 20 \
  --json "$LOGS/loop_ssdlite_nocallbacks.json" model=ssdlite callbacks=none
step backbones_mobilenet_v2 30 python benchmarks/backbones.py --warmup 2 --iters 8 --backbones mobilenet_v2 \
  --json "$LOGS/backbones_mobilenet_v2.json"
step nms 40 python benchmarks/nms.py --warmup 1 --iters 3 --slow-s 3 --json "$LOGS/nms.json"
fi

# ---- phase 2: the GPU training recipes side by side, ending about 90 s before BUDGET (validation, test, exit) ----
remaining=$(left)
if phase 2 && ((remaining > 190)); then
  train_s=$((remaining - 120))
  max_time=$(printf "00:00:%02d:%02d" $((train_s / 60)) $((train_s % 60)))
  echo "== training recipes, trainer.max_time=$max_time"
  t0=$(date +%s)
  python train.py model=ssd300 ++trainer.max_time="$max_time" test=true hydra.run.dir=$LOGS/shapes \
    > "$LOGS/train_shapes.log" 2>&1 &
  shapes=$!
  python train.py experiment=ssd300_bccd data.root=.bccd ++trainer.max_time="$max_time" test=true \
    hydra.run.dir=$LOGS/bccd > "$LOGS/train_bccd.log" 2>&1 &
  bccd=$!
  # both must end (test included) before the call's limit, whatever max_time leaves undone
  (sleep $((remaining - 30)); kill $shapes $bccd 2>/dev/null) &
  guard=$!
  wait $shapes; echo "train_shapes: rc $?, $(($(date +%s) - t0)) s" | tee -a "$SUMMARY"
  wait $bccd; echo "train_bccd: rc $?, $(($(date +%s) - t0)) s" | tee -a "$SUMMARY"
  kill $guard 2>/dev/null
else
  echo "training recipes: skipped, ${remaining}s left" | tee -a "$SUMMARY"
fi

# ---- phase 3: CPU-heavy benchmarks with what is left ----
if phase 3; then
step coco_eval 70 python benchmarks/coco_eval.py --repeats 2 --json "$LOGS/coco_eval.json"
step data 40 python benchmarks/data_throughput.py --root .bccd --workers 0 16 --cache none ram --images 512 \
  --repeats 2 --train-json "$LOGS/throughput.json" --json "$LOGS/data.json"
fi

# ---- what comes back ----
tar -czf "$OUT/logs.tar.gz" --exclude='*.ckpt' -C logs gpu
cp "$SUMMARY" "$OUT/"
echo
echo "==== summary (full logs in logs.tar.gz) ===="
cat "$SUMMARY"
for f in train_ssd300 train_ssd300_vgg16 step_yolov2 step_yolov3 rcnn; do grep -E "img/s|ms/step|^ours|^torchvision|^full|^network|^backbone|share|^VGG16|overhead|/ torch" "$LOGS/$f.log" 2>/dev/null | tail -n 8; done
grep -E "^\| " "$LOGS/backbones.log" 2>/dev/null | tail -n 14
for f in loop_ssd300 loop_ssdlite inference; do tail -n 4 "$LOGS/$f.log" 2>/dev/null; done
for r in shapes bccd; do
  grep -E "epoch [0-9]+/[0-9]+ step" "$LOGS/train_$r.log" 2>/dev/null | tail -n 2 | cut -c 60-
  grep -E "test/map_50|map_50 " "$LOGS/train_$r.log" 2>/dev/null | tail -n 2
done
echo "elapsed $(($(date +%s) - START)) s"
