#!/usr/bin/env bash
# Every CPU number of docs/performance.md in one sitting (about 15 minutes on 2 quiet cores):
#   1. MAE ViT-B/16, batch 16, 224 px: each switch, fp32 and bf16, before (explicit attention, for-loop
#      AdamW, eager) and after (SDPA, fused AdamW, torch.compile), in ONE mae-bench run;
#   2. the demo recipe at its batch size (256): eager vs compile, bf16 vs fp32; its input pipeline;
#   3. scaling: 1 vs 2 processes (benchmarks/scaling.sh), image size, mask ratio.
#   bash benchmarks/cpu_report.sh [OUT_DIR]          (QUICK=1: tiny model, 1 step: checks the script)
# Env: STEPS (timed steps per configuration, default 5), ROUNDS (round-robin repeats, best kept; default 1),
# THREADS (torch threads; default torch's), ONLY (run only part 1, 2 or 3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-runs/bench_cpu}
mkdir -p "$OUT_DIR"
if [ "${QUICK:-0}" = 1 ]; then
    B=(--model mae_vit_tiny_patch16 --img-size 64 --matmul-size 256) S=(--steps 1 --warmup 1) DEMO_B=16
else
    B=(--model mae_vit_base_patch16 --img-size 224) S=(--steps "${STEPS:-5}" --warmup 2) DEMO_B=256
fi
[ -n "${THREADS:-}" ] && S+=(--threads "$THREADS")
[ -n "${ROUNDS:-}" ] && S+=(--rounds "$ROUNDS")
uptime | tee -a "$OUT_DIR/uptime.txt"

part() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ]; }
if part 1; then
echo "== 1. ViT-B/16 switches"
CONFIGS=()
for d in fp32 bf16; do
    CONFIGS+=(--config "dtype=$d attn=math optimizer=forloop compile=off"   # before
              --config "dtype=$d attn=sdpa optimizer=forloop compile=off"
              --config "dtype=$d attn=math optimizer=foreach compile=off"
              --config "dtype=$d attn=math optimizer=fused compile=off"
              --config "dtype=$d attn=sdpa optimizer=fused compile=off"
              --config "dtype=$d attn=sdpa optimizer=fused compile=on")     # after
done
CONFIGS+=(--config "dtype=bf16 attn=sdpa optimizer=fused compile=off grad_ckpt=on")
"$PY" -m mae.bench "${B[@]}" --batch 16 "${S[@]}" "${CONFIGS[@]}" --json "$OUT_DIR/vit_base.json" \
    | tee "$OUT_DIR/vit_base.txt"

fi
if part 2; then
echo "== 2. demo recipe at its batch size"
"$PY" -m mae.bench --recipe demo --batch "$DEMO_B" "${S[@]}" --config "dtype=bf16" --config "dtype=bf16 compile=on" \
    --config "dtype=fp32" --json "$OUT_DIR/demo.json" | tee "$OUT_DIR/demo.txt"
"$PY" -m mae.bench --data fashion-mnist synthetic --img-size 28 --in-chans 1 --batch 256 --data-batches 10 \
    --json "$OUT_DIR/demo_data.json" | tee "$OUT_DIR/demo_data.txt"

"$PY" benchmarks/profile_step.py --recipe demo --batch "$DEMO_B" --dtype bf16 2>/dev/null | tee "$OUT_DIR/demo_profile.txt"
"$PY" benchmarks/profile_step.py "${B[@]:0:4}" --batch 16 --dtype bf16 2>/dev/null | tee "$OUT_DIR/vit_base_profile.txt"

fi
echo "== 3. scaling"
if [ "${QUICK:-0}" != 1 ] && part 3; then
    bash benchmarks/scaling.sh "$OUT_DIR/scaling" | tee "$OUT_DIR/scaling.txt"
    "$PY" -m data_tools.bench --images 256 --json "$OUT_DIR/data_tools_bench.json" | tee "$OUT_DIR/data_tools_bench.txt"
fi
uptime | tee -a "$OUT_DIR/uptime.txt"
