"""Does xformers run its own attention kernel in this environment, with the same numbers as SDPA, and how fast?

    python benchmarks/xformers_check.py --size base --batch 64 --json xformers.json

One MAE training step (bf16 autocast on CUDA) of the same weights, images and masks with attn_backend xformers
and sdpa: the relative difference of the loss and of the whole gradient, and which ops ran. `ran_kernel` is
true only when the torch.profiler trace of the xformers step holds an op of xformers' own namespaces
(`xformers::`, `xformers_flash::`, `xformers_flash3::`) and no PyTorch attention kernel: an import proves
nothing, and xformers 0.0.35 may hand the work to PyTorch's own kernels (its `-pt` operators, which call
`aten::_efficient_attention_forward` or `aten::_flash_attention_forward`, inside its own op for flash), which
do not count. The operators its dispatcher picks are recorded by name too. Then both backends' steps are timed
with mae-bench's step (eager, fused AdamW). Every outcome, failures included, is a JSON report; exit code 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from mae.models import Attention, create_mae  # noqa: E402
from mae.models.backends import xformers_build  # noqa: E402
from mae.perf.grid import resolve_device  # noqa: E402
from mae.perf.step import DTYPES, StepConfig, run_config  # noqa: E402

XFORMERS_NAMESPACES = ("xformers", "xformers_flash", "xformers_flash3")
# PyTorch's attention kernels (SDPA and the two it dispatches to, which xformers' '-pt' operators call)
PYTORCH_ATTENTION = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_", "aten::_flash_attention_",
                     "aten::_efficient_attention_")  # fmt: skip
PATCH = {"tiny": 16, "small": 16, "base": 16, "large": 16, "huge": 14}


def xformers_ops(names) -> list[str]:
    """The op names of xformers' own namespaces among profiler event names ('xformers_flash3::flash_fwd')."""
    return sorted({n for n in names if n.split("::")[0] in XFORMERS_NAMESPACES and "::" in n})


def pytorch_attention_ops(names) -> list[str]:
    """PyTorch's attention kernels among profiler event names."""
    return sorted({n for n in names if n.startswith(PYTORCH_ATTENTION)})


def ran_own_kernel(names) -> bool:
    """An xformers step ran xformers' own kernel: an op of its namespaces, and no PyTorch attention kernel (the
    model's every attention layer is on xformers, so one would be xformers handing the work to PyTorch)."""
    names = list(names)
    return bool(xformers_ops(names)) and not pytorch_attention_ops(names)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _lines(e: BaseException, limit: int = 800) -> str:
    """The whole message on one line: xformers' dispatcher lists why each operator was refused."""
    return f"{type(e).__name__}: " + " | ".join(x.strip() for x in str(e).splitlines() if x.strip())[:limit]


def _use_backend(model: torch.nn.Module, backend: str) -> None:
    """Set the attention backend as given, without the fallback a run applies (this check wants the failure)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend


def _loss_and_grads(model, images, noise, device, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        loss, _, _ = model(images, mask_ratio=0.75, noise=noise)
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach().float(), grads


def dispatched(model, images, dtype) -> dict:
    """The operators xformers' dispatcher picks for the model's first attention layer (forward, backward)."""
    try:
        from xformers.ops import fmha
        from xformers.ops.fmha.dispatch import _dispatch_bw, _dispatch_fw
    except Exception as e:  # noqa: BLE001
        return {"error": _one_line(e)}
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    n, heads = model.patch_embed.num_patches // 4 + 1, attn.num_heads
    head_dim = attn.qkv.out_features // (3 * heads)
    q = torch.randn(images.shape[0], n, heads, head_dim, device=images.device, dtype=DTYPES[dtype])
    try:
        inp = fmha.Inputs(query=q, key=q, value=q, attn_bias=None, p=0.0, scale=head_dim**-0.5)
        return {"forward": _dispatch_fw(inp, True).NAME, "backward": _dispatch_bw(inp, None).NAME}
    except Exception as e:  # noqa: BLE001
        return {"error": _lines(e)}


def check(
    size: str, batch: int, img_size: int, device: torch.device, dtype: str, steps: int, warmup: int
) -> dict:
    version, built_for = xformers_build()
    name = f"mae_vit_{size}_patch{PATCH[size]}"
    report = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "xformers": version,
        "xformers_built_for_torch": built_for,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": name,
        "batch": batch,
        "dtype": dtype,
        "ran_kernel": False,
        "xformers_ops": [],
        "pytorch_attention_ops": [],
        "dispatched": None,
        "loss_rel_diff": None,
        "grad_rel_diff": None,
        "img_s": None,
        "sdpa_img_s": None,
        "error": "",
    }
    torch.manual_seed(0)
    sdpa = create_mae(name, img_size=img_size, attn_backend="sdpa").to(device).train()
    xf = copy.deepcopy(sdpa)
    _use_backend(xf, "xformers")
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    noise = torch.rand(batch, sdpa.patch_embed.num_patches, device=device)
    if version == "?":
        report["error"] = "xformers does not import here"
    else:
        report["dispatched"] = dispatched(sdpa, images, dtype)
        try:
            ref_loss, ref_grads = _loss_and_grads(sdpa, images, noise, device, dtype)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                loss, grads = _loss_and_grads(xf, images, noise, device, dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            names = [e.key for e in prof.key_averages()]
            report["xformers_ops"], report["pytorch_attention_ops"] = (
                xformers_ops(names),
                pytorch_attention_ops(names),
            )
            report["ran_kernel"] = ran_own_kernel(names)
            report["loss_rel_diff"] = float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12))
            report["grad_rel_diff"] = float((grads - ref_grads).norm() / ref_grads.norm().clamp_min(1e-12))
            if not report["xformers_ops"]:
                report["error"] = (
                    "no op of xformers' own namespaces ran (" + ", ".join(XFORMERS_NAMESPACES) + ")"
                )
            elif not report["ran_kernel"]:
                report["error"] = "xformers handed the attention to PyTorch's kernels: " + ", ".join(
                    report["pytorch_attention_ops"]
                )
        except Exception as e:  # noqa: BLE001  a wheel built for another torch raises at its first call
            report["error"] = _one_line(e)
    del sdpa, xf
    build = lambda cfg: create_mae(name, img_size=cfg.img_size)  # noqa: E731
    for backend, key in (("xformers", "img_s"), ("sdpa", "sdpa_img_s")):
        if backend == "xformers" and not report["ran_kernel"]:
            continue  # a fallback's speed under xformers' name would mislead
        res = run_config(build, StepConfig(batch=batch, dtype=dtype, attn=backend, img_size=img_size), device,
                         steps, warmup)  # fmt: skip
        if res.attn_used == backend and not res.error:
            report[key] = res.img_per_s
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", choices=sorted(PATCH))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--label", default="", help="the environment, recorded as `env` (e.g. 'pinned pair')")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    try:
        report = check(args.size, args.batch, args.img_size, resolve_device(args.device), args.dtype, args.steps,
                       args.warmup)  # fmt: skip
    except Exception as e:  # noqa: BLE001  the report says what failed; the GPU check goes on
        report = {"ran_kernel": False, "error": _one_line(e), "torch": torch.__version__}
    report["env"] = args.label
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
