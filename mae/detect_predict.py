"""mae-detect-predict RUN_DIR INPUT OUT_DIR: COCO-format detections and overlays from a detection run.

    mae-detect-predict runs/detect_demo instances/images detections/
    python -m mae.detect_predict runs/detect_demo /data/coco predictions/ --score-thresh 0.05

INPUT is an image, a folder of images (searched recursively) or a COCO dataset as mae/detect.py reads one (a JSON
file, a folder with annotations.json and images/, the COCO 2017 release: its val2017). OUT_DIR/predictions.json is
a list in COCO's results format, one object per detection: `file_name` (relative to INPUT, or to the JSON file's
folder), `image_id` (COCO datasets), `category_id` (the training annotations' ids), `bbox` [x, y, w, h] in the
image's pixels, `score`, `segmentation` (RLE); `pycocotools.coco.COCO.loadRes` reads it as it is. OUT_DIR/
<stem>_overlay.png shows each image with its masks, boxes, class names and scores. Detections scoring below
--score-thresh (default 0.5; 0.05 to score with COCOeval) are left out of both. The run's recorded config decides
channels, size and normalisation; the weights are its best by box AP (checkpoint-best/), or its latest checkpoint
with --checkpoint last. An unreadable image is named on stderr, skipped and counted. A run that is not a detection
run, or no readable image: one line, exit 2.

OUT_DIR may not be INPUT (or a COCO file's folder), lie inside it or hold it. Two images of one stem (a.jpg and
a.png) keep their extensions in their overlays' names (a.jpg_overlay.png, a.png_overlay.png). An OUT_DIR holding
other files is refused unless --overwrite; one holding this command's earlier output has it replaced whole. The
files appear when every image is done (a stopped run leaves none); one run at a time writes into an OUT_DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SCORE = 0.5  # mae.infer.detect.DEFAULT_SCORE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mae-detect-predict", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR", help="a mae/detect.py output_dir")
    p.add_argument("input", metavar="INPUT", help="an image, a folder of images, or a COCO dataset")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where predictions.json and <stem>_overlay.png go")
    p.add_argument("--score-thresh", type=float, default=DEFAULT_SCORE, metavar="S",
                   help=f"leave out detections scoring below S (default {DEFAULT_SCORE})")  # fmt: skip
    p.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="best by box AP (default) or latest"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="write into an OUT_DIR that holds other files")
    args = p.parse_args(argv)
    from mae.config import ConfigError
    from mae.data import DataError
    from mae.device import resolve_device
    from mae.infer.detect import Inputs, load_run, predict_all
    from mae.runs.files import OutputDir

    try:
        if not 0 <= args.score_thresh <= 1:
            raise ConfigError(f"--score-thresh must be within [0, 1], got {args.score_thresh}")
        device = resolve_device(args.device, ConfigError)
        inputs = Inputs(args.input)
        sources = {"INPUT": args.input, "RUN_DIR": args.run_dir}
        if inputs.coco:  # a COCO file's images lie beside it, or in images/ beside it
            sources["INPUT's dataset"] = str(inputs.root)
        with OutputDir(args.out_dir, "mae-detect-predict", sources, overwrite=args.overwrite) as out:
            inputs.reserve(out)
            model, cfg, categories, path = load_run(args.run_dir, args.checkpoint, device)
            found, done, bad = predict_all(model, cfg, categories, device, inputs, out, args.score_thresh)
            if done:
                out.commit()
    except (ConfigError, DataError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    print(
        f"{done} image(s), {found} detection(s) scoring {args.score_thresh:g} or more, with {path}: "
        f"{out / 'predictions.json'} and the overlays" + (f"; {bad} unreadable, skipped" if bad else "")
    )
    return 0 if done else 2


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "mae-detect-predict")


if __name__ == "__main__":
    cli()
