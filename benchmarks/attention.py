"""Attention forward + backward on the CPU: PyTorch's fused SDPA kernel against the explicit
softmax(q k^T / sqrt(d)) v, at the sequence lengths of MAE pretraining and ViT fine-tuning.

    python benchmarks/attention.py [--threads 2] [--repeats 7] [--dtypes bf16,fp32]

Both forms run interleaved in one process; the minimum over repeats is reported (a shared machine only
ever slows a run down). This is the measurement behind CPU_HALF_EXPLICIT_MAX_TOKENS in mae/models/vit.py.
"""

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = {  # (batch, heads, tokens, head dim)
    "ViT-B MAE encoder, b16": (16, 12, 50, 64),
    "ViT-B MAE decoder, b16": (16, 16, 197, 32),
    "ViT-B fine-tune 384px, b4": (4, 12, 577, 64),
    "ViT-H/14 fine-tune 448px, b2": (2, 16, 1025, 80),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def explicit(q, k, v):
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return attn.softmax(dim=-1) @ v


def fwd_bwd_seconds(fn, q, k, v, grad) -> float:
    t0 = time.perf_counter()
    fn(q, k, v).backward(grad)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtypes", default="bf16,fp32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads; fwd+bwd ms, min of {args.repeats}")
    for dname in args.dtypes.split(","):
        for label, shape in SHAPES.items():
            q, k, v = (torch.randn(*shape, dtype=DTYPES[dname], requires_grad=True) for _ in range(3))
            grad = torch.randn(*shape, dtype=DTYPES[dname])
            times = {"sdpa": [], "explicit": []}
            for _ in range(args.repeats + 1):
                times["sdpa"].append(fwd_bwd_seconds(F.scaled_dot_product_attention, q, k, v, grad))
                times["explicit"].append(fwd_bwd_seconds(explicit, q, k, v, grad))
            s, e = min(times["sdpa"][1:]) * 1e3, min(times["explicit"][1:]) * 1e3
            print(
                f"{dname} {label:30s} {shape}: sdpa {s:8.1f}  explicit {e:8.1f}  sdpa/explicit {s / e:5.2f}"
            )


if __name__ == "__main__":
    main()
