"""mae-detect-predict RUN_DIR INPUT OUT_DIR: COCO-format detections and overlays from a detection run.

    mae-detect-predict runs/detect_demo scenes/images predictions/
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
run, an OUT_DIR that is INPUT or inside it, or no readable image: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
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
    args = p.parse_args(argv)
    from PIL import Image

    from mae.config import ConfigError
    from mae.data import DataError
    from mae.data.segmentation import BadPair, read_image_file
    from mae.device import resolve_device
    from mae.eval.coco import to_results
    from mae.eval.figures import detection_overlay
    from mae.infer.detect import Inputs, check_out_dir, load_run, predict

    try:
        if not 0 <= args.score_thresh <= 1:
            raise ConfigError(f"--score-thresh must be within [0, 1], got {args.score_thresh}")
        device = resolve_device(args.device, ConfigError)
        inputs = Inputs(args.input)
        out = Path(args.out_dir)
        check_out_dir(out, inputs, args.input)
        model, cfg, categories, path = load_run(args.run_dir, args.checkpoint, device)
    except (ConfigError, DataError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [c["name"] for c in categories]
    out.mkdir(parents=True, exist_ok=True)
    results, done, bad = [], 0, 0
    for (file, name, image_id), stem in zip(inputs.items, inputs.stems()):
        try:
            img = read_image_file(str(file), cfg.model.in_chans)
        except BadPair as e:
            bad += 1
            print(f"skipping {e}", file=sys.stderr)
            continue
        det = predict(model, cfg, img, device)
        keep = det["scores"] >= args.score_thresh
        det = {k: v[keep] for k, v in det.items()}
        results += to_results(det, categories, name, image_id)
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(detection_overlay(img, det, names).permute(1, 2, 0).numpy()).save(
            out / f"{stem}_overlay.png"
        )
        done += 1
    (out / "predictions.json").write_text(json.dumps(results))
    print(
        f"{done} image(s), {len(results)} detection(s) scoring {args.score_thresh:g} or more, with {path}: "
        f"{out / 'predictions.json'} and the overlays" + (f"; {bad} unreadable, skipped" if bad else "")
    )
    return 0 if done else 2


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
