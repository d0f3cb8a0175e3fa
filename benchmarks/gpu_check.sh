#!/usr/bin/env bash
# The GPU check, in at most BUDGET seconds of device time (default 480) with a time limit per section:
# the MAE training step of ViT-B/16 (batch 256) and ViT-L/16 (batch 128) in bf16, eager / compiled /
# compiled with CUDA graphs, MFU against the same-run GEMM peak, the reference release side by side, the
# largest batch that fits, and whether each attention backend runs.
#
#   bash scripts/gpu_wheels.sh                        # here, once: fills wheels/ (the GPU machine lacks them)
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # there: results in OUT_DIR (default $OUT, else bench_gpu)
#   SECTIONS=step,batch bash benchmarks/gpu_check.sh  # some sections only
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/dry   # the same script, tiny models, CPU, seconds
#                                                     # (GPU_CHECK_DRY_COMPILE=1: with torch.compile, minutes)
#
# Sections (SECTIONS, comma list; default env,attn,step,batch,ref,loop), each under `timeout`:
#   env    device, torch, driver; the wheels in wheels/ installed into a temporary --target folder
#   attn   auto / sdpa / math / xformers proven on the device in bf16, as every run does before training
#   step   ViT-L/16 b128 (mae-bench): eager, torch.compile default, reduce-overhead (CUDA graphs); ViT-B/16
#          b256: eager, compiled. Each configuration's numbers are on disk as soon as it is measured
#   batch  ViT-L/16 eager at growing batches: the largest that fits
#   ref    the reference release's model next to ours, one identical step (benchmarks/reference_step.py)
#   tune   not by default (minutes of autotuning): ViT-L/16 with max-autotune-no-cudagraphs and max-autotune
#   loop   benchmarks/gpu_loop.sh (the training loop and its input pipeline), with what is left of the budget
# OUT_DIR receives summary.md (the tables), summary.json (every raw report), gpu_check.log, and loop.md /
# loop.json from the loop section: at most 8 files.
#
# Env: PYTHON (default .venv/bin/python, else python3); BUDGET (s; the dry run's: GPU_CHECK_DRY_RUN_BUDGET);
# SECTIONS; WHEELS (default wheels/);
# PEAK_TFLOPS (nominal dense bf16 peak for a second MFU; default from the GPU name: H100/H200 989, A100 312).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${1:-${OUT:-bench_gpu}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)  # raw reports; only the summary, the log and the loop's two files go to OUT_DIR
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
BUDGET=${BUDGET:-480} SCALE=1
SECTIONS=${SECTIONS:-env,attn,step,batch,ref,loop}
DRY=${GPU_CHECK_DRY_RUN:-0}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---- what the machine lacks, from wheels/ (no registry is reachable there)
WHEELS=${WHEELS:-wheels}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    DEPS="$WORK/deps"
    "$PY" -m pip install --quiet --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$DEPS" && echo "installed into $DEPS: $(cd "$WHEELS" && echo *.whl)"
fi
if ! "$PY" -c "import omegaconf, webdataset, braceexpand, timm, accelerate, einops" 2> /dev/null; then
    echo "missing python packages: $("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('omegaconf', 'webdataset', 'braceexpand', 'timm', 'accelerate', 'einops') if not u.find_spec(m)))")"
    echo "fill $WHEELS/ with 'bash scripts/gpu_wheels.sh' on a machine with a registry, and carry it along"
    exit 2
fi

if [ "$DRY" = 1 ]; then
    BUDGET=${GPU_CHECK_DRY_RUN_BUDGET:-1800} SCALE=6  # a shared CPU: section limits x6 (the logic is the same)
    DEV=(--device cpu --matmul-size 256) DTYPE=fp32 PEAK=0
    TINY=(--img-size 32 --steps 1 --warmup 1)
    # torch.compile on a shared 2-core CPU takes minutes even for these: GPU_CHECK_DRY_COMPILE=1 includes it
    B_COMPILE=off
    [ "${GPU_CHECK_DRY_COMPILE:-0}" = 1 ] && B_COMPILE=off,on
    B_MODEL=(--model mae_vit_tiny_patch16 "${TINY[@]}") B_BATCH=4
    L_MODEL=(--model mae_vit_small_patch16 "${TINY[@]}") L_BATCH=2 L_COMPILE=off
    BATCHES=2,4 TUNE_COMPILE=off
    REF=(--size tiny --img-size 32 --batch 2 --steps 1 --warmup 1 --rounds 1 --dtype fp32)
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1
    DEV=(--device cuda) DTYPE=bf16
    GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
    case "$GPU" in *H100* | *H200* | *GH200*) PEAK=989 ;; *A100*) PEAK=312 ;; *) PEAK=0 ;; esac
    PEAK=${PEAK_TFLOPS:-$PEAK}
    STEPS=(--steps 10 --warmup 3)
    B_MODEL=(--model mae_vit_base_patch16 "${STEPS[@]}") B_BATCH=256 B_COMPILE=off,on
    L_MODEL=(--model mae_vit_large_patch16 "${STEPS[@]}") L_BATCH=128 L_COMPILE=off,on,reduce-overhead
    BATCHES=256,384,512,768,1024 TUNE_COMPILE=max-autotune-no-cudagraphs,max-autotune
    REF=(--size large --batch 128 --steps 10 --warmup 3 --rounds 2 --dtype bf16)
