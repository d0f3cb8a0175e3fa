"""Optimizers and schedules: parameter groups, layer-wise lr decay, AdamW / LARS, warmup + cosine or poly."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# Every 1-d parameter (biases, norm scales) is never decayed. Pretraining decays everything else, the tokens
# included, as the reference does (timm's add_weight_decay with no skip list; its position tables are fixed).
# Fine-tuning also spares what timm's VisionTransformer.no_weight_decay() names, as the reference does.
VIT_NO_DECAY = frozenset({"cls_token", "pos_embed", "dist_token"})


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    layer_id: Callable[[str], int] | None = None,
    num_layers: int = 0,
    no_decay_names: frozenset[str] = frozenset(),
) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups, each with an `lr_scale`.

    No decay on 1-d parameters and on the top-level parameters named in `no_decay_names` (fine-tuning:
    VIT_NO_DECAY); frozen parameters are left out.

    With `layer_decay` < 1 (BEiT-style fine-tuning), the parameters of layer i get
    lr_scale = layer_decay ** (num_layers - i), where `layer_id(name)` is 0 for the embeddings,
    i + 1 for block i and num_layers for the head and final norms.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in no_decay_names
        lid = layer_id(name) if (layer_id is not None and layer_decay != 1.0) else num_layers
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - lid) if layer_decay != 1.0 else 1.0,
                "no_decay": no_decay,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# AdamW's implementations: the fused kernel; the fused kernel with its step count and hyperparameters kept on
# the device (capturable: the whole update can be captured in a CUDA graph or compiled); one kernel per op over
# all parameters (foreach); a Python loop over parameters (forloop). auto: fused where every parameter lives on
# one device that has it, else foreach.
ADAMW_IMPLS = ("auto", "fused", "fused-capturable", "foreach", "forloop")


def build_optimizer(
    groups: list[dict], name: str, lr: float, betas=(0.9, 0.95), impl: str = "auto"
) -> torch.optim.Optimizer:
    """AdamW (in implementation `impl`) or LARS over parameter groups of `param_groups`."""
    torch_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if name == "adamw":
        if impl not in ADAMW_IMPLS:
            raise ValueError(f"AdamW implementation {impl!r}: expected one of {', '.join(ADAMW_IMPLS)}")
        if impl != "auto":
            flags = {"fused": dict(fused=True), "fused-capturable": dict(fused=True, capturable=True),
                     "foreach": dict(foreach=True), "forloop": dict(foreach=False)}[impl]  # fmt: skip
            return torch.optim.AdamW(torch_groups, lr=lr, betas=tuple(betas), **flags)
        devices = {p.device.type for g in torch_groups for p in g["params"]}
        fused = len(devices) == 1 and devices <= {"cuda", "cpu"}
        try:
            return torch.optim.AdamW(torch_groups, lr=lr, betas=tuple(betas), fused=fused)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(torch_groups, lr=lr, betas=tuple(betas), foreach=True)
    if name == "lars":
        from timm.optim import Lars

        # As the reference LARS: trust-ratio adaptation on matrices only, never on biases / norms.
        for g in torch_groups:
            g["always_adapt"] = not g["no_decay"]
        return Lars(torch_groups, lr=lr, momentum=0.9, trust_coeff=0.001)
    raise ValueError(f"train.optimizer={name!r}: expected adamw or lars")


SCHEDULES = ("cosine", "poly", "step")
# "step": detectron2's multi-step schedule of the ViTDet / LSJ recipes, lr x0.1 at these fractions of the run
# (iterations 163,889 and 177,546 of 184,375)
STEP_MILESTONES = (163889 / 184375, 177546 / 184375)


def lr_at(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    min_lr: float = 0.0,
    schedule: str = "cosine",
) -> float:
    """Linear warmup to `peak_lr`, then down to `min_lr` by a half cosine or linearly ("poly", power 1, as
    mmsegmentation's PolyLR after its warm-up), or x0.1 at each of STEP_MILESTONES of the run ("step", min_lr
    unused); a pure function of the step."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    if schedule == "step":
        return peak_lr * 0.1 ** sum(step >= m * total_steps for m in STEP_MILESTONES)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "poly":
        return min_lr + (peak_lr - min_lr) * (1.0 - progress)
    if schedule != "cosine":
        raise ValueError(f"train.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def vit_layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """BEiT layer-wise lr decay for a ViT (`model.blocks`): lr_scale = layer_decay ** (depth + 1 - layer),
    embeddings layer 0, block i layer i + 1, heads and final norms layer depth + 1 (scale 1). No decay on 1-d
    parameters, the cls token and the position table, as the reference fine-tuning."""
    from functools import partial

    from mae.models import layer_id

    depth = len(model.blocks)
    return param_groups(
        model,
        weight_decay,
        layer_decay=layer_decay,
        layer_id=partial(layer_id, depth=depth),
        num_layers=depth + 1,
        no_decay_names=VIT_NO_DECAY,
    )
