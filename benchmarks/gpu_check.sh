#!/usr/bin/env bash
# The GPU check: every GPU number of docs/performance.md in one command, in at most BUDGET seconds of device
# time (default 540), each section under its own limit; the limits of all sections sum to 540 s.
#
#   bash scripts/gpu_wheels.sh                        # here, once: fills wheels/ (the GPU machine lacks them)
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # there: results in OUT_DIR (default $OUT, else bench_gpu)
#   SECTIONS=step,loop bash benchmarks/gpu_check.sh   # some sections only
#   LIMITS=loop=240,step:vit_l=200 bash benchmarks/gpu_check.sh   # other limits (s), e.g. for a rerun
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/dry   # the same script, tiny models, CPU, minutes
#                                                     # (GPU_CHECK_DRY_COMPILE=1: with torch.compile, longer)
#
# Sections (SECTIONS, comma list; default all but tune), in this order; label: limit in s on the GPU:
#   env       env: 15. Device, torch, driver (env.json); the wheels in wheels/ installed into a temporary folder
#   attn      attn: 10. auto / sdpa / math / xformers proven on the device in bf16, as every run does
#   step      step:vit_l: 135. mae-bench --recipe vit_large as a user runs it (batch 64, compiled, bf16):
#             vit_large_default and a torch.profiler summary of that step; then the levers, side by side: fused
#             AdamW with capturable state, the masking noise as the loop draws it, batch 128 per GPU.
#             step:vit_b: 75. --recipe vit_base as run (batch 128, compiled): vit_base_default, which is also
#             the loop's step; then the lever: the loss and norm_pix target outside the compiled graph
#   loop      loop: 135. benchmarks/gpu_loop.sh: mae/pretrain.py recipe=vit_base as run, on generated JPEGs decoded
#             on the device and by the workers, and on synthetic data; then synthetic with
#             train.compile=reduce-overhead (the CUDA-graphs lever)
#   batch     batch: 40. ViT-L/16 eager at batch 256-2048: img/s and peak GB up to the largest that fits
#   ref       ref:vit_b: 20, ref:vit_l: 25. The reference release's model next to ours, the defaults' batch,
#             one identical eager step (benchmarks/reference_step.py)
#   xformers  xformers:device: 15. benchmarks/xformers_check.py on the machine's torch (with wheels/xformers/
#             installed when carried). xformers:pair: 25. The same in a separate environment of the pinned pair
#             (pyproject's [xformers] extra: torch 2.10.0 + xformers 0.0.35) from wheels/xformers-pair/, when
#             carried; else null with the reason
#   segment   segment: 25. mae/segment.py recipe=segment_demo, when the checkout has it
#   detect    detect: 35. mae/detect.py recipe=detect_demo (training steps, no evaluation), then
#             benchmarks/detect_bench.py: ViT-B/16 Mask R-CNN at 1024 px, window against global attention, batch 1
#             and 2 (memory per image), when the checkout has them
#   embed     embed: 15. python -m mae.embed on the loop's ViT-B run and 4,096 of its JPEGs, when the checkout
#             has it
#   tune      not by default (minutes of autotuning): ViT-L/16 with max-autotune-no-cudagraphs and max-autotune
# OUT_DIR receives <device>-<date>.json (the results file; benchmarks/gpu_results.py), <device>-<date>-profile.txt,
# summary.md (its table, then every raw table), summary.json (every raw report) and gpu_check.log: 5 files.
# Commit the first two into benchmarks/results/ and regenerate the docs' table from them (docs/performance.md,
# "Running the GPU check").
#
# Env: PYTHON (default .venv/bin/python, else python3); BUDGET (s; the dry run's: GPU_CHECK_DRY_RUN_BUDGET);
# SECTIONS; LIMITS; WHEELS (default wheels/);
# PEAK_TFLOPS (nominal dense bf16 peak for a second MFU; default from the GPU name: H100/H200 989, A100 312).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${1:-${OUT:-bench_gpu}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d) # raw reports and runs; the results file, the summary and the log go to OUT_DIR
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
DATE=$(date -u +%F) STARTED=$(date -u +%FT%TZ)
BUDGET=${BUDGET:-540} SCALE=1
ALL_SECTIONS=env,attn,step,loop,batch,ref,xformers,segment,detect,embed
SECTIONS=${SECTIONS:-$ALL_SECTIONS}
DRY=${GPU_CHECK_DRY_RUN:-0}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
declare -A LIMIT=([env]=15 [attn]=10 [step:vit_l]=135 [step:vit_b]=70 [loop]=120 [batch]=30 [ref:vit_b]=20
    [ref:vit_l]=25 [xformers:device]=15 [xformers:pair]=25 [segment]=25 [detect]=35 [embed]=15 [tune]=300)
