"""The detection training step's speed and memory: the demo model on its own data, and ViT-B/16 Mask R-CNN at 1024 px
with window attention (ViTDet) against global attention in every block.

    python benchmarks/detect_bench.py                          # both, on the CPU (ViT-B: minutes per configuration)
    python benchmarks/detect_bench.py --only demo --steps 10
    python benchmarks/detect_bench.py --only vit_b --vit-size 1024 --batches 1,2 --device cuda --json out.json
    python benchmarks/detect_bench.py --only block --block-size 1024   # one ViT-B block, window against global

Each configuration (on the CPU in a process of its own: a process's peak resident memory only grows) builds the model, makes `--warmup` training steps (forward, backward, AdamW) and times
`--steps` more: img/s over those, and the peak memory (CUDA: max allocated; CPU: the process's peak resident set).
ViT-B's memory per image is the difference of the peaks at the two batch sizes of `--batches`; `block` measures one
ViT-B block alone (window 14 or global, forward and backward) on the patch grid of `--block-size`, which shows the
difference on a machine that the whole model at 1024 px with global attention in all 12 blocks does not fit. The
demo reads
fashion-mnist-instances through the demo recipe's loader; ViT-B gets random images with 8 random rectangles each.
Precision as the run would take it (train.precision=auto: bf16 where the hardware has it). Prints one line per
configuration and a summary; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def demo_batches(cfg, steps: int):
    """`steps` batches of the demo recipe's training data, as the loop gets them."""
    from mae.data.detection import det_source, det_transform
    from mae.tasks.detect import train_loader

    src = det_source(cfg.data.train, train=True, fmnist_dir=cfg.data.fmnist_dir, log_fn=lambda *a: None)
    loader = train_loader(
        cfg, 0, 1, src, det_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans, True)
    )
    batches = []
    for epoch in range(steps // len(loader) + 1):
        for images, targets, _ in loader.iterate(epoch):
            batches.append((images, targets))
            if len(batches) == steps:
                return batches
    return batches


def random_batch(batch: int, size: int, chans: int, objects: int = 8):
    """Random images and `objects` random rectangles (boxes, masks, labels 1..10) per image."""
    import torch

    from mae.data.detection import Targets

    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        xy = torch.randint(0, size // 2, (objects, 2), generator=g)
        wh = torch.randint(size // 16, size // 2, (objects, 2), generator=g)
        boxes = torch.cat([xy, xy + wh], 1).float()
        masks = torch.zeros(objects, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = 1
        targets.append(
            {"boxes": boxes, "labels": torch.randint(1, 11, (objects,), generator=g), "masks": masks}
        )
    return torch.randn(batch, chans, size, size, generator=g), Targets(targets, [(size, size)] * batch, size)


def measure_block(spec: dict) -> dict:
    """One ViT-B block on the patch grid of a `size` px image (64 x 64 at 1024), window 14 or global: forward and
    backward of `batch` images, timed once after a warm-up; its peak memory."""
    import torch

    from mae.models.detection import ViTDetBlock
    from mae.train.runtime import peak_mem_gb

    device, grid, window = torch.device(spec["device"]), spec["size"] // 16, spec["window"]
    blk = ViTDetBlock(768, 12, window, (window, window) if window else (grid, grid)).to(device)
    x = torch.randn(spec["batch"], grid, grid, 768, device=device, requires_grad=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"], torch.float32)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = blk(x)
        y.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        **spec,
        "img_per_s": spec["batch"] / times[-1],
        "step_s": times[-1],
        "peak_gb": peak_mem_gb(device),
    }


def measure(spec: dict) -> dict:
    """One configuration, in this process: warm-up steps, then timed ones."""
    import torch

    if spec["data"] == "block":
        return measure_block(spec)

    from mae.models.detection import detection_loss
    from mae.tasks import load_config
    from mae.train.runtime import peak_mem_gb
    from mae.weights.build import build_detector

    device = torch.device(spec["device"])
    cfg = load_config(spec["overrides"], task="detect")
    torch.manual_seed(0)
    model = build_detector(cfg, 10).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n = spec["warmup"] + spec["steps"]
    if spec["data"] == "demo":
        batches = demo_batches(cfg, n)
    else:
        batches = [random_batch(cfg.train.batch_size, cfg.model.img_size, cfg.model.in_chans)] * n
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"], torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for images, targets in batches:
        images, targets = images.to(device), targets.to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = detection_loss(model(images, list(targets), targets.image_sizes))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    timed = times[spec["warmup"] :] or times
    images = sum(len(t) for _, t in batches[spec["warmup"] :]) or len(batches[0][1])
    return {**spec, "img_per_s": images / sum(timed), "step_s": sum(timed) / len(timed),
            "peak_gb": peak_mem_gb(device), "loss": float(loss)}  # fmt: skip


def run_one(spec: dict) -> dict:
    """One configuration: in this process on CUDA (its peak is reset), in a fresh one on the CPU (a process's
    peak resident memory never goes down)."""
    if spec["device"].startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        try:
            return measure(spec)
        except torch.cuda.OutOfMemoryError as e:
            return {**spec, "error": f"out of memory: {str(e).splitlines()[0][:120]}"}
    r = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode:
        return {**spec, "error": (r.stderr.strip().splitlines() or ["exit " + str(r.returncode)])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def precision(device: str) -> str:
    from mae.train.runtime import resolve_precision

    return resolve_precision("auto", device.startswith("cuda"))


def configurations(args) -> list[dict]:
    base = {"device": args.device, "warmup": args.warmup, "steps": args.steps, "precision": args.precision}
    specs = []
    if args.only in ("all", "demo"):
        specs.append({**base, "name": "demo", "data": "demo",
                      "overrides": ["recipe=detect_demo", "data.num_workers=0", *args.demo_overrides]})  # fmt: skip
    if args.only in ("all", "block"):
        for window, label in ((14, "window 14"), (0, "global")):
            for b in args.batches:
                specs.append({**base, "name": f"block {label}", "data": "block", "batch": b, "window": window,
                              "size": args.block_size})  # fmt: skip
    if args.only in ("all", "vit_b"):
        vit = ["recipe=detect_coco_vit_base", f"model.img_size={args.vit_size}", *args.vit_overrides]
        for window, label in ((14, "window 14"), (0, "global")):
            for b in args.batches:
                specs.append({**base, "name": f"vit_b {label}", "data": "random", "batch": b, "steps": args.vit_steps,
                              "warmup": args.vit_warmup, "overrides": [*vit, f"model.window_size={window}",
                                                                       f"train.batch_size={b}"]})  # fmt: skip
    return specs


def summary(results: list[dict]) -> list[str]:
    """Memory per image of each attention: the difference of the peaks at the two batch sizes."""
    lines = []
    for what in ("block", "vit_b"):
        for label in ("window 14", "global"):
            rows = sorted((r for r in results if r["name"] == f"{what} {label}" and "peak_gb" in r),
                          key=lambda r: r["batch"])  # fmt: skip
            if len(rows) >= 2:
                a, b = rows[0], rows[-1]
                per = (b["peak_gb"] - a["peak_gb"]) / (b["batch"] - a["batch"])
                size = a["size"] if what == "block" else a["overrides"][1].split("=")[1]
                name = "one ViT-B block" if what == "block" else "ViT-B Mask R-CNN step"
                lines.append(f"{name} at {size} px, {label}: {per:.2f} GB per image (peak {a['peak_gb']:.2f} GB at "
                             f"batch {a['batch']}, {b['peak_gb']:.2f} GB at batch {b['batch']})")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("all", "demo", "block", "vit_b"), default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="", help="bf16 or fp32 (default: what train.precision=auto takes)")
    p.add_argument("--steps", type=int, default=10, help="timed demo steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vit-size", type=int, default=1024)
    p.add_argument(
        "--block-size", type=int, default=1024, help="the image size whose patch grid one block sees"
    )
    p.add_argument("--vit-steps", type=int, default=1)
    p.add_argument("--vit-warmup", type=int, default=1)
    p.add_argument("--batches", default="1,2", help="ViT-B batch sizes (memory per image: their difference)")
    p.add_argument("--demo-overrides", nargs="*", default=[], help="key=value for the demo model")
    p.add_argument("--vit-overrides", nargs="*", default=[], help="key=value for the ViT-B model")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    args.precision = args.precision or precision(args.device)
    args.batches = [int(b) for b in args.batches.split(",")]
    cpu = os.popen("grep -m1 'model name' /proc/cpuinfo").read().split(":")[-1].strip()
    print(
        f"device {args.device} ({cpu or 'unknown CPU'}, {os.cpu_count()} cores), precision {args.precision}"
    )
    results = []
    for spec in configurations(args):
        r = run_one(spec)
        results.append(r)
        what = (
            r["name"]
            + (f" {r['size']} px" if "size" in r else "")
            + (f" batch {r['batch']}" if "batch" in r else "")
        )
        if "error" in r:
            print(f"{what}: error: {r['error']}")
        else:
            print(
                f"{what}: {r['img_per_s']:.2f} img/s ({r['step_s']:.2f} s/step), peak {r['peak_gb']:.2f} GB"
            )
    for line in summary(results):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "summary": summary(results)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
