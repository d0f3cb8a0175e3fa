"""Fine-tuning: a ViT classifier initialised from MAE weights (or from scratch), trained end to end.

    accelerate launch mae/finetune.py recipe=finetune_vit_base model.init=runs/vit_base data.val=...
    python mae/finetune.py recipe=finetune_demo model.init=runs/demo     # Fashion-MNIST, minutes on a CPU

As the reference fine-tuning (facebookresearch/mae main_finetune.py): layer-wise lr decay, drop path,
Mixup/CutMix with soft-target cross-entropy, label smoothing, RandAugment and random erasing (all timm),
global average pooling or the cls token. Top-1/top-5 on data.val every train.eval_every epochs; the
best model so far is kept in output_dir/checkpoint-best/. Every key is in recipes/base.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not its siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from mae.build import build_vit  # noqa: E402
from mae.checkpoint import latest_checkpoint  # noqa: E402
from mae.config import ConfigError  # noqa: E402
from mae.data import build_eval_loader, build_train_loader  # noqa: E402
from mae.engine import Task, run_entry, seed_everything  # noqa: E402
from mae.evaluation import classifier_accuracy  # noqa: E402
from mae.models import layer_id  # noqa: E402
from mae.optim import param_groups  # noqa: E402

BEST = "checkpoint-best"
NEW_OR_DROPPED = ("head.", "fc_norm.", "norm.")  # the classifier's own parts; the rest must match


# ----------------------------------------------------------------------------- shared with linprobe


def load_init(model: nn.Module, source: str, log=print) -> tuple[list[str], list[str]]:
    """Load `model.init` (a run dir, a checkpoint dir, a reference `.pth`, a timm file) into the ViT's
    encoder; position tables are interpolated (bicubic) when the patch grid differs. Returns and prints
    (missing, unexpected) keys; the head (and fc_norm under global pooling) is expected to be missing, and
    any other missing or unexpected key (another depth, say) is an error."""
    if not source:
        log("model.init is empty: random initialisation (training from scratch)")
        return [], []
    if not os.path.exists(source):
        raise ConfigError(f"model.init={source!r}: no such file or directory")
    from mae.weights import load_encoder_into_vit

    try:
        missing, unexpected = load_encoder_into_vit(model, source, verbose=False)
    except ConfigError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.init={source!r} cannot be loaded into {type(model).__name__}: {first}"
        ) from e
    stray = [k for k in (*missing, *unexpected) if not k.startswith(NEW_OR_DROPPED)]
    if stray:
        what = "lacks" if stray[0] in missing else "has extra"
        more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
        raise ConfigError(
            f"model.init={source!r} {what} encoder weights {', '.join(stray[:3])}{more}: "
            "set model.name / depth / embed_dim / patch_size to the checkpoint's"
        )
    log(f"initialised from {source}")
    log(f"  missing keys (newly initialised): {', '.join(missing) or 'none'}")
    log(f"  unexpected keys (ignored): {', '.join(unexpected) or 'none'}")
    return list(missing), list(unexpected)


def init_encoder(model: nn.Module, cfg: DictConfig, log=print) -> None:
    """load_init(model.init), unless this run resumes: its checkpoint holds the weights (and model.init may
    have moved since)."""
    if cfg.checkpoint.resume and latest_checkpoint(cfg.output_dir) is not None:
        log(f"resuming in {cfg.output_dir}: weights come from its checkpoint, model.init is not read")
        return
    load_init(model, cfg.model.init, log)


def num_classes_of(cfg: DictConfig, loader) -> int:
    n = cfg.model.num_classes or loader.num_classes
    if n < 1:
        raise ConfigError(
            f"data.train={cfg.data.train!r} has no labels; give labelled data or set model.num_classes"
        )
    return n


def val_evaluator(cfg: DictConfig, acc: Accelerator, data_kw: dict):
    """(model, step) -> {top1, top5, val_loss} over all of data.val, each rank scoring its own part."""
    if not cfg.data.val:
        return None
    loader = build_eval_loader(
        cfg.data, source=cfg.data.val, rank=acc.process_index, world_size=acc.num_processes, **data_kw
    )

    def evaluate(model: nn.Module, step: int) -> dict:
        return classifier_accuracy(
            model, loader, acc.device, acc.autocast, lambda t: acc.reduce(t, reduction="sum")
        )

    return evaluate


def best_keeper(cfg: DictConfig, acc: Accelerator, log=print):
    """on_eval hook: the weights with the highest top-1 so far go to output_dir/checkpoint-best/
    (written to a temp dir, then renamed; the best score so far is read back on resume)."""
    out = Path(cfg.output_dir)
    meta_path = out / BEST / "meta.json"
    if acc.is_main_process and not (out / BEST).exists() and (out / f"{BEST}.old").is_dir():
        os.replace(out / f"{BEST}.old", out / BEST)  # a kill landed between the two renames of save_best
    best = {"top1": json.loads(meta_path.read_text())["top1"] if meta_path.is_file() else float("-inf")}

    def on_eval(model: nn.Module, metrics: dict, step: int) -> None:
        if metrics["top1"] <= best["top1"]:
            return
        best["top1"] = metrics["top1"]
        if acc.is_main_process:
            save_best(out, model, {"step": step, "task": cfg.task, **metrics})
            log(f"new best top-1 {metrics['top1']:.2f}% at step {step}: {out / BEST}")

    return on_eval


def save_best(out: Path, model: nn.Module, meta: dict) -> Path:
    tmp, final = out / f"{BEST}.tmp", out / BEST
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "meta.json").write_text(json.dumps(meta))
    old = out / f"{BEST}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- fine-tuning


def layer_decay_groups(model: nn.Module, cfg: DictConfig) -> list[dict]:
    """BEiT layer-wise lr decay: lr_scale = layer_decay ** (depth + 1 - layer), embeddings layer 0,
    block i layer i + 1, head and final norms layer depth + 1 (scale 1)."""
    depth = len(model.blocks)
    return param_groups(
        model,
        cfg.train.weight_decay,
        layer_decay=cfg.train.layer_decay,
        layer_id=partial(layer_id, depth=depth),
        num_layers=depth + 1,
    )


def classification_loss(cfg: DictConfig, num_classes: int):
    """(logits-producing model, images, labels) -> loss: Mixup/CutMix + soft-target CE when either is on
    (label smoothing folded into the soft targets), else CE with label smoothing."""
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        if t.batch_size % 2:
            raise ConfigError(f"train.mixup / train.cutmix need an even train.batch_size, got {t.batch_size}")
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(
            mixup_alpha=t.mixup,
            cutmix_alpha=t.cutmix,
            prob=1.0,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=t.smoothing,
            num_classes=num_classes,
        )
        soft_ce = SoftTargetCrossEntropy()

        def mixed(model, images, labels):
            if images.shape[0] < 2:  # a batch left with one good sample has nothing to mix with
                return F.cross_entropy(model(images).float(), labels, label_smoothing=t.smoothing)
            n = images.shape[0] - images.shape[0] % 2  # batch mixing pairs sample i with N-1-i
            images, targets = mixup(images[:n], labels[:n])
            return soft_ce(model(images).float(), targets)

        return mixed

    def plain(model, images, labels):
        return F.cross_entropy(model(images).float(), labels, label_smoothing=t.smoothing)

    return plain


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    log = print if acc.is_main_process else (lambda *a, **k: None)
    data_kw = dict(img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, batch_size=cfg.train.batch_size)
    loader = build_train_loader(
        cfg.data,
        source=cfg.data.train,
        augment="finetune",
        seed=cfg.seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        **data_kw,
    )
    num_classes = num_classes_of(cfg, loader)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_vit(cfg, num_classes)
    init_encoder(model, cfg, log)
    seed_everything(cfg.seed, acc.process_index)
    loss = classification_loss(cfg, num_classes)
    return Task(
        model=model.to(acc.device),
        groups=layer_decay_groups(model, cfg),
        loader=loader,
        loss_fn=lambda m, images, labels, step, micro: loss(m, images, labels),
        evaluate=val_evaluator(cfg, acc, data_kw),
        on_eval=best_keeper(cfg, acc, log),
    )


def main(argv: list[str] | None = None) -> int:
    return run_entry("finetune", argv, build_task)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
