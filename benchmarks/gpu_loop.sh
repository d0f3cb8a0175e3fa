#!/usr/bin/env bash
# The training loop against the training step on one GPU (about 5 minutes on an H100/H200): recipe vit_base as a
# user runs it (batch 128 per GPU, the recipe's 10 loader workers, train.compile auto: compiled), on 24,000
# generated 500x375 JPEGs with data.decode=cpu and data.decode=device, and on data.train=synthetic; next to the
# compiled step alone (mae-bench, same batch). Also the mean absolute pixel difference of device-decoded crops
# (nvJPEG) against the CPU path, and the per-worker table of mae-bench --data (decode modes side by side with
# the reference MAE loader).
#
#   bash benchmarks/gpu_loop.sh [OUT_DIR]     # loop.json + loop.md in OUT_DIR (default: $OUT or bench_gpu)
#
# Images, runs and logs go to a scratch directory (LOOP_WORK, default a new temporary one, removed at the end
# unless LOOP_WORK is given); loop.json keeps the tail of every log. Env: PYTHON (default .venv/bin/python,
# else python3); LOOP_STEPS (default 100); LOOP_IMAGES (default 24000); LOOP_MODES (default cpu,device,synthetic;
# MODE:COMPILE runs MODE with train.compile=COMPILE, e.g. synthetic:reduce-overhead, into run_MODE_COMPILE);
# LOOP_STEP_JSON (a mae-bench report of the step to compare with, instead of timing it here); LOOP_EXTRAS=0
# leaves out the decode comparison and the per-worker table. GPU_CHECK_DRY_RUN=1 runs the same commands with a
# tiny model on the CPU in seconds (checks the script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${1:-${OUT:-bench_gpu}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    IMAGES=${LOOP_IMAGES:-48} STEPS=${LOOP_STEPS:-6} LIMIT=120 DEVICE=cpu
    MODEL=(model.name=mae_vit_tiny_patch16 model.img_size=32 model.patch_size=8 model.depth=1 model.embed_dim=32
           model.num_heads=2 model.decoder_embed_dim=32 model.decoder_depth=1 model.decoder_num_heads=2)
    RUN=(recipe=vit_base "${MODEL[@]}" train.batch_size=8 data.num_workers=1 train.compile=false
         train.precision=fp32 log.every_steps=2)
    COMPILE_OK=${GPU_CHECK_DRY_COMPILE:-0} # a train.compile mode of LOOP_MODES runs as false unless this is 1
    STEP=(--recipe vit_base "${MODEL[@]}" --batch 8 --dtype fp32 --compile off --steps 2 --warmup 1 --device cpu)
    PER_WORKER="--img-size 32 --batch 4 --data-batches 2"
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"
    IMAGES=${LOOP_IMAGES:-24000} STEPS=${LOOP_STEPS:-100} LIMIT=150 DEVICE=cuda
    RUN=(recipe=vit_base log.every_steps=20) COMPILE_OK=1
    STEP=(--recipe vit_base --dtype bf16 --compile on --steps 20 --warmup 3 --device cuda)
    PER_WORKER="--batch 64 --data-batches 4 --rounds 2"
fi
if [ -n "${LOOP_WORK:-}" ]; then WORK=$LOOP_WORK; mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
DATA="$WORK/jpegs_500x375"
COMMON=("${RUN[@]}" train.max_steps="$STEPS" checkpoint.every_steps=1000000 log.knn_every_steps=0
        log.viz_images=0 log.wandb=disabled log.progress=false)

echo "== loop 0. $IMAGES generated 500x375 JPEGs (quality 90, crops of scikit-image photos)"
"$PY" - "$DATA" "$IMAGES" <<'PY'
import os, sys, time
from multiprocessing import Pool
from data_tools.bench import make_images