IFS=, read -ra overrides <<< "${LIMITS:-}"
for kv in "${overrides[@]}"; do LIMIT[${kv%%=*}]=${kv#*=}; done

# ---- what the machine lacks, from wheels/ (no registry is reachable there)
WHEELS=${WHEELS:-wheels}
DEPS=""
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
FMNIST=""
[ -d "$WHEELS/fashion-mnist" ] && FMNIST=$(cd "$WHEELS/fashion-mnist" && pwd)

if [ "$DRY" = 1 ]; then
    BUDGET=${GPU_CHECK_DRY_RUN_BUDGET:-1800} SCALE=6 # a shared CPU: section limits x6 (the logic is the same)
    DEV=(--device cpu --matmul-size 256) DTYPE=fp32 PEAK=0
    TINY=(model.name=mae_vit_tiny_patch16 model.img_size=32 model.patch_size=8 model.depth=1 model.embed_dim=32
        model.num_heads=2 model.decoder_embed_dim=32 model.decoder_depth=1 model.decoder_num_heads=2)
    STEPS=(--steps 1 --warmup 1)
    # torch.compile on a shared 2-core CPU takes minutes even for these: GPU_CHECK_DRY_COMPILE=1 includes it
    COMPILE=off
    [ "${GPU_CHECK_DRY_COMPILE:-0}" = 1 ] && COMPILE=on
    L_RECIPE=(--recipe vit_large "${TINY[@]}" --batch 2) L_BATCH2=4
    B_RECIPE=(--recipe vit_base "${TINY[@]}" --batch 8) # the loop's dry-run batch
    SWEEP=(--model mae_vit_small_patch16 --img-size 32 --batch 2,4 --steps 1 --warmup 1)
    REF_B=(--size tiny --img-size 32 --batch 2) REF_L=(--size tiny --img-size 32 --batch 2)
    REF=(--steps 1 --warmup 1 --rounds 1 --dtype fp32)
    XF=(--size tiny --img-size 32 --batch 2 --dtype fp32 --steps 1 --warmup 1 --device cpu)
    TUNE_COMPILE=off SEG=(train.max_steps=4 log.every_steps=2) EMBED_IMAGES=16
    DET=(train.max_steps=4 log.every_steps=2 train.batch_size=4 data.num_workers=0)
    DET_BENCH=(--device cpu --vit-size 64 --vit-overrides model.embed_dim=64 model.num_heads=2 model.depth=4
        model.fpn_channels=16)
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1
    DEV=(--device cuda) DTYPE=bf16
    GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
    case "$GPU" in *H100* | *H200* | *GH200*) PEAK=989 ;; *A100*) PEAK=312 ;; *) PEAK=0 ;; esac
    PEAK=${PEAK_TFLOPS:-$PEAK}
    TINY=() STEPS=(--steps 10 --warmup 3) COMPILE=on
    L_RECIPE=(--recipe vit_large) L_BATCH2=128 # the recipes' per-GPU batch (64, 128), as a user runs them
    B_RECIPE=(--recipe vit_base)
    SWEEP=(--model mae_vit_large_patch16 --batch 256,512,1024,1536,2048 --steps 2 --warmup 1)
    REF_B=(--size base --batch 128) REF_L=(--size large --batch 64)
    REF=(--steps 10 --warmup 3 --rounds 1 --dtype bf16)
    XF=(--size base --batch 64 --dtype bf16 --steps 10 --warmup 3 --device cuda)
    TUNE_COMPILE=max-autotune-no-cudagraphs,max-autotune SEG=(train.max_steps=200 log.every_steps=40)
    DET=(train.max_steps=200 log.every_steps=40) DET_BENCH=(--device cuda)
    EMBED_IMAGES=4096
fi
NOMINAL=()
[ "$PEAK" != 0 ] && NOMINAL=(--peak-tflops "$PEAK")
BENCH=("$PY" -m mae.bench "${DEV[@]}" --dtype "$DTYPE" --attn sdpa "${NOMINAL[@]}")
export PY WORK ROOT DRY FMNIST EMBED_IMAGES

