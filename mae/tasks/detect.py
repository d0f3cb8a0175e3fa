"""Object detection and instance segmentation: Mask R-CNN on a ViTDet backbone of the ViT encoder (window
attention with four global blocks, relative position bias, the simple feature pyramid), trained with layer-wise
lr decay on COCO instances with large-scale jitter; COCO box and mask AP on data.val by pycocotools' COCOeval,
the best model by box AP kept in checkpoint-best/, AP per category in eval.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mae.config import CLASSIFICATION_DATA_KEYS, COMMON_KEYS, ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from omegaconf import DictConfig

    from mae.train.engine import Task

READS = (COMMON_KEYS - CLASSIFICATION_DATA_KEYS) | {
    "model.drop_path", "model.num_classes", "model.grad_checkpointing", "model.window_size", "model.fpn_channels",
    "model.anchor_sizes", "model.proposals", "model.roi_samples", "model.detections", "data.ratio_range",
    "train.layer_decay", "train.eval_every",
}  # fmt: skip
VAL_LABELS = None  # data.val's categories come with its annotations and are checked against data.train's here
ROW_KEYS = ("box_ap", "box_ap50", "box_ap75", "mask_ap")  # what an evaluation adds to metrics.jsonl (percent)


def _atomic_json(path: Path, obj) -> None:
    from mae.runs.files import atomic_text

    atomic_text(path, json.dumps(obj, indent=1))


def detect_results(model, loader, src, categories: list[dict], device, autocast) -> tuple[list, list, int]:
    """This rank's part of an evaluation: (COCO results of every image, their image ids, images skipped as bad)."""
    import torch

    from mae.eval.coco import to_results

    model.eval()
    results, ids, bad = [], [], 0
    for items, n_bad in loader:
        bad += n_bad
        if not items:
            continue
        images = torch.stack([it[0] for it in items]).to(device)
        with torch.no_grad(), autocast():
            dets = model(images, image_sizes=[it[2] for it in items], original_sizes=[it[3] for it in items])
        for det, (*_, i) in zip(dets, items):
            det = {k: v.float() if v.is_floating_point() else v for k, v in det.items()}
            image_id = int(src.image_ids[i])
            results += to_results(det, categories, src.file_name(i), image_id)
            ids.append(image_id)
    return results, ids, bad


def det_evaluator(cfg: DictConfig, acc: Accelerator, train_src, log=print):
    """(model, step) -> {box_ap, box_ap50, box_ap75, mask_ap} over all of data.val: each rank detects in its own
    block of images, rank 0 gathers the results and scores every image once with COCOeval; AP per category and
    COCOeval's tables go to output_dir/eval.json."""
    import torch
    from accelerate.utils import broadcast_object_list, gather_object

    from mae.data import DataError
    from mae.data.detection import DetEvalLoader, check_categories, det_source, det_transform
    from mae.eval.coco import coco_ap
    from mae.train.runtime import Interrupted, Watch

    if not cfg.data.val:
        return None
    m, d = cfg.model, cfg.data
    src = det_source(d.val, train=False, fmnist_dir=d.fmnist_dir, log_fn=log)
    check_categories(train_src, src, d.val)
    if not src.objects:
        raise DataError(
            f"data.val={d.val!r}: its images hold no annotated object to score detections against"
        )
    loader = DetEvalLoader(
        src, det_transform(d, m.img_size, m.in_chans, train=False), in_chans=m.in_chans,
        batch_size=cfg.train.batch_size, rank=acc.process_index, world_size=acc.num_processes,
        workers=int(d.num_workers),
    )  # fmt: skip
    gt = []  # the ground truth, built once on rank 0 at the first evaluation

    def evaluate(model, step: int) -> dict:
        watch = Watch(loader)  # a stop signal ends it early; every rank then raises Interrupted together
        results, ids, bad = detect_results(model, watch, src, src.categories, acc.device, acc.autocast)
        if acc.reduce(torch.tensor(float(watch.stopped), device=acc.device), reduction="sum").item():
            raise Interrupted
        results, ids, bad = gather_object(results), gather_object(ids), sum(gather_object([bad]))
        rows = [None]
        if acc.is_main_process:
            if not gt:
                gt.append(src.coco())
            scores = coco_ap(gt[0], results, ids)
            _atomic_json(Path(cfg.output_dir) / "eval.json", {"step": step, "bad_images": bad, **scores})
            if scores["no_detections"]:
                log(f"evaluation at step {step}: no detection scored 0.05 or more on any of {len(ids)} images: "
                    "the model finds nothing (collapsed); all AP are 0")  # fmt: skip
            if bad:
                log(f"evaluation skipped {bad} unreadable image(s) of data.val (named above)")
            rows = [{k: scores[k] for k in ROW_KEYS}]
        broadcast_object_list(rows)  # every rank returns the scores (on_eval runs on all of them)
        return rows[0]

    return evaluate


