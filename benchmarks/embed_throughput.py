"""mae-embed throughput (images/s) on this machine: the demo encoder on Fashion-MNIST and ViT-B/16 at 224 px
(random weights) on the synthetic set, the whole command (read, transform, forward, write) against the
encoder's forward alone on the same batches.

    python benchmarks/embed_throughput.py [--images 2048,256] [--batch-size 256] [--workers 1] [--repeats 3]

Each model gets a run directory of random weights (the timing does not depend on them); the command is run
`--repeats` times and the fastest is reported (a shared machine only ever slows a run down), then the
forward alone on pre-made batches of the same size, and a GEMM of the same dtype measured just before (mae.bench's
matmul_peak) puts the forward's analytic FLOP/s against what the machine gives at that moment. Prints one line
per model; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae.config import to_yaml  # noqa: E402
from mae.embed import Embedder  # noqa: E402
from mae.embed import main as embed  # noqa: E402
from mae.perf.step import _block_flops, matmul_peak  # noqa: E402
from mae.tasks import load_config  # noqa: E402
from mae.weights.build import build_mae  # noqa: E402

MODELS = {  # name -> (run overrides, DATA)
    "demo (ViT 192-d, 6 blocks, 28 px, patch 4)": (["recipe=demo"], "fashion-mnist:test"),
    "ViT-B/16, 224 px": (["model.name=mae_vit_base_patch16", "model.img_size=224"], "synthetic"),
}


def make_run(directory: Path, overrides: list[str]) -> Path:
    """A run directory holding random weights of the recipe's model."""
    cfg = load_config(overrides)
    torch.manual_seed(0)
    model = build_mae(cfg)
    (directory / "checkpoint-00000001").mkdir(parents=True)
    (directory / "config.yaml").write_text(to_yaml(cfg))
    save_file(model.state_dict(), str(directory / "checkpoint-00000001" / "model.safetensors"))
    return directory


def command_seconds(run: Path, data: str, out: Path, images: int, args) -> float:
    argv = [str(run), data, str(out), "--max-samples", str(images), "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--precision", args.precision, "--no-progress"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        assert embed(argv) == 0
        return time.perf_counter() - t0


def forward_seconds(embedder: Embedder, images: int, batch_size: int) -> float:
    s = embedder.spec
    batches = [torch.randn(min(batch_size, images - i), s.in_chans, s.img_size, s.img_size)
               for i in range(0, images, batch_size)]  # fmt: skip
    embedder(batches[0][:2])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        embedder(b)
    return time.perf_counter() - t0


def forward_flops(embedder: Embedder) -> int:
    """Matmul FLOPs per image of the encoder's forward on every patch (patch projection and blocks)."""
    pe = embedder.model.patch_embed
    tokens = 1 + pe.num_patches
    return 2 * pe.num_patches * pe.proj.weight.numel() + sum(
        _block_flops(b, tokens) for b in embedder.model.blocks
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="2048,256", help="images per model, in MODELS order")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.images.split(",")]
    flags = [
        f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in Path("/proc/cpuinfo").read_text()
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {', '.join(flags) or '?'}; "
          f"batch {args.batch_size}, {args.workers} loader worker(s), precision {args.precision}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for (label, (overrides, data)), images in zip(MODELS.items(), counts):
            run = make_run(Path(tmp) / label.split()[0], overrides)
            cmd = min(
                command_seconds(run, data, Path(tmp) / "out", images, args) for _ in range(args.repeats)
            )
            embedder = Embedder.from_pretrained(run, precision=args.precision)
            dtype = torch.bfloat16 if embedder.precision == "bf16" else torch.float32
            peak = matmul_peak(dtype, embedder.device, 2048)
            fwd = min(forward_seconds(embedder, images, args.batch_size) for _ in range(args.repeats))
            achieved = forward_flops(embedder) * images / fwd
            print(f"{label:45s} {images:5d} images: mae-embed {images / cmd:8.1f} img/s, "
                  f"forward alone {images / fwd:8.1f} img/s ({embedder.device.type} {embedder.precision}, "
                  f"{achieved / 1e9:.0f} GFLOP/s = {achieved / peak:.0%} of the GEMM's {peak / 1e9:.0f} now); "
                  f"the command at {fwd / cmd:.0%} of the forward's rate")  # fmt: skip


if __name__ == "__main__":
    main()