root, n = sys.argv[1], int(sys.argv[2])
t = time.time()
if not os.path.isdir(root):
    chunks = [(f"{root}/part{k}", n // 16 + (k < n % 16)) for k in range(16)]
    with Pool(min(16, os.cpu_count() or 1)) as pool:  # 16 folders of 4 classes: an ImageFolder of 64 classes
        pool.starmap(make_images, [(d, m, (500, 375)) for d, m in chunks if m])
    for d, _ in chunks:
        for c in os.listdir(d) if os.path.isdir(d) else []:
            os.rename(f"{d}/{c}", f"{root}/{os.path.basename(d)}_{c}")
        os.path.isdir(d) and os.rmdir(d)
files = [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs]
print(f"{len(files)} files, {sum(map(os.path.getsize, files)) / len(files) / 1e3:.0f} KB each, {time.time() - t:.0f} s")
PY

# inner limits stay in the caller's process group (--foreground), so a caller's time limit ends these runs too
if [ -n "${LOOP_STEP_JSON:-}" ]; then
    echo "== loop 1. the compiled step alone: $LOOP_STEP_JSON"
    cp "$LOOP_STEP_JSON" "$WORK/loop_step.json" 2> /dev/null || echo "no step report at $LOOP_STEP_JSON"
else
    echo "== loop 1. the compiled step alone"
    timeout --foreground --kill-after=5 "$LIMIT" "$PY" -m mae.bench "${STEP[@]}" --json "$WORK/loop_step.json" \
        | tee "$WORK/loop_step.txt"
fi

IFS=, read -ra MODES <<< "${LOOP_MODES:-cpu,device,synthetic}"
for SPEC in "${MODES[@]}"; do
    MODE=${SPEC%%:*} NAME=${SPEC/:/_} EXTRA=()
    if [ "$SPEC" != "$MODE" ]; then
        EXTRA=("train.compile=${SPEC#*:}")
        [ "$COMPILE_OK" = 1 ] || EXTRA=(train.compile=false)
    fi
    echo "== loop 2. the training loop, $SPEC"
    SRC=("data.train=$DATA" "data.decode=$MODE")
    [ "$MODE" = synthetic ] && SRC=(data.train=synthetic data.synthetic_samples="$IMAGES")
    rm -rf "$WORK/run_$NAME"
    timeout --foreground --kill-after=5 "$LIMIT" "$PY" mae/pretrain.py "${COMMON[@]}" "${SRC[@]}" "${EXTRA[@]}" \
        output_dir="$WORK/run_$NAME" > "$WORK/loop_$NAME.log" 2>&1 \
        || echo "loop $SPEC failed or ran past ${LIMIT}s (log tail in loop.json)"
    grep -E "^step|error" "$WORK/loop_$NAME.log" | tail -4 || true
done
if [ "${LOOP_EXTRAS:-1}" = 1 ]; then # (the body is not indented: it holds heredocs)
echo "== loop 3. device-decoded crops against the CPU path (mean absolute difference, levels of 255)"
timeout --foreground 60 "$PY" - "$DATA" "$DEVICE" "$WORK/loop_decode.json" <<'PY' || echo "decode comparison failed"
import json, sys
from types import SimpleNamespace
import torch
from mae.data import build_train_loader

root, device, out = sys.argv[1], torch.device(sys.argv[2]), sys.argv[3]
cfg = lambda decode: SimpleNamespace(train=root, val="", fmnist_dir="", num_workers=0, shuffle_buffer=0,
    epoch_samples=0, resampled=False, synthetic_samples=0, label_fraction=1.0, mean=[0.0], std=[1.0 / 255],
    scale_min=0.2, hflip=True, crop_pct=0.875, auto_augment="", reprob=0.0, decode=decode)  # images in levels
kw = dict(source=root, img_size=224, in_chans=3, batch_size=32, augment="mae", seed=0, rank=0, world_size=1)
cpu, dev = build_train_loader(cfg("cpu"), **kw), build_train_loader(cfg("device"), **kw)
diffs = []
for (a, _, _), (b, _, _) in zip(cpu.iterate(0), dev.device_batches(0, 0, device)):
    diffs.append(float((a.to(device) - b).abs().mean()))
    if len(diffs) == 4:
        break
row = {"device": str(device), "crops": 32 * len(diffs), "mean_abs_diff_levels": sum(diffs) / len(diffs)}
print(row)
json.dump(row, open(out, "w"))
PY

echo "== loop 4. the pipeline per worker: decode modes and the reference loader (mae-bench --data)"
timeout --foreground 120 "$PY" -m mae.bench --data "$DATA" --decode cpu,device --reference --device "$DEVICE" $PER_WORKER \
    --json "$WORK/loop_data.json" || echo "per-worker benchmark failed"
fi

"$PY" - "$WORK" "$OUT_DIR" "${LOOP_MODES:-cpu,device,synthetic}" <<'PY'
import json, os, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from gpu_results import loop_run

work, out, modes = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
step = json.load(open(f"{work}/loop_step.json"))["results"][0] if os.path.exists(f"{work}/loop_step.json") else None
step_rate = step["img_per_s"] if step and not step["error"] else None
rows = []
for spec in modes:
    name = spec.replace(":", "_", 1)
    log = f"{work}/loop_{name}.log"
    tail = open(log).read().splitlines()[-6:] if os.path.exists(log) else []
    run = loop_run(Path(work) / f"run_{name}")  # medians over the windows after the first (compilation)
    if run is None:
        rows.append({"mode": spec, "error": "no timed windows", "log_tail": tail})
        continue
    rows.append({"mode": spec, "img_per_s": run["img_s"], "vs_step": run["img_s"] / step_rate if step_rate else None,
                 "data_wait": run["data_wait"], "windows": run["windows"], "log_tail": tail})
decode = json.load(open(f"{work}/loop_decode.json")) if os.path.exists(f"{work}/loop_decode.json") else None
per_worker = json.load(open(f"{work}/loop_data.json")) if os.path.exists(f"{work}/loop_data.json") else None
report = {"step": step, "step_img_per_s": step_rate, "loop": rows, "decode_diff": decode, "per_worker": per_worker}
json.dump(report, open(f"{out}/loop.json", "w"), indent=1)
if step_rate:
    lines = [f"the step alone ({step['config']['dtype']}, compile {'on' if step['config']['compile'] else 'off'}, "
             f"batch {step['config']['batch']}): {step_rate:,.0f} img/s", ""]
else:
    lines = ["the step alone: not measured", ""]
lines += ["| data | loop img/s (median window) | vs step | data_wait | windows |", "| --- | --- | --- | --- | --- |"]
for r in rows:
    if "error" in r:
        lines.append(f"| {r['mode']} | {r['error']}: {' / '.join(r['log_tail'][-2:])} | | | |")
        continue
    vs = f"{r['vs_step']:.1%}" if r["vs_step"] is not None else "-"
    lines.append(f"| {r['mode']} | {r['img_per_s']:,.0f} | {vs} | {r['data_wait']:.1%} | "
                 + " / ".join(f"{w:,.0f}" for w in r["windows"]) + " |")
if decode:
    lines += ["", f"device-decoded crops vs the CPU path on {decode['device']}: mean |diff| "
              f"{decode['mean_abs_diff_levels']:.3f} levels of 255 over {decode['crops']} crops"]
if per_worker:
    from mae.perf.data import format_rows

    lines += ["", "```", format_rows(per_worker), "```"]
open(f"{out}/loop.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
