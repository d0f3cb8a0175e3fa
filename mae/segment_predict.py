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
    from PIL import Image

    from mae.config import ConfigError
    from mae.data.segmentation import BadPair, read_image_file
    from mae.device import resolve_device
    from mae.eval.figures import overlay, palette
    from mae.infer.segment import find_images, load_run, predict

    try:
        device = resolve_device(args.device, ConfigError)
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
