#!/usr/bin/env bash
# DDP against FSDP (train.fsdp=true) on 2 CPU processes: the real pretraining loop, same model, data, batch
# and precision; per-process peak memory (rank 0's RSS high-water mark) and img/s after the first step.
#   bash benchmarks/fsdp.sh [OUT_DIR]          MODELS="mae_vit_base_patch16 mae_vit_large_patch16" STEPS=4
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-bench_fsdp}
STEPS=${STEPS:-4}
BATCH=${BATCH:-4}   # per process
MODELS=${MODELS:-"mae_vit_base_patch16 mae_vit_large_patch16"}
mkdir -p "$OUT_DIR"

summary() {  # peak GB and mean img/s over the steps after the first
    "$PY" -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rates = [r['img_per_s'] for r in rows[1:]] or [rows[-1]['img_per_s']]
print(f\"{max(r['peak_mem_gb'] for r in rows):.2f} GB peak, {sum(rates) / len(rates):.2f} img/s\")" "$1/metrics.jsonl"
}

for model in $MODELS; do
    for fsdp in false true; do
        run="$OUT_DIR/$model-fsdp-$fsdp"
        rm -rf "$run"
        ACCELERATE_USE_CPU=1 "$(dirname "$PY")/accelerate" launch --multi_gpu --num_processes 2 --num_machines 1 \
            --mixed_precision no --dynamo_backend no mae/pretrain.py recipe=vit_base model.name="$model" \
            data.train=synthetic data.synthetic_samples=256 data.num_workers=1 train.precision=bf16 \
            train.batch_size="$BATCH" train.max_steps="$STEPS" train.fsdp="$fsdp" log.every_steps=1 \
            log.viz_images=0 log.progress=false checkpoint.every_steps=100000 output_dir="$run" > "$run.log" 2>&1
        echo "$model, 2 processes x batch $BATCH, bf16, fsdp=$fsdp: $(summary "$run")"
    done
done
