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
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from mae.runs.record import run_config_of

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_CONTAINER_KEYS = ("model", "state_dict", "model_state")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_DECODER_PREFIXES = ("decoder", "mask_token")  # MAE-only keys (ours and the reference's)


# ----------------------------------------------------------------------------------------------------------
# files and directories

# Weight files of a directory, in the order they are looked for: ours and timm's / Hugging Face's safetensors,
# Hugging Face's sharded indexes, the pickled `pytorch_model.bin`.
_DIR_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def resolve_weights_files(path: str | Path) -> list[Path]:
    """The weights file(s) behind `path`: a file itself; in a directory the first of `_DIR_FILES` (a sharded
    index gives its shards); in a training run directory (has `config.yaml`) the latest checkpoint's."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {p}")
    if p.is_file():
        return _shards(p) if p.name.endswith(".index.json") else [p]
    candidates = [p / name for name in _DIR_FILES]
    if (p / "config.yaml").exists():
        checkpoints = sorted(c for c in p.glob("checkpoint-*") if c.name != "checkpoint-last")
        candidates = [p / "checkpoint-last" / "model.safetensors"]
        candidates += [c / "model.safetensors" for c in reversed(checkpoints)] + [p / "model.safetensors"]
    for c in candidates:
        if c.is_file():
            return _shards(c) if c.name.endswith(".index.json") else [c]
    raise FileNotFoundError(
        f"no weights in {p}: looked for {', '.join(str(c.relative_to(p)) for c in candidates)}"
    )


def resolve_weights_file(path: str | Path) -> Path:
    """The first weights file behind `path` (see resolve_weights_files)."""
    return resolve_weights_files(path)[0]


def _shards(index: Path) -> list[Path]:
    """The shard files a Hugging Face `*.index.json` names (its `weight_map`), in order."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a sharded-weights index (no weight_map): {e}") from None
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shard {missing[0].name}, which is not there")
    return files


def _torch_load(path: Path) -> object:
    """torch.load with weights_only=True; argparse.Namespace is allowed (the reference's checkpoints hold one). A
    file that is not a checkpoint of tensors and plain data is a ValueError saying so in one line: its objects are
    never loaded (torch's own advice, to load it unsafely, would run code from the file)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not head.startswith((b"PK", b"\x80")):  # a zip archive (torch.save) or a pickle (the legacy format)
        what = "an empty file" if not head else "neither a zip archive nor a pickle"
        raise ValueError(f"{path} is not a weights file (not a PyTorch checkpoint: {what})")
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it all
            if safe_globals is None:
                return torch.load(path, map_location="cpu", weights_only=True)
            with safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = next((ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in str(e).splitlines()
                        if "WeightsUnpickler error:" in ln), None)  # fmt: skip
        if refused is not None or "Weights only load failed" in str(e):
            what = refused.split(" was not an allowed")[0].split(". ")[0].rstrip(".") if refused else ""
            raise ValueError(
                f"{path} is not a weights file: it holds more than tensors and plain data"
                + (f" ({what})" if what else "")
                + "; refused, never loaded (loading it could run code from the file)"
            ) from None
        raise ValueError(f"{path} is not a weights file (an unreadable pickle: {_first_line(e)})") from None
    except Exception as e:
        why = _first_line(e).split(". ")[0]  # torch's first sentence; the rest is its speculation
        raise ValueError(f"{path} cannot be read as a PyTorch checkpoint (cut short?): {why}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0].rstrip(":") if lines else type(e).__name__


def _unwrap(obj: object, path: Path) -> StateDict:
    """The state dict inside `{'model': ...}`-style containers; DDP / compile prefixes removed."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ValueError(
                f"{path} holds no model weights (top-level keys: {', '.join(map(str, list(obj)[:8]))})"
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


def _read_file(file: Path) -> StateDict:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"cannot read {file} as safetensors (cut short or not weights?): {first}"
            ) from None
    if file.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return _unwrap(_torch_load(file), file)
    raise ValueError(f"unsupported weights file {file}: expected .safetensors, .pth, .pt or .bin")


def load_state_dict_any(path: str | Path) -> StateDict:
    """A state dict with our (= the reference's = timm's) key names from any supported source.

    `path`: a `.safetensors` / `.pth` / `.pt` / `.bin` file; a directory holding `model.safetensors` (or
    Hugging Face's `pytorch_model.bin`, or sharded weights with their index); a training run directory (its
    latest checkpoint); or a Hugging Face ViTMAE directory (converted). A Hugging Face directory of another
    model type is refused.
    """
    hf_type = _hf_model_type(path)
    if hf_type not in (None, "vit_mae"):
        raise ValueError(
            f"{path} is a Hugging Face {hf_type!r} model directory; Hugging Face weights are read from ViTMAE "
            "('vit_mae') directories"
        )
    sd: StateDict = {}
    for file in resolve_weights_files(path):
        sd.update(_read_file(file))
    if not sd:
        raise ValueError(f"{path} holds no tensors")
    return hf_to_mae_state_dict(sd) if is_hf_vitmae_state_dict(sd) else probe_encoder(sd)