fi
NOMINAL=()
[ "$PEAK" != 0 ] && NOMINAL=(--peak-tflops "$PEAK")
BENCH=("$PY" -m mae.bench "${DEV[@]}" --dtype "$DTYPE" --attn sdpa "${NOMINAL[@]}")

section() { # NAME LIMIT_S COMMAND...: run COMMAND if NAME is in SECTIONS, within min(LIMIT_S, budget left)
    local name=$1 limit=$2 label=${LABEL:-$1}
    shift 2
    case ",$SECTIONS," in *",$name,"*) ;; *) return 0 ;; esac
    local left=$((BUDGET - SECONDS)) t0=$SECONDS rc
    limit=$((limit * SCALE))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (${SECONDS} s of the ${BUDGET} s budget spent)"
        echo "$label skipped 0" >> "$WORK/sections.txt"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s; ${SECONDS} s spent)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    [ "$rc" = 124 ] && echo "== $name: stopped at its ${limit} s limit"
    echo "$label $rc $((SECONDS - t0))" >> "$WORK/sections.txt"
}

section env 30 "$PY" -c "
import platform, subprocess, torch
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), python {platform.python_version()}')
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')
    subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit',
                    '--format=csv'], check=False)
"
section attn 60 "$PY" -c "
import torch
from mae.bench import DTYPES, resolve_device
from mae.models import create_mae, ensure_attn_backends
device = resolve_device('${DEV[1]}')
for backend in ('auto', 'sdpa', 'math', 'xformers'):
    model = create_mae('mae_vit_tiny_patch16', img_size=32, attn_backend=backend).to(device)
    notes = ensure_attn_backends(model, device, DTYPES['$DTYPE'])
    used = sorted({m.backend for m in model.modules() if hasattr(m, 'backend')})
    print(f'attn {backend}: runs as {\",\".join(used)}' + ''.join(f'\n  {n}' for n in notes))
"
LABEL=step:vit_l section step 210 "${BENCH[@]}" "${L_MODEL[@]}" --batch "$L_BATCH" --compile "$L_COMPILE" \
    --json "$WORK/step_vit_l.json"
LABEL=step:vit_b section step 120 "${BENCH[@]}" "${B_MODEL[@]}" --batch "$B_BATCH" --compile "$B_COMPILE" \
    --json "$WORK/step_vit_b.json"
section batch 60 "${BENCH[@]}" "${L_MODEL[@]}" --batch "$BATCHES" --steps 3 --warmup 1 --json "$WORK/batch_vit_l.json"
section ref 60 "$PY" benchmarks/reference_step.py "${REF[@]}" "${DEV[@]}" --json "$WORK/reference.json"
section tune 300 "${BENCH[@]}" "${L_MODEL[@]}" --batch "$L_BATCH" --compile "$TUNE_COMPILE" --json "$WORK/tune_vit_l.json"
if [ -f benchmarks/gpu_loop.sh ]; then
    section loop 300 bash benchmarks/gpu_loop.sh "$WORK/loop"
    for f in loop.md loop.json; do [ -f "$WORK/loop/$f" ] && cp "$WORK/loop/$f" "$OUT_DIR/"; done
else
    case ",$SECTIONS," in *",loop,"*) echo "== loop: skipped (benchmarks/gpu_loop.sh is not in this checkout)" ;; esac
fi

"$PY" benchmarks/gpu_summary.py "$WORK" "$OUT_DIR" && cat "$OUT_DIR/summary.md"
echo "total ${SECONDS} s; results in $OUT_DIR"
rm -rf "$WORK"
