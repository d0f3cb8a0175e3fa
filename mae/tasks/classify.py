"""What fine-tuning and linear probing share: the training loader, the number of classes and the top-1 /
top-5 evaluator on data.val."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae.config import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from omegaconf import DictConfig


def data_kw(cfg: DictConfig) -> dict:
    return dict(img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, batch_size=cfg.train.batch_size)


def train_loader(cfg: DictConfig, augment: str, rank: int, world_size: int):
    from mae.data import build_train_loader

    return build_train_loader(cfg.data, source=cfg.data.train, augment=augment, seed=cfg.seed, rank=rank,
                              world_size=world_size, **data_kw(cfg))  # fmt: skip


def build_classifier(cfg: DictConfig, acc: Accelerator, augment: str, wrap=None):
    """(training loader, number of classes, the ViT classifier, the model trained: `wrap(vit, num_classes)` or
    the ViT itself). Every rank builds the same initial weights; the rank's own seeds come after."""
    import torch

    from mae.train.engine import seed_everything
    from mae.weights.build import build_vit

    loader = train_loader(cfg, augment, acc.process_index, acc.num_processes)
    num_classes = num_classes_of(cfg, loader)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    vit = build_vit(cfg, num_classes)
    model = wrap(vit, num_classes) if wrap is not None else vit
    seed_everything(cfg.seed, acc.process_index)
    return loader, num_classes, vit, model


def num_classes_of(cfg: DictConfig, loader) -> int:
    n = cfg.model.num_classes or loader.num_classes
    if n < 1:
        raise ConfigError(
            f"data.train={cfg.data.train!r} has no labels; give labelled data or set model.num_classes"
        )
    return n


def found(cfg: DictConfig, num_classes: int) -> dict:
    """model.num_classes=0 takes the count from the data: recorded as the run's own, checked on resume."""
    return {} if cfg.model.num_classes else {"model.num_classes": num_classes}


def val_evaluator(cfg: DictConfig, acc: Accelerator):
    """(model, step) -> {top1, top5, val_loss} over all of data.val, each rank scoring its own part (in
    lockstep when the model is sharded)."""
    import torch

    from mae.data import build_eval_loader
    from mae.eval.metrics import classifier_accuracy, in_lockstep
    from mae.train.fsdp import is_sharded
    from mae.train.runtime import Interrupted, Watch

    if not cfg.data.val:
        return None
    kw = data_kw(cfg)
    loader = build_eval_loader(
        cfg.data, source=cfg.data.val, rank=acc.process_index, world_size=acc.num_processes, **kw
    )
    shape = (kw["in_chans"], kw["img_size"], kw["img_size"])

    def any_rank(flag: bool) -> bool:
        return acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0

    def evaluate(model, step: int) -> dict:
        watch = Watch(loader)  # a stop signal ends it early; every rank then raises Interrupted together
        batches = in_lockstep(watch, any_rank, shape) if is_sharded(model) else watch
        scores = classifier_accuracy(
            model, batches, acc.device, acc.autocast, lambda t: acc.reduce(t, reduction="sum")
        )
        if any_rank(watch.stopped):
            raise Interrupted
        return scores

    return evaluate
