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
    import torch
    import torch.nn.functional as F

    from mae.models.probe import LinearProbe
    from mae.train.checkpoint import best_keeper
    from mae.train.engine import Task, seed_everything
    from mae.train.optim import param_groups
    from mae.weights.build import build_vit
    from mae.weights.load import load_init

    log = print if acc.is_main_process else (lambda *a, **k: None)
    loader = train_loader(cfg, acc.process_index, acc.num_processes)
    num_classes = classify.num_classes_of(cfg, loader)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    vit = build_vit(cfg, num_classes)
    model = LinearProbe(vit, num_classes)
    seed_everything(cfg.seed, acc.process_index)

    def loss_fn(m, images, labels, step: int, micro: int) -> torch.Tensor:
        return F.cross_entropy(m(images).float(), labels, label_smoothing=cfg.train.smoothing)

    return Task(
        model=model.to(acc.device),
        groups=param_groups(model, cfg.train.weight_decay),
        loader=loader,
        loss_fn=loss_fn,
        init_weights=lambda: load_init(
            vit, cfg.model.init, log, keep_head=False
        ),  # the probe has its own head
        evaluate=classify.val_evaluator(cfg, acc),
        on_eval=best_keeper(cfg, acc, log),
    )
