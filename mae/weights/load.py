"""`model.init`: any weights source into a task's model (a MaskedAutoencoder, a classifier, a segmenter), with
the rules of what a task may start fresh and what must match."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from mae.config import ConfigError
from mae.weights.adapt import ArchitectureMismatch, load_weights

NEW_OR_DROPPED = ("head.", "fc_norm.", "norm.")  # the classifier's own parts; the rest must match
MAE_NEW = (
    "decoder",
    "mask_token",
    "norm.",
)  # what pretraining may start fresh: the decoder, a classifier's norm


def init_from_config(model: nn.Module, cfg: DictConfig, log=print, keep_head: bool = True) -> None:
    """A task's `model.init` (Task.init_weights, a fresh start only): load_init with the config's source and
    its `model.pos_embed_adapt`."""
    load_init(model, cfg.model.init, log, keep_head, pos_embed=cfg.model.pos_embed_adapt)


def load_init(
    model: nn.Module, source: str, log=print, keep_head: bool = True, pos_embed: str = "recompute"
) -> tuple[list[str], list[str]]:
    """Load `model.init` into the model: a MaskedAutoencoder (pretraining: the encoder, and the decoder when
    the source has one) or a ViT (transfer: the encoder; a classifier head of the model's shape is kept with
    keep_head). Every source kind of mae.weights.formats, adapted to the model's channels, patch and image size
    (mae.weights.adapt, one line per adaptation; `pos_embed`: model.pos_embed_adapt, how the position table
    follows another patch grid). Returns and prints (missing, unexpected) keys; what may be missing is
    the task's own new parts (the head and fc_norm of a classifier, the decoder of a MAE), anything else
    (another depth, say) is an error, as is a size that cannot be adapted (exit 2)."""
    if not source:
        log("model.init is empty: random initialisation (training from scratch)")
        return [], []
    if not os.path.exists(source):
        raise ConfigError(f"model.init={source!r}: no such file or directory")
    try:
        result = load_weights(model, source, keep_head=keep_head, pos_embed=pos_embed)
    except ConfigError:
        raise
    except ArchitectureMismatch as e:
        raise ConfigError(f"model.init={source!r}: {e}") from e
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.init={source!r} cannot be loaded into {type(model).__name__}: {first}"
        ) from e
    missing, unexpected = result.missing, result.unexpected
    new = MAE_NEW if hasattr(model, "decoder_pred") else getattr(model, "new_prefixes", NEW_OR_DROPPED)
    stray = [k for k in missing if not k.startswith(new)] + unexpected
    if stray:
        what = "lacks" if stray[0] in missing else "has extra"
        more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
        raise ConfigError(
            f"model.init={source!r} {what} encoder weights {', '.join(stray[:3])}{more}: "
            "set model.name / depth / embed_dim / patch_size to the checkpoint's"
        )
    log(f"initialised from {source}")
    for note in result.notes:
        log(f"  {note}")
    if keep_head and isinstance(getattr(model, "head", None), nn.Linear) and "head.weight" not in missing:
        log(f"  classifier head kept from {source} (its {model.head.out_features} classes match)")
    if keep_head and hasattr(model, "decode_head") and "decode_head.conv_seg.weight" not in missing:
        log(f"  segmentation head kept from {source} (its {model.seg_classes} classes match)")
    log(f"  missing keys (newly initialised): {_listing(missing)}")
    log(f"  unexpected keys (ignored): {_listing(unexpected)}")
    return list(missing), list(unexpected)


def _listing(keys: list[str], n: int = 8) -> str:
    """Keys for a log line: all of a short list; the first few and a count of a long one (a fresh decoder)."""
    if len(keys) <= n:
        return ", ".join(keys) or "none"
    return f"{', '.join(keys[:n])} and {len(keys) - n} more"


# ----------------------------------------------------------------------------------------------------------
# library helpers


def load_encoder_into_vit(
    vit, source: str | Path | Mapping, verbose: bool = True, keep_head: bool = True
) -> tuple[list[str], list[str]]:
    """Initialise a VisionTransformer's encoder from any source (mae.weights.adapt.load_weights): a run / checkpoint,
    a reference-release file (full or encoder-only), a timm or Hugging Face source, a state dict. Returns
    (missing, unexpected) keys; the adaptation notes are printed when `verbose`."""
    result = load_weights(vit, source, keep_head=keep_head)
    if verbose:
        for note in result.notes:
            print(note)
    return result.missing, result.unexpected


def load_mae_weights(mae_model, source: str | Path | Mapping) -> None:
    """Load full MAE weights (ours, a reference full file, a Hugging Face ViTMAE directory): every key of the
    model must come from the source (an encoder-only source is an error here; mae.weights.adapt.load_weights starts
    its decoder fresh). The fixed sin-cos tables are functions of the grid: another image size gets its own."""
    result = load_weights(mae_model, source)
    if result.missing or result.unexpected:
        hint = " (an encoder-only file: use load_encoder_into_vit)" if result.missing else ""
        raise ValueError(
            f"{result.what} does not match the model: missing {_few(result.missing)}, "
            f"unexpected {_few(result.unexpected)}{hint}"
        )


def _few(keys: list[str], n: int = 6) -> str:
    return "[" + ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "") + "]"
