"""Semantic segmentation: a ViT encoder initialised from MAE weights (or from scratch) with a UPerNet or
linear head, trained on image / mask pairs; mIoU, mAcc and aAcc on data.val.

    accelerate launch mae/segment.py recipe=segment_ade20k_vit_base model.init=runs/vit_base data.train=/data/ADEChallengeData2016 data.val=/data/ADEChallengeData2016
    python mae/segment.py recipe=segment_demo model.init=runs/demo       # Fashion-MNIST scenes, minutes on a CPU
    mae-segment-predict runs/segment_demo photos/ predictions/             # class-id masks and overlays

As the MAE paper's ADE20K transfer (UperNet on blocks 4/6/8/12 of ViT-B through a 4x/2x/1x/0.5x pyramid,
auxiliary FCN head, AdamW with layer-wise lr decay, poly schedule; as mmsegmentation reproduces it), or a
linear head (BatchNorm + 1x1 conv) on a frozen encoder (train.freeze_encoder=true) as a segmentation probe.
Evaluation on data.val every train.eval_every epochs, whole-image or sliding-window (train.eval_mode); the
best model by mIoU is kept in output_dir/checkpoint-best/, per-class IoU in output_dir/eval.json. Data:
an images/ + masks/ folder, the ADE20K release, or fashion-mnist-scenes (mae/data/segmentation.py). Every
key is in recipes/base.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not its siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from mae.cli import exit_if_help  # noqa: E402

if __name__ == "__main__":  # --help answers before torch is imported
    exit_if_help("segment", __doc__, sys.argv[1:])

import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch import nn  # noqa: E402

from mae.build import build_segmenter  # noqa: E402
from mae.data.segmentation import (  # noqa: E402
    SegEvalLoader,
    SegTrainLoader,
    check_some_pairs,
    pair_source,
    scan_num_classes,
    seg_transform,
)
from mae.engine import Task, run_entry, seed_everything  # noqa: E402
from mae.evaluation import confusion_matrix, segmentation_scores  # noqa: E402
from mae.models.segmentation import segmentation_loss, slide_inference, whole_inference  # noqa: E402
from mae.transfer import best_keeper, init_encoder, layer_decay_groups  # noqa: E402


def infer(model: nn.Module, images: torch.Tensor, cfg: DictConfig) -> torch.Tensor:
    """Logits (N, K, H, W) of normalised images by train.eval_mode (slide: model.img_size windows, stride
    train.eval_stride or two thirds of a window)."""
    if cfg.train.eval_mode == "slide":
        crop = cfg.model.img_size
        return slide_inference(model, images, crop, cfg.train.eval_stride or max(1, crop * 2 // 3))
    return whole_inference(model, images)


def class_names(src, num_classes: int) -> list[str]:
    names = list(getattr(src, "classes", ()) or ())
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def seg_evaluator(cfg: DictConfig, acc: Accelerator, num_classes: int, log=print):
    """(model, step) -> {miou, macc, aacc} over all of data.val, each rank scoring its own block of pairs; the
    confusion matrix is summed over the ranks. Predictions are scored at each mask's own size (logits resized
    bilinearly); per-class IoU and accuracy go to output_dir/eval.json."""
    if not cfg.data.val:
        return None
    m, d = cfg.model, cfg.data
    src = pair_source(
        d.val, train=False, reduce_zero_label=d.reduce_zero_label, fmnist_dir=d.fmnist_dir, log_fn=log
    )
    check_some_pairs(src, m.in_chans, num_classes, d.val)
    loader = SegEvalLoader(
        src, seg_transform(d, m.img_size, m.in_chans, train=False), in_chans=m.in_chans, num_classes=num_classes,
        batch_size=cfg.train.batch_size, rank=acc.process_index, world_size=acc.num_processes,
        workers=int(d.num_workers),
    )  # fmt: skip
    names = class_names(src, num_classes)

    def evaluate(model: nn.Module, step: int) -> dict:
        model.eval()
        conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=acc.device)
        bad = torch.zeros((), dtype=torch.int64, device=acc.device)
        for items, n_bad in loader:
            bad += n_bad
            by_shape: dict[tuple, list] = {}
            for img, mask, _ in items:  # images of one size go through the model together
                by_shape.setdefault(tuple(img.shape), []).append((img, mask))
            for group in by_shape.values():
                images = torch.stack([g[0] for g in group]).to(acc.device)
                with torch.no_grad(), acc.autocast():
                    logits = infer(model, images, cfg)
                for lg, (_, mask) in zip(logits, group):
                    mask = mask.to(acc.device)
                    lg = F.interpolate(
                        lg[None].float(), size=mask.shape, mode="bilinear", align_corners=False
                    )
                    conf += confusion_matrix(lg[0].argmax(0), mask, num_classes)
        conf = acc.reduce(conf, reduction="sum")
        bad = int(acc.reduce(bad, reduction="sum").item())
        scores = segmentation_scores(conf.cpu())
        if acc.is_main_process:
            per_class = {n: {"iou": i, "acc": a} for n, i, a in zip(names, scores["iou"], scores["acc"])}
            report = {
                "step": step,
                "pairs": src.__len__() - bad,
                "bad_pairs": bad,
                "eval_mode": cfg.train.eval_mode,
            }
            report.update({k: scores[k] for k in ("miou", "macc", "aacc")}, per_class=per_class)
            out = Path(cfg.output_dir) / "eval.json"
            out.with_suffix(".tmp").write_text(json.dumps(report, indent=1))
            os.replace(out.with_suffix(".tmp"), out)
            if bad:
                log(f"evaluation skipped {bad} bad pair(s) of data.val (named above)")
        return {k: scores[k] for k in ("miou", "macc", "aacc")}

    return evaluate


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    log = print if acc.is_main_process else (lambda *a, **k: None)
    m, d = cfg.model, cfg.data
    src = pair_source(
        d.train, train=True, reduce_zero_label=d.reduce_zero_label, fmnist_dir=d.fmnist_dir, log_fn=log
    )
    num_classes = m.num_classes or (
        len(src.classes) if hasattr(src, "classes") else scan_num_classes(src, log)
    )
    check_some_pairs(src, m.in_chans, num_classes, d.train)
    loader = SegTrainLoader(
        src, seg_transform(d, m.img_size, m.in_chans, train=True), in_chans=m.in_chans, num_classes=num_classes,
        batch_size=cfg.train.batch_size, seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes,
        workers=int(d.num_workers), epoch_samples=d.epoch_samples,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_segmenter(cfg, num_classes)
    init_encoder(model, cfg, log)
    if acc.num_processes > 1 and acc.device.type == "cuda":  # BatchNorm statistics over all GPUs, as SyncBN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_everything(cfg.seed, acc.process_index)
    what = "frozen encoder, head only" if cfg.train.freeze_encoder else "encoder and head"
    log(
        f"segment: {num_classes} classes, {m.seg_head} head on blocks {model.out_blocks} ({what}), {len(src)} pairs"
    )
    aux = model.aux_weight

    def loss_fn(net, images, masks, step, micro):
        # BatchNorm needs 2 samples: a batch left with one good pair goes through twice (the same mean loss)
        if images.shape[0] == 1:
            images, masks = images.expand(2, -1, -1, -1), masks.expand(2, -1, -1)
        return segmentation_loss(net(images), masks, aux)

    return Task(
        model=model.to(acc.device),
        groups=layer_decay_groups(model, cfg),
        loader=loader,
        loss_fn=loss_fn,
        evaluate=seg_evaluator(cfg, acc, num_classes, log),
        on_eval=best_keeper(cfg, acc, log, metric="miou", label="mIoU"),
    )


def main(argv: list[str] | None = None) -> int:
    return run_entry("segment", argv, build_task)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