def num_classes_of(cfg: DictConfig, src) -> int:
    """model.num_classes: 0 = the annotations' categories; another value must equal their number."""
    n = len(src.categories)
    if cfg.model.num_classes not in (0, n):
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but data.train={cfg.data.train!r} has {n} categories"
        )
    return n


def train_loader(cfg: DictConfig, rank: int, world_size: int, src=None, transform=None):
    """data.train's image loader (`src`: its source, read here when not given; `transform`: none for counting)."""
    from mae.data.detection import DetTrainLoader, det_source

    m, d = cfg.model, cfg.data
    if src is None:
        src = det_source(d.train, train=True, fmnist_dir=d.fmnist_dir, log_fn=lambda *a: None)
    return DetTrainLoader(
        src, transform, in_chans=m.in_chans, batch_size=cfg.train.batch_size, seed=cfg.seed, rank=rank,
        world_size=world_size, workers=int(d.num_workers), epoch_samples=d.epoch_samples,
    )  # fmt: skip


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    import torch

    from mae.data.detection import CATEGORIES, det_source, det_transform
    from mae.models.detection import detection_loss
    from mae.train.checkpoint import best_keeper
    from mae.train.engine import Task, seed_everything
    from mae.train.optim import vit_layer_decay_groups
    from mae.weights.build import build_detector
    from mae.weights.load import init_from_config

    log = print if acc.is_main_process else (lambda *a, **k: None)
    m, d = cfg.model, cfg.data
    src = det_source(d.train, train=True, fmnist_dir=d.fmnist_dir, log_fn=log)
    num_classes = num_classes_of(cfg, src)
    if line := src.counts.line(d.train):
        log(line)
    loader = train_loader(cfg, acc.process_index, acc.num_processes, src,
                          det_transform(d, m.img_size, m.in_chans, train=True))  # fmt: skip
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_detector(cfg, num_classes)
    seed_everything(cfg.seed, acc.process_index)
    attention = f"window {m.window_size}, global blocks {model.global_blocks}" if m.window_size else "global"
    log(
        f"detect: {num_classes} categories, Mask R-CNN on ViTDet ({attention}; pyramid {m.fpn_channels} channels; "
        f"anchors {list(model.anchor_sizes)} px), {len(src)} images ({src.layout})"
    )
    categories = src.categories

    def loss_fn(net, images, targets, step, micro):
        return detection_loss(net(images, list(targets), targets.image_sizes))

    def on_checkpoint(model, path, step):  # what mae-detect-predict needs besides the weights
        if acc.is_main_process:
            _atomic_json(Path(cfg.output_dir) / CATEGORIES, categories)

    return Task(
        model=model.to(acc.device),
        groups=vit_layer_decay_groups(model, cfg.train.weight_decay, cfg.train.layer_decay),
        loader=loader,
        loss_fn=loss_fn,
        init_weights=lambda: init_from_config(model, cfg, log),
        evaluate=det_evaluator(cfg, acc, src, log),
        on_checkpoint=on_checkpoint,
        on_eval=best_keeper(cfg, acc, log, metric="box_ap", label="box AP"),
        # model.num_classes=0: the annotations' category count, recorded and checked on resume like the sizes
        record={} if cfg.model.num_classes else {"model.num_classes": num_classes},
    )
