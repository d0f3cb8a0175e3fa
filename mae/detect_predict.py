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
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from mae.config import ConfigError

DEFAULT_SCORE = 0.5


def load_run(run_dir: str, which: str, device: torch.device):
    """(model in eval mode, run config, categories, weights file) of a detection run directory."""
    from safetensors.torch import load_file

    from mae.build import build_detector, task_run
    from mae.data.detection import CATEGORIES

    cfg, path = task_run(run_dir, "detect", which)
    if not (Path(run_dir) / CATEGORIES).is_file():
        raise ConfigError(f"{run_dir}: no {CATEGORIES} (the run has not written a checkpoint yet)")
    categories = json.loads((Path(run_dir) / CATEGORIES).read_text())
    model = build_detector(cfg, len(categories))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval(), cfg, categories, path


class Inputs:
    """What INPUT holds: (path, file_name relative to the input's root, image_id or None) per image, and the root
    (the folder the names are relative to; a COCO dataset's own folder)."""

    def __init__(self, source: str):
        from mae.data.detection import CocoSource
        from mae.data.images import IMAGE_EXTS

        p = Path(source)
        if not p.exists():
            raise ConfigError(f"INPUT {source!r}: no such file or directory")
        self.coco = p.suffix.lower() == ".json" or (p.is_dir() and _is_coco_dir(p))
        if self.coco:
            src = CocoSource(source, train=False, log_fn=lambda line: print(line, file=sys.stderr))
            self.root = p if p.is_dir() else p.parent
            self.items = [(Path(src.name(i)), os.path.relpath(src.name(i), self.root), int(src.image_ids[i]))
                          for i in range(len(src))]  # fmt: skip
        elif p.is_file():
            self.root, self.items = p.parent, [(p, p.name, None)]
        else:
            self.root = p
            self.items = [(f, str(f.relative_to(p)), None) for f in sorted(p.rglob("*"))
                          if f.is_file() and not f.name.startswith(".") and f.suffix[1:].lower() in IMAGE_EXTS]  # fmt: skip
        if not self.items:
            raise ConfigError(f"INPUT {source!r}: no image files")

    def stems(self) -> list[str]:
        """Each image's output stem: its name without the extension, or with it where two would share a stem."""
        plain = [str(Path(name).with_suffix("")) for _, name, _ in self.items]
        clash = {s for s in plain if plain.count(s) > 1}
        return [name if s in clash else s for s, (_, name, _) in zip(plain, self.items)]


def _is_coco_dir(p: Path) -> bool:
    return (p / "annotations.json").is_file() or (p / "annotations" / "instances_val2017.json").is_file()


def check_out_dir(out: Path, inputs: Inputs, source: str) -> None:
    """Outputs never replace inputs: OUT_DIR may be neither INPUT (or a COCO dataset's folder) nor inside it."""
    roots = {Path(source).resolve()} | (
        {inputs.root.resolve()} if inputs.coco or Path(source).is_dir() else set()
    )
    o = out.resolve()
    for r in roots:
        if r.is_dir() and (o == r or r in o.parents):
            raise ConfigError(
                f"OUT_DIR {out} is {'INPUT' if o == r else 'inside INPUT'} ({r}): choose another"
            )


def overlay(img: torch.Tensor, det: dict, names: list[str]) -> torch.Tensor:
    """The image (C, H, W in [0, 1]; grey, RGB, or the first band of others) as uint8 RGB with masks, boxes and
    `class score` labels drawn by torchvision.utils."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    rgb = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    out = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
    if len(det["boxes"]):
        out = draw_segmentation_masks(out, det["masks"][:, 0] > 0.5, alpha=0.45)
        labels = [f"{names[int(c) - 1]} {s:.2f}" for c, s in zip(det["labels"], det["scores"].tolist())]
        out = draw_bounding_boxes(out, det["boxes"], labels, width=1)
    return out


@torch.no_grad()
def predict(model, cfg, img: torch.Tensor, device: torch.device) -> dict:
    """One image (C, H, W in the loader's scale) -> its detections in its own pixels (float32, on the CPU)."""
    from mae.data.detection import det_transform

    x, _, part = det_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans, train=False)(img, None)
    (det,) = model(x[None].to(device), image_sizes=[part], original_sizes=[tuple(img.shape[1:])])
    return {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in det.items()}


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
    from mae.data import DataError
    from mae.data.segmentation import BadPair, read_image_file
    from mae.eval.coco import to_results

    try:
        if not 0 <= args.score_thresh <= 1:
            raise ConfigError(f"--score-thresh must be within [0, 1], got {args.score_thresh}")
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        )
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
        Image.fromarray(overlay(img, det, names).permute(1, 2, 0).numpy()).save(out / f"{stem}_overlay.png")
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