section() { # LABEL COMMAND...: run COMMAND if LABEL's section (before ':') is in SECTIONS, within
    # min(its limit, the budget left); record 'label exit seconds limit'
    local label=$1 name=${1%%:*} t0=$SECONDS rc limit left
    shift
    case ",$SECTIONS," in *",$name,"*) ;; *) return 0 ;; esac
    limit=$((${LIMIT[$label]} * SCALE)) left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $label: skipped (${SECONDS} s of the ${BUDGET} s budget spent)"
        echo "$label skipped 0 $limit" >> "$WORK/sections.txt"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $label (limit ${limit} s; ${SECONDS} s spent)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    [ "$rc" = 124 ] && echo "== $label: stopped at its ${limit} s limit"
    echo "$label $rc $((SECONDS - t0)) $limit" >> "$WORK/sections.txt"
}
note() { # LABEL WHY: LABEL's section is requested but cannot run here; its results are null for this reason
    case ",$SECTIONS," in *",${1%%:*},"*) ;; *) return 0 ;; esac
    printf '%s\t%s\n' "$1" "$2" >> "$WORK/notes.txt"
    echo "== $1: not run: $2"
}

section env "$PY" - "$WORK/env.json" <<'PY'
import json, platform, subprocess, sys, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
       "device": "cpu (dry run)", "driver": None}
if torch.cuda.is_available():
    env["device"] = torch.cuda.get_device_name()
    print(env["device"], f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True, check=False)
    print(smi.stdout.strip())
    env["driver"] = smi.stdout.split(",")[1].strip() if smi.stdout.count(",") >= 1 else None
print(f"torch {env['torch']} (CUDA {env['cuda']}), python {env['python']}")
json.dump(env, open(sys.argv[1], "w"), indent=1)
PY
section attn "$PY" -c "
import torch
from mae.perf.grid import resolve_device
from mae.perf.step import DTYPES
from mae.models import create_mae, ensure_attn_backends
device = resolve_device('${DEV[1]}')
for backend in ('auto', 'sdpa', 'math', 'xformers'):
    model = create_mae('mae_vit_tiny_patch16', img_size=32, attn_backend=backend).to(device)
    notes = ensure_attn_backends(model, device, DTYPES['$DTYPE'])
    used = sorted({m.backend for m in model.modules() if hasattr(m, 'backend')})
    print(f'attn {backend}: runs as {\",\".join(used)}' + ''.join(f'\n  {n}' for n in notes))
"
# the first --config is the recipe as a user runs it; the others each change one thing of it (the levers)
section step:vit_l "${BENCH[@]}" "${L_RECIPE[@]}" "${STEPS[@]}" --compile "$COMPILE" \
    --config optimizer=fused --config optimizer=fused-capturable --config noise=host --config "batch=$L_BATCH2" \
    --profile "$WORK/profile_vit_large.txt" --json "$WORK/step_vit_l.json"
section step:vit_b "${BENCH[@]}" "${B_RECIPE[@]}" "${STEPS[@]}" --compile "$COMPILE" \
    --config loss=graph --config loss=eager --json "$WORK/step_vit_b.json"
if [ -f benchmarks/gpu_loop.sh ]; then
    LOOP_WORK="$WORK/loop_work" LOOP_STEP_JSON="$WORK/step_vit_b.json" LOOP_EXTRAS=0 \
        LOOP_MODES=device,cpu,synthetic,synthetic:reduce-overhead section loop bash benchmarks/gpu_loop.sh "$WORK/loop"
else
    note loop "benchmarks/gpu_loop.sh is not in this checkout"
fi
section batch "${BENCH[@]}" "${SWEEP[@]}" --json "$WORK/batch_vit_l.json"
section ref:vit_b "$PY" benchmarks/reference_step.py "${REF_B[@]}" "${REF[@]}" "${DEV[@]}" --json "$WORK/reference_vit_b.json"
section ref:vit_l "$PY" benchmarks/reference_step.py "${REF_L[@]}" "${REF[@]}" "${DEV[@]}" --json "$WORK/reference_vit_l.json"

# xformers: on the machine's torch (with the carried xformers wheel, if any), then the pinned pair on its own
XF_DEVICE=(env)
if compgen -G "$WHEELS/xformers/xformers-*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --target "$WORK/xf_device" "$WHEELS"/xformers/*.whl \
        && XF_DEVICE=(env "PYTHONPATH=$WORK/xf_device:$PYTHONPATH")
fi
section xformers:device "${XF_DEVICE[@]}" "$PY" benchmarks/xformers_check.py "${XF[@]}" \
    --label "the machine's torch" --json "$WORK/xformers_device.json"
PAIR="$WHEELS/xformers-pair"
if compgen -G "$PAIR/torch-2.10.0*.whl" > /dev/null && compgen -G "$PAIR/xformers-0.0.35*.whl" > /dev/null; then
    # its own folder first on the path: torch 2.10.0, its CUDA 12 libraries and xformers shadow the machine's
    section xformers:pair bash -c '"$PY" -m pip install --quiet --no-index --no-deps --target "$WORK/xf_pair" "$1"/*.whl \
        && PYTHONPATH="$WORK/xf_pair:$PYTHONPATH" "$PY" benchmarks/xformers_check.py "${@:2}"' _ "$PAIR" "${XF[@]}" \
        --label "pinned pair" --json "$WORK/xformers_pair.json"
