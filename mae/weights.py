"""Weights in every form users bring them, and loading them into `MaskedAutoencoder` or the ViT classifier.

Sources: our training runs (`output_dir`, `checkpoint-*/model.safetensors`), the reference MAE release
(`.pth` files holding `{'model': state_dict}`, full or encoder-only), timm state dicts (`.safetensors`,
`.pth`, `.bin`) and Hugging Face ViTMAE directories (`config.json` + `model.safetensors`). Pickles are
read with `torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_CONTAINER_KEYS = ("model", "state_dict", "model_state")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_DECODER_PREFIXES = ("decoder", "mask_token")  # MAE-only keys (ours and the reference's)


# ----------------------------------------------------------------------------------------------------------
# files and directories


def resolve_weights_file(path: str | Path) -> Path:
    """The weights file behind `path`: a file itself; `model.safetensors` in a directory; in a training run
    directory (has `config.yaml`) the latest checkpoint's `model.safetensors`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {p}")
    if p.is_file():
        return p
    candidates = [p / "model.safetensors"]
    if (p / "config.yaml").exists():
        checkpoints = sorted(c for c in p.glob("checkpoint-*") if c.name != "checkpoint-last")
        candidates = [p / "checkpoint-last" / "model.safetensors"]
        candidates += [c / "model.safetensors" for c in reversed(checkpoints)] + [p / "model.safetensors"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no weights in {p}: looked for {', '.join(str(c.relative_to(p)) for c in candidates)}"
    )


def _torch_load(path: Path) -> object:
    """torch.load with weights_only=True; argparse.Namespace is allowed (the reference's checkpoints hold one)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_globals is None:
            return torch.load(path, map_location="cpu", weights_only=True)
        with safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {path} as a weights-only checkpoint: {first_line}") from None


def _unwrap(obj: object, path: Path) -> StateDict:
    """The state dict inside `{'model': ...}`-style containers; DDP / compile prefixes removed."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ValueError(
                f"{path}: no state dict found (top-level keys: {', '.join(map(str, list(obj)[:8]))})"
            )
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            for prefix in _WRAPPER_PREFIXES:
                k = k.removeprefix(prefix)
            sd[k] = v
    return sd


def load_state_dict_any(path: str | Path) -> StateDict:
    """A state dict with our (= the reference's = timm's) key names from any supported source.

    `path`: a `.safetensors` / `.pth` / `.pt` / `.bin` file; a directory holding `model.safetensors`;
    a training run directory (its latest checkpoint); or a Hugging Face ViTMAE directory (converted).
    """
    file = resolve_weights_file(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(file), device="cpu")
    elif file.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = _unwrap(_torch_load(file), file)
    else:
        raise ValueError(f"unsupported weights file {file}: expected .safetensors, .pth, .pt or .bin")
    return hf_to_mae_state_dict(sd) if is_hf_vitmae_state_dict(sd) else sd


def read_hf_config(path: str | Path) -> dict | None:
    """The Hugging Face `config.json` of a ViTMAE directory, or None when `path` is not one."""
    p = Path(path)
    config = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not config.is_file():
        return None
    cfg = json.loads(config.read_text())
    return cfg if cfg.get("model_type") == "vit_mae" else None


# ----------------------------------------------------------------------------------------------------------
# Hugging Face ViTMAE names <-> ours (transformers 4.x names and the 5.x ones)

