"""Fine-tuning: a ViT classifier initialised from MAE weights (or from scratch), trained end to end.

    accelerate launch mae/finetune.py recipe=finetune_vit_base model.init=runs/vit_base data.val=...
    python mae/finetune.py recipe=finetune_demo model.init=runs/demo     # Fashion-MNIST, minutes on a CPU

As the reference fine-tuning (facebookresearch/mae main_finetune.py): layer-wise lr decay, drop path,
Mixup/CutMix with soft-target cross-entropy, label smoothing, RandAugment and random erasing (all timm),
global average pooling or the cls token. Top-1/top-5 on data.val every train.eval_every epochs; the
best model so far is kept in output_dir/checkpoint-best/. Every key is in recipes/base.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not its siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from mae.cli import exit_if_help  # noqa: E402

if __name__ == "__main__":  # --help answers before torch is imported
    exit_if_help("finetune", __doc__, sys.argv[1:])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mae.build import build_vit  # noqa: E402
from mae.config import ConfigError  # noqa: E402
from mae.data import build_train_loader  # noqa: E402
from mae.engine import Task, run_entry, seed_everything  # noqa: E402
from mae.transfer import (  # noqa: E402
    best_keeper,
    init_encoder,
    layer_decay_groups,
    num_classes_of,
    val_evaluator,
)

# ----------------------------------------------------------------------------- fine-tuning


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
