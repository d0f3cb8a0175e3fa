#!/usr/bin/env bash
# Scaling on this machine, all in one sitting (run it on a quiet machine):
#   1. the demo recipe's real training loop with 1 and with 2 processes (same global batch 256),
#   2. mae-bench: step cost against image size and mask ratio (ViT-B/16, batch 16, bf16).
#   bash benchmarks/scaling.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-bench_scaling}
STEPS=${STEPS:-60}   # optimizer steps per run; the first logged window (warm-up) is left out
EVERY=${EVERY:-20}
mkdir -p "$OUT_DIR"
COMMON=(recipe=demo data.val= log.knn_every_steps=0 log.viz_images=0 log.every_steps="$EVERY" log.progress=false
        train.max_steps="$STEPS" checkpoint.every_steps=100000 checkpoint.resume=false)

rate() {  # mean img/s over the logged windows after the first (warm-up) one
    "$PY" -c "import json,sys; r=[json.loads(l)['img_per_s'] for l in open(sys.argv[1])][1:]; print(f'{sum(r)/len(r):.1f}')" "$1/metrics.jsonl"
}

rm -rf "$OUT_DIR/p1" "$OUT_DIR/p2"
"$PY" mae/pretrain.py "${COMMON[@]}" train.batch_size=256 output_dir="$OUT_DIR/p1" > "$OUT_DIR/p1.log" 2>&1
ACCELERATE_USE_CPU=1 "$(dirname "$PY")/accelerate" launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision no --dynamo_backend no mae/pretrain.py "${COMMON[@]}" train.batch_size=128 \
    output_dir="$OUT_DIR/p2" > "$OUT_DIR/p2.log" 2>&1
echo "demo recipe, global batch 256, steps $((EVERY + 1))-$STEPS: 1 process $(rate "$OUT_DIR/p1") img/s, 2 processes $(rate "$OUT_DIR/p2") img/s"

[ "${BENCH:-1}" = 1 ] || exit 0
"$PY" -m mae.bench --batch 16 --dtype bf16 --img-size 112,224,320 --steps 5 --warmup 2 \
    --json "$OUT_DIR/img_size.json" | tee "$OUT_DIR/img_size.txt"
"$PY" -m mae.bench --batch 16 --dtype bf16 --mask-ratio 0.5,0.75,0.9 --steps 5 --warmup 2 \
    --json "$OUT_DIR/mask_ratio.json" | tee "$OUT_DIR/mask_ratio.txt"