_HF_TOP = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
_HF_BLOCK = {  # style -> (layer prefix, {hf sub-module: ours}, (q, k, v) sub-modules)
    "v4": (
        "vit.encoder.layer",
        {
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
            "attention.output.dense": "attn.proj",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2",
        },
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ),
    "v5": (
        "vit.layers",
        {
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
            "attention.o_proj": "attn.proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ),
}
# decoder layers: `decoder.decoder_layers.N` (4.x and 5.x modules); 5.x's save_pretrained writes `decoder_encoder.layer.N`
_HF_LAYER = re.compile(
    r"^(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$"
)


def is_hf_vitmae_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in sd)


def hf_to_mae_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Hugging Face ViTMAEForPreTraining / ViTMAEModel keys -> ours; q, k, v are stacked into qkv."""
    subs = {hf: ours for _, names, _ in _HF_BLOCK.values() for hf, ours in names.items()}
    qkv_index = {name: i for _, _, qkv in _HF_BLOCK.values() for i, name in enumerate(qkv)}
    out: StateDict = {}
    qkv: dict[str, list] = {}
    for key, value in sd.items():
        if key.startswith(("embeddings.", "encoder.", "layers.", "layernorm.")):  # ViTMAEModel
            key = "vit." + key
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if m is None or (m[3] not in subs and m[3] not in qkv_index):
            raise ValueError(f"unrecognised Hugging Face ViTMAE key {key!r}")
        prefix = f"{'decoder_blocks' if m[1].startswith('decoder') else 'blocks'}.{m[2]}."
        if m[3] in subs:
            out[f"{prefix}{subs[m[3]]}.{m[4]}"] = value
        else:
            qkv.setdefault(f"{prefix}attn.qkv.{m[4]}", [None] * 3)[qkv_index[m[3]]] = value
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"Hugging Face checkpoint lacks one of query/key/value for {key}")
        out[key] = torch.cat(parts, dim=0)
    return out


def mae_to_hf_state_dict(sd: Mapping[str, torch.Tensor], style: str = "v5") -> StateDict:
    """Our keys -> Hugging Face ViTMAEForPreTraining keys ('v4': transformers 4.x names, 'v5': 5.x)."""
    layer_prefix, names, qkv_names = _HF_BLOCK[style]
    top = {ours: hf for hf, ours in _HF_TOP.items()}
    block_names = {ours: hf for hf, ours in names.items()}
    out: StateDict = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            raise ValueError(f"no Hugging Face ViTMAE name for {key!r}")
        hf_prefix = f"{'decoder.decoder_layers' if m[1] == 'decoder_blocks' else layer_prefix}.{m[2]}."
        if m[3] == "attn.qkv":
            for name, part in zip(qkv_names, value.chunk(3, dim=0)):
                out[f"{hf_prefix}{name}.{m[4]}"] = part.contiguous()
        elif m[3] in block_names:
            out[f"{hf_prefix}{block_names[m[3]]}.{m[4]}"] = value
        else:
            raise ValueError(f"no Hugging Face ViTMAE name for {key!r}")
    return out


def mae_args_from_hf_config(cfg: Mapping) -> dict:
    """MaskedAutoencoder arguments for a Hugging Face ViTMAEConfig (as a dict; its defaults where absent)."""
    hidden, dec_hidden = cfg.get("hidden_size", 768), cfg.get("decoder_hidden_size", 512)
    mlp_ratio = cfg.get("intermediate_size", 3072) / hidden
    if cfg.get("decoder_intermediate_size", 2048) != dec_hidden * mlp_ratio:
        raise ValueError("Hugging Face config: decoder MLP ratio differs from the encoder's; not supported")
    if not cfg.get("qkv_bias", True) or cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError("Hugging Face config: only qkv_bias=True and hidden_act='gelu' are supported")
    return dict(
        img_size=cfg.get("image_size", 224),
        patch_size=cfg.get("patch_size", 16),
        in_chans=cfg.get("num_channels", 3),
        embed_dim=hidden,
        depth=cfg.get("num_hidden_layers", 12),
        num_heads=cfg.get("num_attention_heads", 12),
        decoder_embed_dim=dec_hidden,
        decoder_depth=cfg.get("decoder_num_hidden_layers", 8),
        decoder_num_heads=cfg.get("decoder_num_attention_heads", 16),
        mlp_ratio=mlp_ratio,
        norm_pix_loss=bool(cfg.get("norm_pix_loss", False)),
    )


# ----------------------------------------------------------------------------------------------------------
# loading into models


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int], num_extra_tokens: int = 1):
    """(1, extra + S*S, D) -> (1, extra + gh*gw, D): bicubic resize of the patch rows, extra rows kept.

    The reference's `interpolate_pos_embed` (square source grid, align_corners=False); here the target grid
    may be non-square.
    """
    extra, tokens = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    size = int(round(tokens.shape[1] ** 0.5))
    if size * size != tokens.shape[1]:
        raise ValueError(f"pos_embed with {tokens.shape[1]} patch rows is not a square grid; cannot resize")
    if (size, size) == tuple(grid_size):
        return pos_embed
    dtype = tokens.dtype
    tokens = tokens.reshape(1, size, size, -1).permute(0, 3, 1, 2).float()
    tokens = F.interpolate(tokens, size=tuple(grid_size), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2).to(dtype)
    return torch.cat([extra, tokens], dim=1)


def _few(keys: list[str], n: int = 6) -> str:
    return "[" + ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "") + "]"


def _source_state_dict(source: str | Path | Mapping) -> tuple[StateDict, str]:
    if isinstance(source, Mapping):
        return dict(source), "state dict"
    return load_state_dict_any(source), str(source)


def _check_shapes(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """One-line errors for shape mismatches (load_state_dict lists them all in one long message)."""
    own = model.state_dict()
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.shape[1] != own["patch_embed.proj.weight"].shape[1]:
        raise ValueError(
            f"{what} has {w.shape[1]} input channels, the model {own['patch_embed.proj.weight'].shape[1]} "
            "(set in_chans to match the checkpoint)"
        )
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(
                f"{what}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )


def load_encoder_into_vit(
    vit, source: str | Path | Mapping, verbose: bool = True, keep_head: bool = True
) -> tuple[list[str], list[str]]:
    """Initialise a VisionTransformer's encoder from an MAE run / checkpoint, a reference-release file (full
    or encoder-only), a timm state dict or file. Returns (missing, unexpected) keys.

    As the reference fine-tuning: a classifier head is loaded when its shape matches the model's (and
    keep_head), dropped otherwise; under global pooling the pretrained final `norm` is dropped and `fc_norm`
    starts fresh (unless the source has an `fc_norm`); a position table of another grid is resized
    bicubically.
    """
    sd, what = _source_state_dict(source)
    own = vit.state_dict()
    head_fits = keep_head and all(
        k in own and own[k].shape == v.shape for k, v in sd.items() if k.startswith("head.")
    )
    drop = (*_DECODER_PREFIXES,) if head_fits else (*_DECODER_PREFIXES, "head.")
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    if vit.global_pool and "fc_norm.weight" not in sd:
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    if "pos_embed" in sd:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], vit.patch_embed.grid_size)
    _check_shapes(vit, sd, what)
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    if verbose:
        print(f"loaded encoder from {what}: missing keys {_few(missing)}, unexpected keys {_few(unexpected)}")
    return list(missing), list(unexpected)


def load_mae_weights(mae_model, source: str | Path | Mapping) -> None:
    """Load full MAE weights (ours, a reference full file, a Hugging Face ViTMAE directory) with strict=True.

    The fixed sin-cos tables are functions of the grid: a source built for another image size keeps the
    model's own tables.
    """
    sd, what = _source_state_dict(source)
    own = mae_model.state_dict()
    for k in ("pos_embed", "decoder_pos_embed"):
        if k in sd and sd[k].shape != own[k].shape:
            log.info("%s: %s built for another grid; keeping the model's own sin-cos table", what, k)
            sd[k] = own[k]
    _check_shapes(mae_model, sd, what)
    missing, unexpected = mae_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        hint = " (an encoder-only file: use load_encoder_into_vit)" if missing and not unexpected else ""
        raise ValueError(
            f"{what} does not match the model: missing {_few(missing)}, unexpected {_few(unexpected)}{hint}"
        )
