"""What fine-tuning and linear probing share: loading `model.init` into a ViT, the number of classes, the
top-1/top-5 evaluator on data.val and the keeper of `checkpoint-best/`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

from mae.checkpoint import latest_checkpoint
from mae.config import ConfigError
from mae.data import build_eval_loader
from mae.evaluation import classifier_accuracy, in_lockstep
from mae.fsdp import is_sharded, model_state

BEST = "checkpoint-best"
NEW_OR_DROPPED = ("head.", "fc_norm.", "norm.")  # the classifier's own parts; the rest must match
MAE_NEW = (
    "decoder",
    "mask_token",
    "norm.",
)  # what pretraining may start fresh: the decoder, a classifier's norm


def load_init(
    model: nn.Module, source: str, log=print, keep_head: bool = True
) -> tuple[list[str], list[str]]:
    """Load `model.init` into the model: a MaskedAutoencoder (pretraining: the encoder, and the decoder when
    the source has one) or a ViT (transfer: the encoder; a classifier head of the model's shape is kept with
    keep_head). Every source kind of mae.weights, adapted to the model's channels, patch and image size
    (mae.adapt, one line per adaptation). Returns and prints (missing, unexpected) keys; what may be missing is
    the task's own new parts (the head and fc_norm of a classifier, the decoder of a MAE), anything else
    (another depth, say) is an error, as is a size that cannot be adapted (exit 2)."""
    if not source:
        log("model.init is empty: random initialisation (training from scratch)")
        return [], []
    if not os.path.exists(source):
        raise ConfigError(f"model.init={source!r}: no such file or directory")
    from mae.adapt import ArchitectureMismatch, load_weights

    try:
        result = load_weights(model, source, keep_head=keep_head)
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


def init_encoder(model: nn.Module, cfg: DictConfig, log=print, keep_head: bool = True) -> None:
    """load_init(model.init), unless this run resumes: its checkpoint holds the weights (and model.init may
    have moved since)."""
    if cfg.checkpoint.resume and latest_checkpoint(cfg.output_dir) is not None:
        if cfg.model.init:
            log(f"resuming in {cfg.output_dir}: weights come from its checkpoint, model.init is not read")
        return
    load_init(model, cfg.model.init, log, keep_head)


def layer_decay_groups(model: nn.Module, cfg: DictConfig) -> list[dict]:
    """BEiT layer-wise lr decay: lr_scale = layer_decay ** (depth + 1 - layer), embeddings layer 0,
    block i layer i + 1, heads and final norms layer depth + 1 (scale 1). No decay on 1-d parameters, the
    cls token and the position table, as the reference fine-tuning."""
    from functools import partial

    from mae.models import layer_id
    from mae.optim import VIT_NO_DECAY, param_groups

    depth = len(model.blocks)
    return param_groups(
        model,
        cfg.train.weight_decay,
        layer_decay=cfg.train.layer_decay,
        layer_id=partial(layer_id, depth=depth),
        num_layers=depth + 1,
        no_decay_names=VIT_NO_DECAY,
    )


def num_classes_of(cfg: DictConfig, loader) -> int:
    n = cfg.model.num_classes or loader.num_classes
    if n < 1:
        raise ConfigError(
            f"data.train={cfg.data.train!r} has no labels; give labelled data or set model.num_classes"
        )
    return n


def val_evaluator(cfg: DictConfig, acc: Accelerator, data_kw: dict):
    """(model, step) -> {top1, top5, val_loss} over all of data.val, each rank scoring its own part (in
    lockstep when the model is sharded)."""
    if not cfg.data.val:
        return None
    loader = build_eval_loader(
        cfg.data, source=cfg.data.val, rank=acc.process_index, world_size=acc.num_processes, **data_kw
    )
    shape = (data_kw["in_chans"], data_kw["img_size"], data_kw["img_size"])

    def any_rank(flag: bool) -> bool:
        return acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0

    def evaluate(model: nn.Module, step: int) -> dict:
        batches = in_lockstep(loader, any_rank, shape) if is_sharded(model) else loader
        return classifier_accuracy(
            model, batches, acc.device, acc.autocast, lambda t: acc.reduce(t, reduction="sum")
        )

    return evaluate


def best_keeper(cfg: DictConfig, acc: Accelerator, log=print, metric: str = "top1", label: str = "top-1"):
    """on_eval hook: the weights with the highest `metric` so far (fine-tuning: top-1, segmentation: mIoU) go
    to output_dir/checkpoint-best/ (written to a temp dir, then renamed; the best score so far is read back on
    resume)."""
    out = Path(cfg.output_dir)
    meta_path = out / BEST / "meta.json"
    if acc.is_main_process and not (out / BEST).exists() and (out / f"{BEST}.old").is_dir():
        os.replace(out / f"{BEST}.old", out / BEST)  # a kill landed between the two renames of save_best
    best = {metric: json.loads(meta_path.read_text())[metric] if meta_path.is_file() else float("-inf")}

    def on_eval(model: nn.Module, metrics: dict, step: int) -> None:
        if metrics[metric] <= best[metric]:
            return
        best[metric] = metrics[metric]
        if acc.is_main_process or is_sharded(model):  # sharded: every rank gathers, rank 0 writes
            state = model_state(model)
        if acc.is_main_process:
            save_best(out, state, {"step": step, "task": cfg.task, **metrics})
            log(f"new best {label} {metrics[metric]:.2f}% at step {step}: {out / BEST}")

    return on_eval


def save_best(out: Path, state: dict, meta: dict) -> Path:
    """Write the weights `state` (model_state of the model) and `meta` to out/checkpoint-best/, atomically."""
    tmp, final = out / f"{BEST}.tmp", out / BEST
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "meta.json").write_text(json.dumps(meta))
    old = out / f"{BEST}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
