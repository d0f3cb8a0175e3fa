"""Build models from a config, and reopen a finished run's model (viz, export, transfer)."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from mae.config import ConfigError
from mae.runs.record import checkpoint_config, resolve_checkpoint


def default_patch_size(name: str) -> int:
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else 16


def model_overrides(cfg: DictConfig, for_mae: bool = True) -> dict:
    """Registry overrides from the `model:` section; 0 means "the registry's default"."""
    m = cfg.model
    patch = m.patch_size or default_patch_size(m.name)
    if m.img_size % patch:
        raise ConfigError(f"model.img_size={m.img_size} is not divisible by the patch size {patch}")
    check_norm(cfg)
    kw = {"img_size": m.img_size, "in_chans": m.in_chans, "attn_backend": m.attn_backend}
    for k in ("patch_size", "embed_dim", "depth", "num_heads"):
        if m[k]:
            kw[k] = m[k]
    if for_mae:
        kw["norm_pix_loss"] = m.norm_pix_loss
        if m.drop_path:
            kw["drop_path_rate"] = m.drop_path
        for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            if m[k]:
                kw[k] = m[k]
    if m.grad_checkpointing:
        kw["grad_checkpointing"] = True
    return kw


def check_norm(cfg: DictConfig) -> None:
    """data.mean / data.std against model.in_chans (mae.data.transforms.resolve_norm: one value per channel,
    one value broadcast, ImageNet's three averaged for one channel), before any model or data is built."""
    from mae.data import DataError
    from mae.data.transforms import resolve_norm

    try:
        resolve_norm(cfg.data.mean, cfg.data.std, cfg.model.in_chans)
    except DataError as e:
        raise ConfigError(str(e)) from None


def build_mae(cfg: DictConfig):
    from mae.models import create_mae, list_models

    name = cfg.model.name
    if name not in list_models() or not name.startswith("mae_"):
        known = ", ".join(n for n in list_models() if n.startswith("mae_"))
        raise ConfigError(f"model.name={name!r} is not an MAE model; known: {known}")
    return create_mae(name, **model_overrides(cfg))


def vit_name(name: str) -> str:
    """`mae_vit_base_patch16` -> `vit_base_patch16` (a pretraining recipe's encoder as a classifier)."""
    return name[4:] if name.startswith("mae_") else name


def build_vit(cfg: DictConfig, num_classes: int):
    from mae.models import create_vit, list_models

    name = vit_name(cfg.model.name)
    if name not in list_models():
        known = ", ".join(n for n in list_models() if n.startswith("vit_"))
        raise ConfigError(f"model.name={cfg.model.name!r} is not a ViT; known: {known}")
    kw = model_overrides(cfg, for_mae=False)
    return create_vit(
        name,
        num_classes=num_classes,
        global_pool=cfg.model.global_pool,
        drop_path_rate=cfg.model.drop_path,
        **kw,
    )


def build_segmenter(cfg: DictConfig, num_classes: int):
    """The segmentation model of a `segment` config: the encoder of `model.name` with the chosen head."""
    from mae.models import list_models
    from mae.models.segmentation import SegmentationViT

    name = vit_name(cfg.model.name)
    if name not in list_models():
        known = ", ".join(n for n in list_models() if n.startswith("vit_"))
        raise ConfigError(f"model.name={cfg.model.name!r} is not a ViT; known: {known}")
    from mae.models import model_config

    kw = {**model_config(name), **model_overrides(cfg, for_mae=False)}
    m = cfg.model
    if m.seg_channels < 1 or m.aux_weight < 0:
        raise ConfigError(
            f"model.seg_channels must be >= 1 and model.aux_weight >= 0, got {m.seg_channels}, {m.aux_weight}"
        )
    if not all(isinstance(b, int) for b in m.seg_blocks):
        raise ConfigError(
            f"model.seg_blocks must be block numbers like [4, 6, 8, 12], got {list(m.seg_blocks)}"
        )
    try:
        return SegmentationViT(
            num_classes,
            head=m.seg_head,
            blocks=list(m.seg_blocks),
            channels=m.seg_channels,
            aux_weight=m.aux_weight,
            freeze_encoder=cfg.train.freeze_encoder,
            drop_path_rate=m.drop_path,
            **kw,
        )
    except ValueError as e:
        raise ConfigError(f"model.seg_blocks / model.seg_head: {e}") from None


def build_detector(cfg: DictConfig, num_classes: int):
    """The detection model of a `detect` config: Mask R-CNN on the ViTDet backbone of `model.name`."""
    from mae.models import list_models, model_config
    from mae.models.detection import MaskRCNNViT

    name = vit_name(cfg.model.name)
    if name not in list_models():
        known = ", ".join(n for n in list_models() if n.startswith("vit_"))
        raise ConfigError(f"model.name={cfg.model.name!r} is not a ViT; known: {known}")
    m = cfg.model
    kw = {**model_config(name), **model_overrides(cfg, for_mae=False)}
    if (
        m.fpn_channels < 1
        or m.roi_samples < 1
        or m.detections < 1
        or len(m.proposals) != 2
        or min(m.proposals) < 1
    ):
        raise ConfigError(
            "model.fpn_channels, model.roi_samples, model.detections and both model.proposals must be >= 1, got "
            f"{m.fpn_channels}, {m.roi_samples}, {m.detections}, {list(m.proposals)}"
        )
    if m.anchor_sizes and (len(m.anchor_sizes) != 5 or min(m.anchor_sizes) <= 0):
        raise ConfigError(
            f"model.anchor_sizes: one positive size per RPN level (5), got {list(m.anchor_sizes)}"
        )
    if m.window_size < 0:
        raise ConfigError(
            f"model.window_size must be >= 0 (0 = global attention everywhere), got {m.window_size}"
        )
    return MaskRCNNViT(
        num_classes, drop_path_rate=m.drop_path, window_size=m.window_size, channels=m.fpn_channels,
        anchor_sizes=tuple(m.anchor_sizes), proposals=tuple(m.proposals), roi_samples=m.roi_samples,
        detections=m.detections, **kw,
    )  # fmt: skip


def load_run_model(path: str | Path):
    """(MaskedAutoencoder in eval mode with the run's latest weights, the run's config)."""
    from safetensors.torch import load_file

    ck, _ = resolve_checkpoint(path)
    cfg = checkpoint_config(ck)  # what these weights were trained with
    model = build_mae(cfg)
    model.load_state_dict(load_file(str(ck / "model.safetensors")), strict=True)
    return model.eval(), cfg
