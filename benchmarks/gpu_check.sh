#!/usr/bin/env bash
# One short GPU check (about 5 minutes on an H100/H200): MAE ViT-L/16 training step in bf16 (autocast,
# fused AdamW), SDPA against xformers (when it imports), eager against torch.compile, MFU against the
# same-run GEMM peak and the nominal dense bf16 peak, and the largest batch that fits.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # JSON + tables in OUT_DIR (default: $OUT or bench_gpu)
#
# Env: PYTHON (default .venv/bin/python, else python3); PEAK_TFLOPS (nominal dense bf16 peak; default from
# the GPU name: H100/H200 989, A100 312); GPU_CHECK_DRY_RUN=1 runs the same commands with a tiny model on
# the CPU (checks the script itself, no GPU numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${1:-${OUT:-bench_gpu}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    MODEL=(--model mae_vit_tiny_patch16 --img-size 32 --device cpu --matmul-size 256)
    DTYPE=fp32 BATCH=4 BATCHES=8,16 STEPS=(--steps 1 --warmup 1) COMPILE=off PEAK=1
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
    MODEL=(--model mae_vit_large_patch16 --device cuda)
    DTYPE=bf16 BATCH=64 BATCHES=128,256,512,1024,2048 STEPS=(--steps 10 --warmup 3) COMPILE=off,on
    GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
    case "$GPU" in *H100* | *H200* | *GH200*) PEAK=989 ;; *A100*) PEAK=312 ;; *) PEAK=0 ;; esac
    PEAK=${PEAK_TFLOPS:-$PEAK}
    echo "device: $GPU; nominal bf16 peak ${PEAK} TFLOP/s"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
fi
ATTN=sdpa
if "$PY" -c "import xformers.ops" 2>/dev/null; then ATTN=sdpa,xformers; else echo "xformers does not import: SDPA only"; fi
NOMINAL=()
[ "$PEAK" != 0 ] && NOMINAL=(--peak-tflops "$PEAK")

echo "== 1. attention backend x compile, batch $BATCH"
"$PY" -m mae.bench "${MODEL[@]}" --batch "$BATCH" --dtype "$DTYPE" --attn "$ATTN" --compile "$COMPILE" \
    "${STEPS[@]}" "${NOMINAL[@]}" --json "$OUT_DIR/vit_large_switches.json" | tee "$OUT_DIR/vit_large_switches.txt"

echo "== 2. batch size (eager, fastest backend of 1), out-of-memory rows mark what does not fit"
BEST=$("$PY" -c "import json,sys; r=[x for x in json.load(open(sys.argv[1]))['results'] if not x['error'] and not x['config']['compile']]; print(max(r, key=lambda x: x['img_per_s'])['config']['attn'])" "$OUT_DIR/vit_large_switches.json")
"$PY" -m mae.bench "${MODEL[@]}" --batch "$BATCHES" --dtype "$DTYPE" --attn "$BEST" --steps 3 --warmup 1 \
    "${NOMINAL[@]}" --json "$OUT_DIR/vit_large_batch.json" | tee "$OUT_DIR/vit_large_batch.txt"
"$PY" - "$OUT_DIR/vit_large_batch.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
fits = [r["config"]["batch"] for r in rows if not r["error"]]
print(f"largest batch that fits: {max(fits) if fits else 'none of ' + str([r['config']['batch'] for r in rows])}")
PY
