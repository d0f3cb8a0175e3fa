"""Model registry: `create_mae`, `create_vit`, `list_models`, and the layer ids of layer-wise lr decay."""

from __future__ import annotations

import difflib
import inspect

import torch.nn as nn

from .backends import ensure_attn_backends
from .mae import MaskedAutoencoder
from .vit import (
    ATTN_BACKENDS,
    Attention,
    Block,
    VisionTransformer,
    resolve_attn_backend,
    set_attn_backend,
    sincos_pos_embed_2d,
)

__all__ = [
    "ATTN_BACKENDS",
    "Attention",
    "Block",
    "MaskedAutoencoder",
    "VisionTransformer",
    "count_params",
    "create_mae",
    "create_vit",
    "ensure_attn_backends",
    "layer_id",
    "list_models",
    "model_config",
    "resolve_attn_backend",
    "set_attn_backend",
    "sincos_pos_embed_2d",
]

# Encoders of the ViT paper / DeiT; decoders of the MAE paper for base/large/huge (512-d, 8 blocks,
# 16 heads). Tiny and small have no published MAE decoder; theirs keep the decoder lighter than the encoder.
_ENCODERS = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
_DECODERS = {
    "tiny": dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    "small": dict(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "base": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "large": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "huge": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}
_MAE = {f"mae_vit_{s}_patch{c['patch_size']}": dict(**c, **_DECODERS[s]) for s, c in _ENCODERS.items()}
_VIT = {f"vit_{s}_patch{c['patch_size']}": dict(c) for s, c in _ENCODERS.items()}


def list_models() -> list[str]:
    """Every registered name: mae_vit_* (pretraining) and vit_* (classifiers)."""
    return sorted(_MAE) + sorted(_VIT)


def _lookup(table: dict[str, dict], name: str) -> dict:
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(table))}"
        raise ValueError(f"unknown model name {name!r}{hint}")
    return dict(table[name])


def _build(cls: type[nn.Module], name: str, defaults: dict, overrides: dict) -> nn.Module:
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TypeError(f"{name}: unknown model argument {key!r}{hint}")
    return cls(**{**defaults, **overrides})


def model_config(name: str) -> dict:
    """The registry's constructor arguments for `name` (before overrides)."""
    return _lookup(_MAE if name.startswith("mae_") else _VIT, name)


def create_mae(name: str, **overrides) -> MaskedAutoencoder:
    """A MaskedAutoencoder from the registry; `overrides` are MaskedAutoencoder arguments (img_size,
    patch_size, in_chans, decoder_*, norm_pix_loss, attn_backend, drop_path_rate, grad_checkpointing, ...)."""
    return _build(MaskedAutoencoder, name, _lookup(_MAE, name), overrides)


def create_vit(
    name: str, num_classes: int, global_pool: bool = True, drop_path_rate: float = 0.0, **overrides
) -> VisionTransformer:
    """A ViT classifier from the registry; `overrides` are VisionTransformer arguments (img_size, patch_size,
    in_chans, drop_rate, attn_backend, grad_checkpointing, ...)."""
    defaults = dict(_lookup(_VIT, name), num_classes=num_classes, global_pool=global_pool)
    return _build(VisionTransformer, name, {**defaults, "drop_path_rate": drop_path_rate}, overrides)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (the fixed position tables count unless `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def layer_id(param_name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay (BEiT convention): embeddings 0, blocks.i -> i + 1, rest depth + 1."""
    if param_name in ("cls_token", "pos_embed") or param_name.startswith("patch_embed."):
        return 0
    if param_name.startswith("blocks."):
        return int(param_name.split(".")[1]) + 1
    return depth + 1
