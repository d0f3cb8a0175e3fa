"""Where a training step's time goes: torch.profiler self time of the ops of a few steps, grouped into
matmul (the FLOPs mae-bench counts), casts, attention kernels, the optimizer, and the rest.

    python benchmarks/profile_step.py --recipe demo --dtype bf16            # the demo at its batch size
    python benchmarks/profile_step.py --model mae_vit_base_patch16 --batch 16 --dtype fp32
"""

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mae.perf.grid import model_builder
from mae.perf.step import StepConfig, make_step
from mae.perf.step import bench_optimizer as build_optimizer

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
               "aten::convolution_backward", "aten::_convolution"),
    "attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "copies (dtype casts, layouts)": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
    "optimizer": ("aten::_fused_adamw_", "aten::_foreach_", "Optimizer.step"),
    "layer norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "gelu / softmax": ("aten::gelu", "aten::gelu_backward", "aten::_softmax", "aten::_softmax_backward_data"),
    "bias / reduction": ("aten::sum", "aten::mean"),
    "gather / cat / masks": ("aten::gather", "aten::scatter_add_", "aten::cat", "aten::argsort", "aten::sort",
                             "aten::fill_", "aten::zero_"),
}  # fmt: skip


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other (elementwise, framework)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*")
    p.add_argument("--recipe", default="")
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--batch", default="")
    p.add_argument("--img-size", default="")
    p.add_argument("--mask-ratio", default="")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    _, build, defaults = model_builder(args)
    cfg = StepConfig(
        batch=int(args.batch or defaults["batch"]),
        img_size=int(args.img_size or defaults["img_size"]),
        mask_ratio=float(args.mask_ratio or defaults["mask_ratio"]),
        dtype=args.dtype,
        attn=args.attn,
    )
    model = build(cfg).train()
    from mae.models import set_attn_backend

    set_attn_backend(model, cfg.attn)
    step = make_step(model, build_optimizer(model, "fused"), torch.device("cpu"), cfg.dtype, cfg.mask_ratio)
    c = model.patch_embed.proj.in_channels
    images = torch.randn(cfg.batch, c, cfg.img_size, cfg.img_size)
    for _ in range(2):
        step(images)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step(images)
    by_group = defaultdict(float)
    for evt in prof.key_averages():
        by_group[group_of(evt.key)] += evt.self_cpu_time_total
    total = sum(by_group.values())
    print(
        f"{cfg.label()}, {torch.get_num_threads()} threads: self CPU time by op group over {args.steps} steps"
    )
    for group, t in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"  {group:32s} {100 * t / total:5.1f}%  {t / 1e3 / args.steps:8.1f} ms/step")


if __name__ == "__main__":
    main()
