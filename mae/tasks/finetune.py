"""Fine-tuning: a ViT classifier initialised from MAE weights (or from scratch), trained end to end, as the
reference fine-tuning: layer-wise lr decay, drop path, Mixup/CutMix with soft-target cross-entropy, label
smoothing, RandAugment and random erasing (all timm), global average pooling or the cls token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mae.config import COMMON_KEYS, ConfigError
from mae.tasks import classify

if TYPE_CHECKING:
    from accelerate import Accelerator
    from omegaconf import DictConfig

    from mae.train.engine import Task

READS = COMMON_KEYS | {
    "model.drop_path", "model.global_pool", "model.num_classes", "model.grad_checkpointing",
    "data.auto_augment", "data.reprob", "train.layer_decay", "train.fsdp", "train.smoothing", "train.mixup",
    "train.cutmix", "train.eval_every",
}  # fmt: skip
VAL_LABELS = ("evaluation", None)  # data.val's labels: top-1 / top-5
AUGMENT = "finetune"


def classification_loss(cfg: DictConfig, num_classes: int):
    """(logits-producing model, images, labels) -> loss: Mixup/CutMix + soft-target CE when either is on
    (label smoothing folded into the soft targets), else CE with label smoothing."""
    import torch.nn.functional as F

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


def train_loader(cfg: DictConfig, rank: int, world_size: int):
    return classify.train_loader(cfg, AUGMENT, rank, world_size)


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    from mae.train.checkpoint import best_keeper
    from mae.train.engine import Task
    from mae.train.optim import vit_layer_decay_groups
    from mae.weights.load import init_from_config

    log = print if acc.is_main_process else (lambda *a, **k: None)
    loader, num_classes, _, model = classify.build_classifier(cfg, acc, AUGMENT)
    loss = classification_loss(cfg, num_classes)
    return Task(
        model=model.to(acc.device),
        groups=vit_layer_decay_groups(model, cfg.train.weight_decay, cfg.train.layer_decay),
        loader=loader,
        loss_fn=lambda m, images, labels, step, micro: loss(m, images, labels),
        init_weights=lambda: init_from_config(model, cfg, log),
        evaluate=classify.val_evaluator(cfg, acc),
        on_eval=best_keeper(cfg, acc, log),
        record=classify.found(cfg, num_classes),
    )
