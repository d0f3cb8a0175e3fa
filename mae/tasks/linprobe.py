"""Linear probing: a frozen MAE encoder, BatchNorm (no affine) + a linear classifier on its pooled feature, as
the reference (facebookresearch/mae main_linprobe.py): the encoder gets no gradients and stays in eval mode;
LARS; RandomResizedCrop + flip."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae.config import COMMON_KEYS
from mae.tasks import classify

if TYPE_CHECKING:
    from accelerate import Accelerator
    from omegaconf import DictConfig

    from mae.train.engine import Task

READS = COMMON_KEYS | {"model.global_pool", "model.num_classes", "train.smoothing", "train.eval_every"}
VAL_LABELS = ("evaluation", None)  # data.val's labels: top-1 / top-5
AUGMENT = "linprobe"


def train_loader(cfg: DictConfig, rank: int, world_size: int):
    return classify.train_loader(cfg, AUGMENT, rank, world_size)


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    import torch.nn.functional as F

    from mae.models.probe import LinearProbe
    from mae.train.checkpoint import best_keeper
    from mae.train.engine import Task
    from mae.train.optim import param_groups
    from mae.weights.load import init_from_config

    log = print if acc.is_main_process else (lambda *a, **k: None)
    loader, num_classes, vit, model = classify.build_classifier(cfg, acc, AUGMENT, wrap=LinearProbe)

    def loss_fn(m, images, labels, step: int, micro: int):
        return F.cross_entropy(m(images).float(), labels, label_smoothing=cfg.train.smoothing)

    def init_weights() -> None:
        init_from_config(vit, cfg, log, keep_head=False)  # the probe brings its own head

    return Task(
        model=model.to(acc.device),
        groups=param_groups(model, cfg.train.weight_decay),
        loader=loader,
        loss_fn=loss_fn,
        init_weights=init_weights,
        evaluate=classify.val_evaluator(cfg, acc),
        on_eval=best_keeper(cfg, acc, log),
        record=classify.found(cfg, num_classes),
    )
