"""Reconstruction figures of a pretraining run: original | masked | reconstruction | reconstruction + visible,
one row per image.

mae-viz runs/demo IMAGE [IMAGE ...] --out recon.png      # any run dir or checkpoint, any images

The figure is written atomically; --out may not be one of the images (nor a folder holding one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mae-viz", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a pretraining run directory or one of its checkpoint directories")
    ap.add_argument("images", nargs="+", help="image files (any size; RGB or grayscale; TIFF / .npy bands)")
    ap.add_argument("--out", default="reconstruction.png", help="output PNG (default: %(default)s)")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0, help="masking seed")
    args = ap.parse_args(argv)

    from mae.config import ConfigError
    from mae.data import DataError, ImageDecodeError
    from mae.eval.figures import load_images, save_reconstructions
    from mae.runs.files import check_not_over_inputs
    from mae.weights.build import load_run_model

    try:
        check_not_over_inputs(args.out, [("IMAGE", p) for p in args.images], flag="--out")
        model, cfg = load_run_model(args.checkpoint)
        missing = [p for p in args.images if not Path(p).is_file()]
        if missing:
            raise ConfigError(f"image not found: {missing[0]}")
        imgs = load_images(args.images, cfg.model.img_size, cfg.model.in_chans, cfg.data.mean, cfg.data.std)
    except (ConfigError, DataError, ImageDecodeError, OSError) as e:
        print(f"mae-viz: error: {e}", file=sys.stderr)
        return 2
    path = save_reconstructions(
        model, imgs, args.out, cfg.data.mean, cfg.data.std, args.mask_ratio, args.seed
    )
    print(f"wrote {path}")
    return 0


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "mae-viz")


if __name__ == "__main__":
    cli()