else
    note xformers:pair "the pinned pair (pyproject's [xformers] extra: torch 2.10.0 + xformers 0.0.35) is not in \
$PAIR/; 'bash scripts/gpu_wheels.sh --xformers-pair' downloads it (torch's wheel alone is 873 MB; gigabytes with its CUDA 12 libraries)"
fi

# the tasks colleagues add: run when the checkout has them, as a user runs them (keys they do not read dropped)
read_keys() { # ENTRY KEY=VALUE...: the overrides whose key ENTRY's --help lists
    local help
    help=$("$PY" "$1" --help 2> /dev/null) || return 0
    shift
    for kv in "$@"; do grep -qw -- "${kv%%=*}" <<< "$help" && echo "$kv"; done
}
if [ -f mae/segment.py ]; then
    mapfile -t SEG_ARGS < <(read_keys mae/segment.py "output_dir=$WORK/segment_demo" "${SEG[@]}" log.wandb=disabled \
        log.progress=false checkpoint.every_steps=1000000 ${FMNIST:+"data.fmnist_dir=$FMNIST"})
    section segment "$PY" mae/segment.py recipe=segment_demo "${SEG_ARGS[@]}"
else
    note segment "mae/segment.py is not in this checkout"
fi
if [ -f mae/detect.py ] && [ -f benchmarks/detect_bench.py ]; then
    mapfile -t DET_ARGS < <(read_keys mae/detect.py "output_dir=$WORK/detect_demo" "${DET[@]}" data.val= log.wandb=disabled \
        log.progress=false checkpoint.every_steps=1000000 ${FMNIST:+"data.fmnist_dir=$FMNIST"})
    section detect bash -c '"$PY" mae/detect.py recipe=detect_demo "${@:3:$2}" && "$PY" benchmarks/detect_bench.py \
        --only vit_b --json "$1"/detect_vit_b.json "${@:$((3 + $2))}"' _ "$WORK" "${#DET_ARGS[@]}" "${DET_ARGS[@]}" \
        "${DET_BENCH[@]}"
else
    note detect "mae/detect.py is not in this checkout"
fi
if [ -f mae/embed.py ]; then
    section embed "$PY" - <<'PY'
import json, os, subprocess, sys, time
from pathlib import Path

work = Path(os.environ["WORK"])  # the loop's ViT-B run and EMBED_IMAGES of its JPEGs, as a user would pass them
run = next((work / "loop_work" / f"run_{m}" for m in ("synthetic", "device", "cpu")
            if (work / "loop_work" / f"run_{m}").is_dir()), None)
if run is None:
    sys.exit("no ViT-B run to embed with (the loop section left none)")
data = work / "embed_data" / "images"
data.mkdir(parents=True)
for f in sorted((work / "loop_work" / "jpegs_500x375").rglob("*.jpg"))[: int(os.environ["EMBED_IMAGES"])]:
    (data / f"{f.parent.name}_{f.name}").symlink_to(f)
t0 = time.perf_counter()
rc = subprocess.run([os.environ["PY"], "-m", "mae.embed", str(run), str(data.parent), str(work / "embed_out")]).returncode
row = {"images": len(list(data.iterdir())), "seconds": time.perf_counter() - t0, "exit": rc, "source": str(run),
       "timed": "the whole command: process start-up and model load included"}
(work / "embed.json").write_text(json.dumps(row))
sys.exit(rc)
PY
else
    note embed "mae/embed.py is not in this checkout"
fi
section tune "${BENCH[@]}" "${L_RECIPE[@]}" "${STEPS[@]}" --compile "$TUNE_COMPILE" --json "$WORK/tune_vit_l.json"

FLAGS=()
[ "$DRY" = 1 ] && FLAGS=(--dry-run)
[ "$SECTIONS" != "$ALL_SECTIONS" ] && FLAGS+=(--suffix "${SECTIONS//,/_}") # a partial run's file: its own name
"$PY" benchmarks/gpu_summary.py "$WORK" "$OUT_DIR" --date "$DATE" --started "$STARTED" --budget "$BUDGET" \
    --sections "$SECTIONS" "${FLAGS[@]}" && cat "$OUT_DIR/summary.md"
echo "total ${SECONDS} s; results in $OUT_DIR"
echo "to keep them: cp $OUT_DIR/*-$DATE*.json $OUT_DIR/*-$DATE*-profile.txt benchmarks/results/ (where present), then"
echo "python benchmarks/gpu_results.py benchmarks/results/<device>-*.json (rewrites the table in docs/performance.md)"
rm -rf "$WORK"
