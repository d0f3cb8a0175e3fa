"""The segmentation demo's evidence: test scenes as a folder, the picture, and the table of docs/segmentation.md.

    python experiments/segment_demo.py scenes scenes/ --count 8          # test scenes as images/ + masks/
    python experiments/segment_demo.py figure runs/segment_demo docs/segment_demo.png
    python experiments/segment_demo.py report runs                       # the table, from the runs' metrics

`scenes` writes DIR/images/<i>.png and DIR/masks/<i>.png for the first COUNT fashion-mnist-scenes test scenes:
the folder layout mae/segment.py reads, and images for mae-segment-predict. `figure` shows COUNT test scenes
as rows of image | truth | prediction (classes coloured, ignore in white) above the colour legend. `report` reads the four runs the
docs' commands leave under RUNS (segment_demo, segment_demo_scratch, segment_demo_linear,
segment_demo_linear_random) and prints their last evaluation as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

RUNS = {
    "segment_demo": "UPerNet, fine-tuned from the demo MAE encoder",
    "segment_demo_scratch": "UPerNet, fine-tuned from random init",
    "segment_demo_linear": "linear head, frozen demo MAE encoder",
    "segment_demo_linear_random": "linear head, frozen random encoder",
}


def write_scenes(out: Path, count: int) -> int:
    from mae.data.segmentation import pair_source

    src = pair_source("fashion-mnist-scenes:test", train=False, reduce_zero_label=False)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        canvas, mask = src.draw(i)
        Image.fromarray(canvas).save(out / "images" / f"{i:04d}.png")
        Image.fromarray(mask).save(out / "masks" / f"{i:04d}.png")
    return count


def figure(run: Path, out: Path, count: int) -> Path:
    import torch

    from mae.data.segmentation import pair_source
    from mae.segment_predict import load_run, palette, predict

    model, cfg, _ = load_run(str(run), "best", torch.device("cpu"))
    src = pair_source("fashion-mnist-scenes:test", train=False, reduce_zero_label=False)
    colours = palette(model.seg_classes)
    rows = []
    for i in range(count):
        canvas, mask = src.draw(i)
        img = torch.from_numpy(canvas).float().div(255)[None].expand(cfg.model.in_chans, -1, -1)
        pred = predict(model, cfg, img, torch.device("cpu"))
        truth = np.where(mask[..., None] == 255, 255, colours[np.minimum(mask, len(colours) - 1)])
        grey = np.repeat(canvas[..., None], 3, axis=2)
        gap = np.full((canvas.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([grey, gap, truth.astype(np.uint8), gap, colours[pred]], axis=1))
    sheet = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)]) for r in rows])
    big = Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    with_legend(big, list(src.classes) + ["ignore (255)"], [*map(tuple, colours), (255, 255, 255)]).save(out)
    return out


def with_legend(img: Image.Image, names: list[str], colours: list[tuple]) -> Image.Image:
    """The picture above a legend: a swatch and the name of each class, in two columns."""
    from PIL import ImageDraw

    rows, line = -(-len(names) // 2), 16
    sheet = Image.new("RGB", (img.width, img.height + rows * line + 8), "white")
    sheet.paste(img, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, (name, colour) in enumerate(zip(names, colours)):
        x, y = (i // rows) * img.width // 2 + 4, img.height + 4 + (i % rows) * line
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=colour, outline=(128, 128, 128))
        draw.text((x + 16, y + 1), name, fill=(0, 0, 0))
    return sheet


def report(runs: Path) -> str:
    lines = [
        "| run | encoder and head | mIoU | mAcc | aAcc | steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, what in RUNS.items():
        path = runs / name / "metrics.jsonl"
        evals = (
            [json.loads(x) for x in path.read_text().splitlines() if '"miou"' in x] if path.is_file() else []
        )
        if not evals:
            lines.append(f"| {name} | {what} | not run | | | |")
            continue
        e = evals[-1]
        lines.append(
            f"| {name} | {what} | {e['miou']:.1f} | {e['macc']:.1f} | {e['aacc']:.1f} | {e['step']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scenes", help="test scenes as an images/ + masks/ folder")
    s.add_argument("out", type=Path)
    s.add_argument("--count", type=int, default=8)
    f = sub.add_parser("figure", help="image | truth | prediction of test scenes")
    f.add_argument("run", type=Path)
    f.add_argument("out", type=Path)
    f.add_argument("--count", type=int, default=6)
    r = sub.add_parser("report", help="the markdown table of the four demo runs")
    r.add_argument("runs", type=Path)
    args = p.parse_args(argv)
    if args.what == "scenes":
        print(f"{write_scenes(args.out, args.count)} scenes in {args.out}/images and {args.out}/masks")
    elif args.what == "figure":
        print(f"wrote {figure(args.run, args.out, args.count)}")
    else:
        print(report(args.runs))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