def probe_encoder(sd: StateDict) -> StateDict:
    """A linear-probe run (mae/linprobe.py) keeps its frozen ViT under `encoder.` beside its own `head.*`:
    the encoder's keys lose the prefix, so the probe's encoder loads as any other (the head is the probe's)."""
    if "patch_embed.proj.weight" in sd or "encoder.patch_embed.proj.weight" not in sd:
        return sd
    return {k.removeprefix("encoder."): v for k, v in sd.items()}


def _hf_model_type(path: str | Path) -> str | None:
    """The `model_type` of a Hugging Face `config.json` beside `path` (None when there is none)."""
    p = Path(path)
    config = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not config.is_file():
        return None
    try:
        cfg = json.loads(config.read_text())
    except ValueError:
        return None
    return cfg.get("model_type") if isinstance(cfg, dict) else None


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
# what a source records about its architecture


def read_recorded(source: str | Path) -> tuple[dict | None, dict]:
    """(architecture, extras) that a source records beside its weights: a run's config.yaml, a Hugging Face
    ViTMAE config.json, or the config.json of our `--to mae` / `--to timm` exports. The architecture is given as
    MaskedAutoencoder arguments (img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio and, for
    full models, the decoder's); None for a bare file. Extras: mask_ratio, mean, std and the evaluation's
    crop_pct (data.crop_pct as the run set it: 0 = the reference's rule) where recorded."""
    src = Path(source)
    extras = dict(mask_ratio=0.75, mean=None, std=None, crop_pct=None)
    hf_cfg, run_cfg = read_hf_config(src), run_config_of(src)
    own_cfg = src / "config.json" if src.is_dir() else src.parent / "config.json"
    if hf_cfg is not None:
        extras.update(mask_ratio=hf_cfg.get("mask_ratio", 0.75), **_hf_preprocessor_norm(own_cfg.parent))
        return mae_args_from_hf_config(hf_cfg), extras
    if run_cfg is not None:
        if "model" not in run_cfg or "name" not in run_cfg.model:
            return None, extras
        from mae.models import model_config
        from mae.weights.build import model_overrides

        name = run_cfg.model.name
        args = {**model_config(name), **model_overrides(run_cfg, for_mae=name.startswith("mae_"))}
        for runtime_only in ("attn_backend", "grad_checkpointing", "drop_path_rate"):
            args.pop(runtime_only, None)
        if "data" in run_cfg:
            extras.update(mean=list(run_cfg.data.mean), std=list(run_cfg.data.std))
            extras.update(crop_pct=float(run_cfg.data.get("crop_pct", 0.0)))
        extras.update(mask_ratio=run_cfg.model.get("mask_ratio", 0.75))
        return args, extras
    if not own_cfg.is_file():
        return None, extras
    try:
        cfg = json.loads(own_cfg.read_text())
    except ValueError:
        return None, extras
    if "mae_model_args" in cfg:
        extras.update({k: cfg[k] for k in ("mask_ratio", "mean", "std", "crop_pct") if k in cfg})
        return dict(cfg["mae_model_args"]), extras
    if "architecture" in cfg:  # a timm directory: our export (model_args) or timm's own config.json
        pre = cfg.get("pretrained_cfg") or {}
        extras.update(mean=pre.get("mean"), std=pre.get("std"), crop_pct=pre.get("crop_pct"))
        return _timm_arch(cfg["architecture"], cfg.get("model_args") or {}), extras
    return None, extras


def _hf_preprocessor_norm(directory: Path) -> dict:
    """mean / std of a Hugging Face image processor's `preprocessor_config.json` beside the weights, if any."""
    path = directory / "preprocessor_config.json"
    try:
        cfg = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        cfg = {}
    if not isinstance(cfg, dict) or cfg.get("image_mean") is None or cfg.get("image_std") is None:
        return {}
    return dict(mean=list(cfg["image_mean"]), std=list(cfg["image_std"]))


def _timm_arch(architecture: str, model_args: dict) -> dict | None:
    """The sizes of a timm VisionTransformer, built on the meta device (no memory, no weights)."""
    import timm

    kw = {k: v for k, v in model_args.items() if k != "global_pool"}
    try:
        with torch.device("meta"):
            m = timm.create_model(architecture, pretrained=False, num_classes=0, **kw)
    except Exception:
        return None
    if not hasattr(m, "blocks") or not hasattr(m, "patch_embed"):
        return None
    return dict(
        img_size=tuple(m.patch_embed.img_size),
        patch_size=tuple(m.patch_embed.patch_size),
        in_chans=m.patch_embed.proj.in_channels,
        embed_dim=m.embed_dim,
        depth=len(m.blocks),
        num_heads=m.blocks[0].attn.num_heads,
        mlp_ratio=m.blocks[0].mlp.fc1.out_features / m.embed_dim,
    )
