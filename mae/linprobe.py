"""Linear probing: a frozen MAE encoder, BatchNorm (no affine) + a linear classifier on the cls token.

    accelerate launch mae/linprobe.py recipe=linprobe_vit_base model.init=runs/vit_base data.val=...
    python mae/linprobe.py recipe=linprobe_demo model.init=runs/demo     # Fashion-MNIST, minutes on a CPU

As the reference (facebookresearch/mae main_linprobe.py): the encoder gets no gradients and stays in eval
mode; the head is BatchNorm1d(D, affine=False, eps=1e-6) followed by Linear (trunc-normal, std 0.01),
trained with LARS; RandomResizedCrop + flip. Top-1/top-5 on data.val every train.eval_every epochs, best
weights in output_dir/checkpoint-best/. Every key is in recipes/base.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not its siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from mae.cli import exit_if_help  # noqa: E402

if __name__ == "__main__":  # --help answers before torch is imported
    exit_if_help("linprobe", __doc__, sys.argv[1:])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from timm.layers import trunc_normal_  # noqa: E402
from torch import nn  # noqa: E402

from mae.build import build_vit  # noqa: E402
from mae.data import build_train_loader  # noqa: E402
from mae.engine import Task, run_entry, seed_everything  # noqa: E402
from mae.optim import param_groups  # noqa: E402
from mae.transfer import best_keeper, init_encoder, num_classes_of, val_evaluator  # noqa: E402


class LinearProbe(nn.Module):
    """Frozen ViT encoder + BatchNorm1d(affine=False) + Linear on its pooled feature (the cls token after
    the final norm unless model.global_pool).

    The encoder never receives gradients and stays in eval mode whatever `train()` is called with, so
    nothing in it changes; only the head's weights and its BatchNorm statistics are learned.
    """

    def __init__(self, vit: nn.Module, num_classes: int) -> None:
        super().__init__()
        dim = vit.embed_dim
        vit.head = nn.Identity()
        self.encoder = vit.requires_grad_(False).eval()
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D), without building a graph through the encoder."""
        with torch.no_grad():
            return self.encoder.forward_head(self.encoder.forward_features(imgs), pre_logits=True)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.head(self.features(imgs).float())


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    log = print if acc.is_main_process else (lambda *a, **k: None)
    data_kw = dict(img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, batch_size=cfg.train.batch_size)
    loader = build_train_loader(
        cfg.data,
        source=cfg.data.train,
        augment="linprobe",
        seed=cfg.seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        **data_kw,
    )
    num_classes = num_classes_of(cfg, loader)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    vit = build_vit(cfg, num_classes)
    init_encoder(vit, cfg, log, keep_head=False)  # the probe brings its own head
    model = LinearProbe(vit, num_classes)
    seed_everything(cfg.seed, acc.process_index)

    def loss_fn(m, images, labels, step: int, micro: int) -> torch.Tensor:
        return F.cross_entropy(m(images).float(), labels, label_smoothing=cfg.train.smoothing)

    return Task(
        model=model.to(acc.device),
        groups=param_groups(model, cfg.train.weight_decay),
        loader=loader,
        loss_fn=loss_fn,
        evaluate=val_evaluator(cfg, acc, data_kw),
        on_eval=best_keeper(cfg, acc, log),
    )


def main(argv: list[str] | None = None) -> int:
    return run_entry("linprobe", argv, build_task)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
