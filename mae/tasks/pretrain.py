"""Pretraining: the MAE on unlabelled images, masking noise a pure function of the step, a k-NN monitor of the
encoder's features and reconstruction figures at each checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mae.config import COMMON_KEYS, ConfigError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from omegaconf import DictConfig

    from mae.train.engine import Task

READS = COMMON_KEYS | {
    "model.norm_pix_loss", "model.mask_ratio", "model.decoder_embed_dim", "model.decoder_depth",
    "model.decoder_num_heads", "model.drop_path", "model.grad_checkpointing", "data.decode", "train.fsdp",
    "log.viz_images", "log.knn_every_steps", "log.knn_k", "log.knn_train_samples", "log.knn_val_samples",
}  # fmt: skip
# data.val's labels: the k-NN monitor's queries, while log.knn_every_steps > 0
VAL_LABELS = ("k-NN monitor", "log.knn_every_steps")
# `synthetic` batches are drawn on the device, uncropped, unflipped, without loader workers
SYNTHETIC_IGNORES = ("data.scale_min", "data.hflip", "data.num_workers")
_M64 = (1 << 64) - 1


def config_notes(flat: dict[str, Any], explicit: dict[str, str]) -> list[str]:
    """Keys that data.train=synthetic leaves unused: a note, not an error (a recipe sets them for real data)."""
    ignored = [k for k in SYNTHETIC_IGNORES if k in explicit]
    if str(flat["data.train"]).partition(":")[0] != "synthetic" or not ignored:
        return []
    return [
        f"note: data.train=synthetic draws its images on the device, uncropped, unflipped and without loader "
        f"workers: {', '.join(ignored)} ({explicit[ignored[0]]}) take effect with image data only"
    ]


def masking_noise(images: torch.Tensor, num_patches: int, seed: int, rank: int, step: int, micro: int):
    """Per-sample masking noise (N, L), a pure function of (seed, rank, step, micro-step): a resumed run
    draws exactly the masks the uninterrupted run would have drawn.

    A Philox stream keyed by (seed, rank) and started at counter (step, micro) in its two high words: every
    (seed, rank, step, micro) of 64-bit values gets its own stream, whatever train.grad_accum is (the draws
    advance only the low words)."""
    import numpy as np
    import torch

    bits = np.random.Philox(key=((seed & _M64) << 64) | rank, counter=(micro << 192) | (step << 128))
    noise = np.random.Generator(bits).random((images.shape[0], num_patches), dtype=np.float32)
    return torch.from_numpy(noise).to(images.device)


def knn_monitor(cfg: DictConfig, acc: Accelerator, data_kw: dict):
    """k-NN top-1 of the encoder's mean patch features: memory bank from labelled data.train, queries
    from data.val. Runs on rank 0 (small sets) while the other ranks wait; a sharded (FSDP) model's forward
    is collective, so there every rank extracts the same features and rank 0 scores them."""
    import torch

    from mae.data import build_eval_loader, train_split
    from mae.eval.metrics import extract_features, knn_top1, mean_patch_features
    from mae.train.fsdp import is_sharded
    from mae.train.runtime import Interrupted, Watch

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

    def any_rank(flag: bool) -> bool:
        return acc.reduce(torch.tensor(float(flag), device=acc.device), reduction="sum").item() > 0

    def features(model):
        """(bank features, labels, query features, labels), or None when a stop signal ended the extraction.
        Sharded, every rank extracts the same batches and they agree at each one whether to go on."""
        model.eval()
        fn, agree = mean_patch_features(model), any_rank if is_sharded(model) else None
        out = []
        for loader in (bank, queries):
            watch = Watch(loader, agree)
            out += extract_features(fn, watch, acc.device, acc.autocast)
            if watch.stopped:
                return None
        return out

    def monitor(model, step: int) -> dict:
        result, stopped = {}, False
        if acc.is_main_process or is_sharded(model):
            feats = features(model)
            stopped = feats is None
        if acc.is_main_process and not stopped:
            result = {"knn_top1": knn_top1(*feats, k=cfg.log.knn_k)}
            print(f"k-NN top-1 at step {step}: {result['knn_top1']:.2f}%", flush=True)
        acc.wait_for_everyone()
        if any_rank(stopped) if acc.num_processes > 1 else stopped:
            raise Interrupted
        return result

    return monitor


def reconstruction_hook(cfg: DictConfig, acc: Accelerator, data_kw: dict):
    """At each checkpoint: the reconstruction figure of a fixed set of images with a fixed mask, written by
    rank 0. Sharded (FSDP), every rank runs the same forward (it is collective)."""
    import torch

    from mae.data import build_eval_loader
    from mae.eval.figures import save_reconstructions
    from mae.train import trackers
    from mae.train.fsdp import enabled as fsdp_enabled

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


def train_loader(cfg: DictConfig, rank: int, world_size: int, augment: str = "mae"):
    """The MAE's training loader: random resized crops and flips (decodable on the device)."""
    from mae.data import build_train_loader

    return build_train_loader(
        cfg.data, source=cfg.data.train, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
        batch_size=cfg.train.batch_size, augment=augment, seed=cfg.seed, rank=rank, world_size=world_size,
    )  # fmt: skip


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    import torch

    from mae.train.engine import Task, seed_everything
    from mae.train.optim import param_groups
    from mae.weights.build import build_mae
    from mae.weights.load import init_from_config

    log = print if acc.is_main_process else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_mae(cfg)
    seed_everything(cfg.seed, acc.process_index)
    loader = train_loader(cfg, acc.process_index, acc.num_processes)
    num_patches, rank = model.patch_embed.num_patches, acc.process_index
    data_kw = dict(img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, batch_size=cfg.train.batch_size)

    def loss_fn(m, images, labels, step: int, micro: int) -> torch.Tensor:
        noise = masking_noise(images, num_patches, cfg.seed, rank, step, micro)
        loss, _, _ = m(images, mask_ratio=cfg.model.mask_ratio, noise=noise)
        return loss

    return Task(
        model=model.to(acc.device),
        groups=param_groups(model, cfg.train.weight_decay),
        loader=loader,
        loss_fn=loss_fn,
        init_weights=lambda: init_from_config(model, cfg, log),
        monitor=knn_monitor(cfg, acc, dict(data_kw, batch_size=max(cfg.train.batch_size, 256))),
        monitor_every=cfg.log.knn_every_steps,
        on_checkpoint=reconstruction_hook(cfg, acc, data_kw),
    )
