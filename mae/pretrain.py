"""MAE pretraining (He et al. 2022): a ViT encoder learns, without labels, by reconstructing the 75% of
each image's patches that it does not see; checkpoints, metrics and reconstruction figures go to output_dir.

    accelerate launch mae/pretrain.py recipe=vit_base data.train='shards/train-{000000..001023}.tar'
    python mae/pretrain.py recipe=demo                       # Fashion-MNIST, minutes on a laptop CPU
    python mae/pretrain.py recipe=demo model.init=runs/demo data.train=/data/my_images   # continue on yours

model.init starts from released or earlier weights (a run, a reference .pth, a Hugging Face ViTMAE
directory, a timm export): the decoder too when the source has one, adapted to the run's channels, image and
patch size; optimizer, schedule and step start fresh.

Every key is in recipes/base.yaml; re-running the same command in the same output_dir resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not its siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from mae.cli import exit_if_help  # noqa: E402

if __name__ == "__main__":  # --help answers before torch is imported
    exit_if_help("pretrain", __doc__, sys.argv[1:])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mae import trackers  # noqa: E402
from mae.build import build_mae  # noqa: E402
from mae.config import ConfigError  # noqa: E402
from mae.data import build_eval_loader, build_train_loader, train_split  # noqa: E402
from mae.engine import Task, run_entry, seed_everything  # noqa: E402
from mae.evaluation import extract_features, knn_top1, mean_patch_features  # noqa: E402
from mae.fsdp import enabled as fsdp_enabled  # noqa: E402
from mae.fsdp import is_sharded  # noqa: E402
from mae.optim import param_groups  # noqa: E402
from mae.transfer import init_encoder  # noqa: E402
from mae.viz import save_reconstructions  # noqa: E402


def masking_noise(images: torch.Tensor, num_patches: int, seed: int, rank: int, step: int, micro: int):
    """Per-sample masking noise (N, L), a pure function of (seed, rank, step, micro-step): a resumed run
    draws exactly the masks the uninterrupted run would have drawn.

    A Philox stream keyed by (seed, rank) and started at counter (step, micro) in its two high words: every
    (seed, rank, step, micro) of 64-bit values gets its own stream, whatever train.grad_accum is (the draws
    advance only the low words)."""
    bits = np.random.Philox(key=((seed & _M64) << 64) | rank, counter=(micro << 192) | (step << 128))
    noise = np.random.Generator(bits).random((images.shape[0], num_patches), dtype=np.float32)
    return torch.from_numpy(noise).to(images.device)


_M64 = (1 << 64) - 1


def knn_monitor(cfg: DictConfig, acc: Accelerator, data_kw: dict):
    """k-NN top-1 of the encoder's mean patch features: memory bank from labelled data.train, queries
    from data.val. Runs on rank 0 (small sets) while the other ranks wait; a sharded (FSDP) model's forward
    is collective, so there every rank extracts the same features and rank 0 scores them."""
    if cfg.log.knn_every_steps <= 0:
        return None
    if not cfg.data.val:
        raise ConfigError("log.knn_every_steps > 0 needs data.val (labelled held-out images)")
    single = dict(data_kw, rank=0, world_size=1)
    bank = build_eval_loader(
        cfg.data, source=train_split(cfg.data.train), max_samples=cfg.log.knn_train_samples, **single
    )
    queries = build_eval_loader(cfg.data, source=cfg.data.val, max_samples=cfg.log.knn_val_samples, **single)
    if bank.num_classes == 0:
        raise ConfigError(f"log.knn_every_steps > 0 needs labels in data.train ({cfg.data.train!r} has none)")

    def monitor(model, step: int) -> dict:
        result = {}
        if acc.is_main_process or is_sharded(model):
            model.eval()
            fn = mean_patch_features(model)
            train_f, train_y = extract_features(fn, bank, acc.device, acc.autocast)
            test_f, test_y = extract_features(fn, queries, acc.device, acc.autocast)
        if acc.is_main_process:
            result = {"knn_top1": knn_top1(train_f, train_y, test_f, test_y, k=cfg.log.knn_k)}
            print(f"k-NN top-1 at step {step}: {result['knn_top1']:.2f}%", flush=True)
        acc.wait_for_everyone()
        return result

    return monitor


def reconstruction_hook(cfg: DictConfig, acc: Accelerator, data_kw: dict):
    """At each checkpoint: the reconstruction figure of a fixed set of images with a fixed mask, written by
    rank 0. Sharded (FSDP), every rank runs the same forward (it is collective)."""
    if cfg.log.viz_images <= 0 or not (acc.is_main_process or fsdp_enabled(cfg, acc.num_processes)):
        return None
    source = cfg.data.val or cfg.data.train
    loader = build_eval_loader(
        cfg.data, source=source, max_samples=cfg.log.viz_images, **dict(data_kw, rank=0, world_size=1)
    )
    images = torch.cat([b[0] for b in loader])[: cfg.log.viz_images]
    out = Path(cfg.output_dir)

    def hook(model, ckpt_dir: Path, step: int) -> None:
        with acc.autocast():
            path = save_reconstructions(
                model,
                images,
                out / f"reconstruction-{step:08d}.png",
                cfg.data.mean,
                cfg.data.std,
                cfg.model.mask_ratio,
                write=acc.is_main_process,
            )
        if not acc.is_main_process:
            return
        (out / "reconstruction-last.png").write_bytes(path.read_bytes())
        trackers.log_image(acc, "reconstruction", path, step)

    return hook


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    log = print if acc.is_main_process else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_mae(cfg)
    init_encoder(model, cfg, log)  # model.init: before any data is read, so a bad source fails fast
    seed_everything(cfg.seed, acc.process_index)
    data_kw = dict(img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, batch_size=cfg.train.batch_size)
    loader = build_train_loader(
        cfg.data,
        source=cfg.data.train,
        augment="mae",
        seed=cfg.seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        **data_kw,
    )
    num_patches, rank = model.patch_embed.num_patches, acc.process_index

    def loss_fn(m, images, labels, step: int, micro: int) -> torch.Tensor:
        noise = masking_noise(images, num_patches, cfg.seed, rank, step, micro)
        loss, _, _ = m(images, mask_ratio=cfg.model.mask_ratio, noise=noise)
        return loss

    return Task(
        model=model.to(acc.device),
        groups=param_groups(model, cfg.train.weight_decay),
        loader=loader,
        loss_fn=loss_fn,
        monitor=knn_monitor(cfg, acc, dict(data_kw, batch_size=max(cfg.train.batch_size, 256))),
        monitor_every=cfg.log.knn_every_steps,
        on_checkpoint=reconstruction_hook(cfg, acc, data_kw),
    )


def main(argv: list[str] | None = None) -> int:
    return run_entry("pretrain", argv, build_task)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
