"""Object detection and instance segmentation: Mask R-CNN on a ViT encoder initialised from MAE weights (or from
scratch), as ViTDet (Li, Mao, Girshick, He 2022); COCO box and mask AP on data.val.

    accelerate launch mae/detect.py recipe=detect_coco_vit_base model.init=runs/vit_base data.train=/data/coco data.val=/data/coco
    python mae/detect.py recipe=detect_demo model.init=runs/demo       # Fashion-MNIST scenes, minutes on a CPU
    mae-detect-predict runs/detect_demo scenes/ predictions/            # predictions.json and overlays

The encoder becomes ViTDet's backbone (window attention with four global blocks, relative position bias, the
simple feature pyramid; mae/models/detection.py) under torchvision's Mask R-CNN, trained with layer-wise lr decay
and drop path on COCO instances (a JSON file, annotations.json + images/, or the COCO 2017 release; or the built-in
fashion-mnist-instances) with large-scale jitter. Evaluation on data.val every train.eval_every epochs by
pycocotools' COCOeval: box_ap, box_ap50, box_ap75 and mask_ap in metrics.jsonl, AP per category in
output_dir/eval.json, the best model by box AP in output_dir/checkpoint-best/. Every key is in recipes/base.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not its siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from mae.cli import exit_if_help  # noqa: E402

if __name__ == "__main__":  # --help answers before torch is imported
    exit_if_help("detect", __doc__, sys.argv[1:])

import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import broadcast_object_list, gather_object  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch import nn  # noqa: E402

from mae.build import build_detector  # noqa: E402
from mae.config import ConfigError  # noqa: E402
from mae.data import DataError  # noqa: E402
from mae.data.detection import (  # noqa: E402
    CATEGORIES,
    DetEvalLoader,
    DetTrainLoader,
    check_categories,
    det_source,
    det_transform,
)
from mae.engine import Task, run_entry, seed_everything  # noqa: E402
from mae.eval.coco import coco_ap, to_results  # noqa: E402
from mae.models.detection import detection_loss  # noqa: E402
from mae.transfer import best_keeper, init_encoder, layer_decay_groups  # noqa: E402

ROW_KEYS = ("box_ap", "box_ap50", "box_ap75", "mask_ap")  # what an evaluation adds to metrics.jsonl (percent)


def _atomic_json(path: Path, obj) -> None:
    path.with_suffix(".tmp").write_text(json.dumps(obj, indent=1))
    os.replace(path.with_suffix(".tmp"), path)


@torch.no_grad()
def detect_results(
    model: nn.Module, loader, src, categories: list[dict], device, autocast
) -> tuple[list, list, int]:
    """This rank's part of an evaluation: (COCO results of every image, their image ids, images skipped as bad)."""
    model.eval()
    results, ids, bad = [], [], 0
    for items, n_bad in loader:
        bad += n_bad
        if not items:
            continue
        images = torch.stack([it[0] for it in items]).to(device)
        with autocast():
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

    def evaluate(model: nn.Module, step: int) -> dict:
        results, ids, bad = detect_results(model, loader, src, src.categories, acc.device, acc.autocast)
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


def train_loader(cfg: DictConfig, src, rank: int, world_size: int, transform=None) -> DetTrainLoader:
    m, d = cfg.model, cfg.data
    return DetTrainLoader(
        src, transform, in_chans=m.in_chans, batch_size=cfg.train.batch_size, seed=cfg.seed, rank=rank,
        world_size=world_size, workers=int(d.num_workers), epoch_samples=d.epoch_samples,
    )  # fmt: skip


def steps_per_epoch(cfg: DictConfig, world_size: int) -> int:
    """For --print-config: data.train's images (its annotation file read, no image) per global batch."""
    src = det_source(cfg.data.train, train=True, fmnist_dir=cfg.data.fmnist_dir, log_fn=lambda *a: None)
    return train_loader(cfg, src, 0, world_size).steps_per_epoch


def build_task(cfg: DictConfig, acc: Accelerator) -> Task:
    log = print if acc.is_main_process else (lambda *a, **k: None)
    m, d = cfg.model, cfg.data
    src = det_source(d.train, train=True, fmnist_dir=d.fmnist_dir, log_fn=log)
    num_classes = num_classes_of(cfg, src)
    if line := src.counts.line(d.train):
        log(line)
    loader = train_loader(cfg, src, acc.process_index, acc.num_processes,
                          det_transform(d, m.img_size, m.in_chans, train=True))  # fmt: skip
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_detector(cfg, num_classes)
    init_encoder(model, cfg, log)
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
        groups=layer_decay_groups(model, cfg),
        loader=loader,
        loss_fn=loss_fn,
        evaluate=det_evaluator(cfg, acc, src, log),
        on_checkpoint=on_checkpoint,
        on_eval=best_keeper(cfg, acc, log, metric="box_ap", label="box AP"),
    )


def main(argv: list[str] | None = None) -> int:
    return run_entry("detect", argv, build_task, class_folders=False, steps_per_epoch=steps_per_epoch)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
