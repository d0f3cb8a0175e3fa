"""Semantic segmentation: a ViT encoder initialised from MAE weights (or from scratch) with a UPerNet or
linear head, trained on image / mask pairs; mIoU, mAcc and aAcc on data.val, whole-image or sliding-window;
the best model by mIoU kept in checkpoint-best/, per-class IoU in eval.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mae.config import CLASSIFICATION_DATA_KEYS, COMMON_KEYS

if TYPE_CHECKING:
    from accelerate import Accelerator
    from omegaconf import DictConfig

    from mae.train.engine import Task

READS = (COMMON_KEYS - CLASSIFICATION_DATA_KEYS) | {
    "model.drop_path", "model.num_classes", "model.grad_checkpointing", "model.seg_head", "model.seg_blocks",
    "model.seg_channels", "model.aux_weight", "data.reduce_zero_label", "data.resize", "data.ratio_range",
    "data.cat_max_ratio", "data.photometric", "train.layer_decay", "train.eval_every", "train.eval_mode",
    "train.eval_stride", "train.freeze_encoder",
}  # fmt: skip

VAL_LABELS = None  # data.val is image / mask pairs: no class labels to pair with data.train's


def class_names(src, num_classes: int) -> list[str]:
    names = list(getattr(src, "classes", ()) or ())
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def seg_evaluator(cfg: DictConfig, acc: Accelerator, num_classes: int, log=print):
    """(model, step) -> {miou, macc, aacc} over all of data.val, each rank scoring its own block of pairs; the
    confusion matrix is summed over the ranks. Predictions are scored at each mask's own size (logits resized
    bilinearly); per-class IoU and accuracy go to output_dir/eval.json, and a collapsed model (metrics.collapse)
    is named there and in one warning line."""
    import torch
    import torch.nn.functional as F

    from mae.data.segmentation import SegEvalLoader, check_some_pairs, pair_source, seg_transform
    from mae.eval.metrics import collapse, confusion_matrix, segmentation_scores
    from mae.models.segmentation import segment_logits
    from mae.runs.files import atomic_text
    from mae.train.runtime import Interrupted, Watch

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

    def evaluate(model, step: int) -> dict:
        model.eval()
        conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=acc.device)
        bad = torch.zeros((), dtype=torch.int64, device=acc.device)
        watch = Watch(loader)  # a stop signal ends it early; every rank then raises Interrupted together
        for items, n_bad in watch:
            bad += n_bad
            by_shape: dict[tuple, list] = {}
            for img, mask, _ in items:  # images of one size go through the model together
                by_shape.setdefault(tuple(img.shape), []).append((img, mask))
            for group in by_shape.values():
                images = torch.stack([g[0] for g in group]).to(acc.device)
                with torch.no_grad(), acc.autocast():
                    logits = segment_logits(model, images, cfg.train.eval_mode, cfg.train.eval_stride)
                for lg, (_, mask) in zip(logits, group):
                    mask = mask.to(acc.device)
                    lg = F.interpolate(
                        lg[None].float(), size=mask.shape, mode="bilinear", align_corners=False
                    )
                    conf += confusion_matrix(lg[0].argmax(0), mask, num_classes)
        conf = acc.reduce(conf, reduction="sum")
        bad = int(acc.reduce(bad, reduction="sum").item())
        if acc.reduce(torch.tensor(float(watch.stopped), device=acc.device), reduction="sum").item():
            raise Interrupted
        conf = conf.cpu()
        scores = segmentation_scores(conf)
        collapsed = collapse(conf.sum(0), names, scores["macc"], int((conf.sum(1) > 0).sum()))
        if acc.is_main_process:
            per_class = {n: {"iou": i, "acc": a} for n, i, a in zip(names, scores["iou"], scores["acc"])}
            report = {
                "step": step,
                "pairs": src.__len__() - bad,
                "bad_pairs": bad,
                "eval_mode": cfg.train.eval_mode,
                "collapsed": collapsed,  # why the predictions carry no information, or null
            }
            report.update({k: scores[k] for k in ("miou", "macc", "aacc")}, per_class=per_class)
            atomic_text(Path(cfg.output_dir) / "eval.json", json.dumps(report, indent=1))
            if bad:
                log(f"evaluation skipped {bad} bad pair(s) of data.val (named above)")
            if collapsed:
                log(f"warning: the model has collapsed at step {step}: {collapsed} (eval.json: collapsed)")
        return {k: scores[k] for k in ("miou", "macc", "aacc")}

    return evaluate


def train_pairs(cfg: DictConfig, log=print):
    """(data.train's pair source, the number of classes: model.num_classes, else the source's or the masks')."""
    from mae.data.segmentation import pair_source, scan_num_classes

    d = cfg.data
    src = pair_source(
        d.train, train=True, reduce_zero_label=d.reduce_zero_label, fmnist_dir=d.fmnist_dir, log_fn=log
    )
    if cfg.model.num_classes:
        return src, cfg.model.num_classes
    return src, len(src.classes) if hasattr(src, "classes") else scan_num_classes(src, log)


def train_loader(cfg: DictConfig, rank: int, world_size: int, src=None, num_classes: int = 0):
    """The pair loader of data.train (with `num_classes` 0, no mask is checked against a class count)."""
    from mae.data.segmentation import SegTrainLoader, seg_transform

    m, d = cfg.model, cfg.data
    src = src if src is not None else train_pairs(cfg, log=lambda *a: None)[0]
    return SegTrainLoader(
        src, seg_transform(d, m.img_size, m.in_chans, train=True), in_chans=m.in_chans, num_classes=num_classes,
        batch_size=cfg.train.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
        workers=int(d.num_workers), epoch_samples=d.epoch_samples,
    )  # fmt: skip


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    import torch
    from torch import nn

    from mae.data.segmentation import check_some_pairs
    from mae.models.segmentation import segmentation_loss
    from mae.train.checkpoint import best_keeper
    from mae.train.engine import Task, seed_everything
    from mae.train.optim import vit_layer_decay_groups
    from mae.weights.build import build_segmenter
    from mae.weights.load import init_from_config

    log = print if acc.is_main_process else (lambda *a, **k: None)
    m = cfg.model
    src, num_classes = train_pairs(cfg, log)
    check_some_pairs(src, m.in_chans, num_classes, cfg.data.train)
    loader = train_loader(cfg, acc.process_index, acc.num_processes, src, num_classes)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_segmenter(cfg, num_classes)
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

    def init_weights() -> None:
        init_from_config(model, cfg, log)

    if acc.num_processes > 1 and acc.device.type == "cuda":  # BatchNorm statistics over all GPUs, as SyncBN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return Task(
        model=model.to(acc.device),
        groups=vit_layer_decay_groups(model, cfg.train.weight_decay, cfg.train.layer_decay),
        loader=loader,
        loss_fn=loss_fn,
        init_weights=init_weights,
        evaluate=seg_evaluator(cfg, acc, num_classes, log),
        on_eval=best_keeper(cfg, acc, log, metric="miou", label="mIoU"),
        # model.num_classes=0: the count found in the masks, recorded and checked on resume like the sizes
        record={} if m.num_classes else {"model.num_classes": num_classes},
    )
