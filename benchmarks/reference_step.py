"""The reference release's MAE next to this project's, one identical training step, in one process.

    python benchmarks/reference_step.py --size large --batch 128 --json ref.json

The reference is models_mae.py of facebookresearch/mae on timm's blocks (whose attention runs SDPA), as
transcribed in tests/_model_utils.py; ours is `create_mae` with the default (sdpa) backend. Both run
mae-bench's step (bf16 autocast, backward, fused AdamW, zero_grad), eager, round-robin, next to the
same-run GEMM peak; the JSON has mae-bench's layout plus a `side` per result.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from _model_utils import reference_mae  # noqa: E402

from mae.models import create_mae  # noqa: E402
from mae.perf.grid import resolve_device  # noqa: E402
from mae.perf.step import DTYPES, StepConfig, format_table, matmul_peak, run_config  # noqa: E402

PATCH = {"tiny": 16, "base": 16, "large": 16, "huge": 14}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="large", choices=sorted(PATCH))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--matmul-size", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    name = f"mae_vit_{args.size}_patch{PATCH[args.size]}"
    sides = {
        "reference release (timm blocks)": lambda c: reference_mae(args.size, img_size=c.img_size),
        "this project": lambda c: create_mae(name, img_size=c.img_size),
    }
    cfg = StepConfig(batch=args.batch, dtype=args.dtype, img_size=args.img_size)
    gemm = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peak, best = 0.0, {}
    for _ in range(args.rounds):
        peak = max(peak, matmul_peak(DTYPES[args.dtype], device, gemm))
        for side, build in sides.items():
            res = run_config(build, cfg, device, args.steps, args.warmup)
            if side not in best or res.img_per_s > best[side].img_per_s:
                best[side] = res
    peak = max(peak, matmul_peak(DTYPES[args.dtype], device, gemm))
    results = []
    for side, res in best.items():
        res.tflops = res.img_per_s * res.gflop_per_img / 1e3
        res.mfu_measured = res.tflops * 1e12 / peak
        results.append({**asdict(res), "config": asdict(res.config), "side": side})
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": name,
        "recipe": "",
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "matmul_size": gemm,
        "matmul_peak_tflops": {args.dtype: peak / 1e12},
        "nominal_peak_tflops": None,
        "results": results,
    }
    print(format_table(report))
    print("rows: " + ", ".join(r["side"] for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
