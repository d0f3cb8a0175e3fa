"""Segmentation predictions of a finished run: the run's model and transform, one image at a time at its own
size, class-id masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mae.config import ConfigError


def load_run(run_dir: str, which: str, device: torch.device):
    """(model in eval mode, run config) of a segmentation run directory."""
    from safetensors.torch import load_file

    from mae.runs.record import task_run
    from mae.weights.build import build_segmenter

    cfg, path = task_run(run_dir, "segment", which)
    state = load_file(str(path))
    num_classes = state["decode_head.conv_seg.weight"].shape[0]
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    cfg.train.freeze_encoder = False
    model = build_segmenter(cfg, num_classes)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg, path


def find_images(source: str) -> list[Path]:
    from mae.data.images import IMAGE_EXTS

    p = Path(source)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"INPUT {source!r}: no such file or directory")
    found = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and not f.name.startswith(".") and f.suffix[1:].lower() in IMAGE_EXTS
    )
    if not found:
        raise ConfigError(f"INPUT {source!r}: no image files")
    return found


def predict(model, cfg, img: torch.Tensor, device: torch.device) -> np.ndarray:
    """Class ids (H, W) uint8 of one image (C, H, W in the loader's scale)."""
    from mae.data.segmentation import seg_transform
    from mae.models.segmentation import segment_logits

    transform = seg_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans, train=False)
    x, _ = transform(img, np.zeros(img.shape[1:], np.uint8), 0)
    with torch.no_grad():
        logits = segment_logits(model, x[None].to(device), cfg.train.eval_mode, cfg.train.eval_stride).float()
    logits = F.interpolate(logits, size=img.shape[1:], mode="bilinear", align_corners=False)
    return logits[0].argmax(0).to(torch.uint8).cpu().numpy()


def output_stem(image: Path, root: Path) -> str:
    """The name of an image's outputs: its path below INPUT without the extension (`<stem>.png`,
    `<stem>_overlay.png`)."""
    return image.relative_to(root).with_suffix("").as_posix()


def input_root(source: str) -> Path:
    p = Path(source)
    return p if p.is_dir() else p.parent


def reserve_names(out, images: list[Path], source: str) -> None:
    """Claim every output name in `out` (mae.runs.files.OutputDir) before anything is predicted: two images of
    one output name are an error naming both."""
    root = input_root(source)
    for f in images:
        stem = output_stem(f, root)
        out.reserve(f"{stem}.png", str(f))
        out.reserve(f"{stem}_overlay.png", str(f))


def predict_folder(model, cfg, device, images: list[Path], source: str, out) -> tuple[int, int]:
    """Class-id masks and overlays of `images` into `out` (an OutputDir); returns (written, unreadable)."""
    from PIL import Image

    from mae.eval.figures import overlay, palette
    from mae.infer import read_or_skip

    colours, root = palette(model.seg_classes), input_root(source)
    done = bad = 0
    for f in images:
        img = read_or_skip(f, cfg.model.in_chans)
        if img is None:
            bad += 1
            continue
        classes = predict(model, cfg, img, device)
        stem = output_stem(f, root)
        Image.fromarray(classes).save(out.file(f"{stem}.png"), format="PNG")
        Image.fromarray(overlay(img, classes, colours)).save(out.file(f"{stem}_overlay.png"), format="PNG")
        done += 1
    return done, bad
