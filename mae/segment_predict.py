"""mae-segment-predict RUN_DIR INPUT OUT_DIR: class-id masks and colour overlays from a segmentation run.

    mae-segment-predict runs/segment_demo photos/ predictions/
    python -m mae.segment_predict runs/segment_demo scene.png predictions/ --checkpoint last

For each image of INPUT (a folder, searched recursively, or one file) it writes OUT_DIR/<stem>.png, a
single-channel PNG of class ids at the image's own size, and OUT_DIR/<stem>_overlay.png, the image with
the classes painted over it. The run's recorded config decides channels, resizing (data.resize),
normalisation and inference (train.eval_mode); the weights are the run's best by mIoU (checkpoint-best/),
or its latest checkpoint with --checkpoint last. An unreadable image is named on stderr, skipped and
counted; a run that is not a segmentation run, or no readable image, is an error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mae.config import ConfigError


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours: the PASCAL VOC colour map (class 0 black, then well separated hues)."""
    out = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(len(out)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def overlay(img: torch.Tensor, classes: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (C, H, W in [0, 1]; grey, RGB, or the first band of others) with class colours blended in."""
    rgb = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    base = (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.float32)
    painted = (1 - alpha) * base + alpha * colours[classes].astype(np.float32)
    return painted.round().clip(0, 255).astype(np.uint8)


def load_run(run_dir: str, which: str, device: torch.device):
    """(model in eval mode, run config) of a segmentation run directory."""
    from safetensors.torch import load_file

    from mae.build import build_segmenter, task_run

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
    from mae.segment import infer

    transform = seg_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans, train=False)
    x, _ = transform(img, np.zeros(img.shape[1:], np.uint8), 0)
    with torch.no_grad():
        logits = infer(model, x[None].to(device), cfg).float()
    logits = F.interpolate(logits, size=img.shape[1:], mode="bilinear", align_corners=False)
    return logits[0].argmax(0).to(torch.uint8).cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mae-segment-predict", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR", help="a mae/segment.py output_dir")
    p.add_argument("input", metavar="INPUT", help="an image file or a folder of images")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where <stem>.png and <stem>_overlay.png go")
    p.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="best by mIoU (default) or latest"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    from mae.data.segmentation import BadPair, read_image_file

    try:
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        )
        images = find_images(args.input)
        model, cfg, path = load_run(args.run_dir, args.checkpoint, device)
    except (ConfigError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colours = palette(model.seg_classes)
    root = Path(args.input) if Path(args.input).is_dir() else Path(args.input).parent
    done = bad = 0
    for f in images:
        try:
            img = read_image_file(str(f), cfg.model.in_chans)
        except BadPair as e:
            bad += 1
            print(f"skipping {e}", file=sys.stderr)
            continue
        classes = predict(model, cfg, img, device)
        stem = str(f.relative_to(root).with_suffix(""))
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(classes).save(out / f"{stem}.png")
        Image.fromarray(overlay(img, classes, colours)).save(out / f"{stem}_overlay.png")
        done += 1
    print(
        f"{done} image(s) segmented with {path} ({model.seg_classes} classes) into {out}"
        + (f"; {bad} unreadable, skipped" if bad else "")
    )
    return 0 if done else 2


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
