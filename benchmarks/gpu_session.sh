#!/usr/bin/env bash
# Runs the GPU-side checks on the lent GPU machine (see /work/.library/device/README.md), from the
# repo root, with .whl/ (../shared/gpu/wheels.sh) and .bccd/ (a copy of ../shared/datasets/BCCD) carried:
#   bash benchmarks/gpu_session.sh bench     # training step (plain, compiled, plain VGG16), trainer.fit vs the step, inference, NMS strategies and every backbone vs torchvision
#   bash benchmarks/gpu_session.sh evalbench # COCO eval (GPU, CPU, pycocotools, faster-coco-eval), data loader (16 cores)
#   bash benchmarks/gpu_session.sh shapes    # default shapes run, in the background (setsid): poll logs/
#   bash benchmarks/gpu_session.sh bccd      # experiment=ssd300_bccd, in the background
#   bash benchmarks/gpu_session.sh status    # tail of the background runs, metrics to $OUT
# A device command may run 10 minutes; the training runs outlive it with setsid while the machine is held.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" logs
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
case "${1:-bench}" in
  bench)
    # the figures also stay in logs/ while the machine is held: evalbench reads the training rate
    python benchmarks/train_throughput.py --compile --json logs/throughput.json 2>&1 | tee "$OUT/throughput.log"
    python benchmarks/train_throughput.py --json logs/throughput_vgg16.json backbone=vgg16 2>&1 | tail -8 | tee -a "$OUT/throughput.log"
    # the real loop (trainer.fit, default callbacks) against the same isolated step: target >= 0.90 of its img/s
    python benchmarks/loop_throughput.py --json logs/loop.json 2>&1 | tail -7 | tee "$OUT/loop.log"
    python benchmarks/loop_throughput.py --size 320 --json logs/loop_ssdlite.json model=ssdlite 2>&1 | tail -7 | tee -a "$OUT/loop.log"
    python benchmarks/inference.py --compile --json logs/inference.json 2>&1 | tee "$OUT/inference.log"
    # decode + NMS strategies at batch 32, 3/20/80 classes (postprocess.py's GPU rule is unmeasured until this runs)
    python benchmarks/nms.py --json logs/nms.json 2>&1 | tee "$OUT/nms.log"
    python benchmarks/backbones.py --json logs/backbones.json 2>&1 | tee "$OUT/backbones.log"
    cp logs/*.json "$OUT/" ;;
  evalbench)
    python benchmarks/coco_eval.py --json logs/coco_eval.json 2>&1 | tee "$OUT/coco_eval.log"
    train_json=(); [ -f logs/throughput.json ] && train_json=(--train-json logs/throughput.json)
    python benchmarks/data_throughput.py --root .bccd --workers 0 8 12 16 --cache none ram "${train_json[@]}" \
      --json logs/data.json 2>&1 | tee "$OUT/data.log"
    cp logs/*.json "$OUT/" ;;
  shapes)
    setsid nohup python train.py model=ssd300 hydra.run.dir=logs/gpu_shapes > logs/gpu_shapes.log 2>&1 < /dev/null &
    sleep 60; tail -c 3000 logs/gpu_shapes.log ;;
  bccd)
    setsid nohup python train.py experiment=ssd300_bccd data.root=.bccd hydra.run.dir=logs/gpu_bccd > logs/gpu_bccd.log 2>&1 < /dev/null &
    sleep 60; tail -c 3000 logs/gpu_bccd.log ;;
  status)
    for r in gpu_shapes gpu_bccd; do
      [ -f "logs/$r.log" ] || continue
      echo "== $r"; tail -c 2500 "logs/$r.log"; cp "logs/$r.log" "$OUT/" 2>/dev/null
      cp "logs/$r/csv/metrics.csv" "$OUT/$r.metrics.csv" 2>/dev/null
    done ;;
esac
