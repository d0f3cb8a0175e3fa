"""mae-segment-predict RUN_DIR INPUT OUT_DIR: class-id masks and colour overlays from a segmentation run.

    mae-segment-predict runs/segment_demo photos/ predictions/
    python -m mae.segment_predict runs/segment_demo scene.png predictions/ --checkpoint last

For each image of INPUT (a folder, searched recursively, or one file) it writes OUT_DIR/<stem>.png, a
single-channel PNG of class ids at the image's own size, and OUT_DIR/<stem>_overlay.png, the image with
the classes painted over it. The run's recorded config decides channels, resizing (data.resize),
normalisation and inference (train.eval_mode); the weights are the run's best by mIoU (checkpoint-best/),
or its latest checkpoint with --checkpoint last. An unreadable image is named on stderr, skipped and
counted; a run that is not a segmentation run, or no readable image, is an error (exit 2).

OUT_DIR may not be INPUT, lie inside it or hold it. Two inputs whose outputs would take one name (a.jpg and
a.png; b.png and b_overlay.png) are an error naming both, before anything is written. An OUT_DIR holding other
files is refused unless --overwrite; one holding this command's earlier output has it replaced whole. The
files appear when every image is done (a stopped run leaves none); one run at a time writes into an OUT_DIR.
"""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--overwrite", action="store_true", help="write into an OUT_DIR that holds other files")
    args = p.parse_args(argv)
    from mae.config import ConfigError
    from mae.device import resolve_device
    from mae.infer.segment import find_images, load_run, predict_folder, reserve_names
    from mae.runs.files import OutputDir

    inputs = {"INPUT": args.input, "RUN_DIR": args.run_dir}
    try:
        device = resolve_device(args.device, ConfigError)
        images = find_images(args.input)
        with OutputDir(args.out_dir, "mae-segment-predict", inputs, overwrite=args.overwrite) as out:
            reserve_names(out, images, args.input)
            model, cfg, path = load_run(args.run_dir, args.checkpoint, device)
            done, bad = predict_folder(model, cfg, device, images, args.input, out)
            if done:
                out.commit()
    except (ConfigError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{done} image(s) segmented with {path} ({model.seg_classes} classes) into {args.out_dir}"
        + (f"; {bad} unreadable, skipped" if bad else "")
    )
    return 0 if done else 2


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "mae-segment-predict")


if __name__ == "__main__":
    cli()
