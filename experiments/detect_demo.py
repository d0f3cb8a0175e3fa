"""The detection demo's evidence: scenes as a COCO dataset, the picture of predictions, the runs' table.

    python experiments/detect_demo.py scenes instances/ --count 8        # test scenes: annotations.json + images/
    python experiments/detect_demo.py figure runs/detect_demo docs/detect_demo.png --score-thresh 0.3
    python experiments/detect_demo.py report runs                        # the table, from the runs' eval.json

`scenes` writes OUT/annotations.json (COCO instances: polygons of nothing, RLE masks, boxes, areas) and
OUT/images/<i>.png for COUNT fashion-mnist-instances scenes from FIRST on (`--split train`: training scenes), the
layout mae/detect.py and mae-detect-predict read. `figure` shows COUNT test scenes as rows of
image | truth | prediction (masks and boxes coloured by class, names and scores). `report` prints the box and mask
AP of the runs the docs' commands leave under RUNS as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

RUNS = {
    "detect_demo": "Mask R-CNN from the demo MAE encoder",
    "detect_demo_scratch": "Mask R-CNN from random initialisation",
}


def write_scenes(out: Path, count: int, split: str = "test", first: int = 0) -> int:
    """Scenes first .. first + count - 1 of fashion-mnist-instances:SPLIT as a COCO dataset in OUT (its
    annotations.json and images/); image ids are the scenes' indices + 1, as the built-in source numbers them."""
    from mae.data.detection import det_source

    src = det_source(f"fashion-mnist-instances:{split}", train=split == "train")
    indices = range(first, min(first + count, len(src)))
    (out / "images").mkdir(parents=True, exist_ok=True)
    data = src.coco_dataset(indices, save_to=out / "images")
    (out / "annotations.json").write_text(json.dumps(data))
    return len(indices)


def figure(run: Path, out: Path, count: int, thresh: float = 0.5) -> Path:
    """COUNT test scenes: image | truth | prediction (score >= thresh), one row each, upscaled 4x."""
    import torch
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from mae.data.detection import det_source
    from mae.infer.detect import load_run, predict

    model, cfg, categories, _ = load_run(str(run), "best", torch.device("cpu"))
    names = [c["name"] for c in categories]
    src = det_source("fashion-mnist-instances:test", train=False)
    colours = _colours(len(names))

    def draw(canvas: np.ndarray, boxes, labels, masks, scores=None) -> np.ndarray:
        big = (
            torch.from_numpy(np.kron(canvas, np.ones((4, 4), np.uint8)))[None].expand(3, -1, -1).contiguous()
        )
        if len(boxes):
            masks = torch.nn.functional.interpolate(masks[:, None].float(), scale_factor=4)[:, 0] > 0.5
            cols = [colours[int(c) - 1] for c in labels]
            big = draw_segmentation_masks(big, masks, alpha=0.45, colors=cols)
            text = [names[int(c) - 1] + ("" if scores is None else f" {s:.2f}") for c, s in
                    zip(labels, scores if scores is not None else [None] * len(labels))]  # fmt: skip
            big = draw_bounding_boxes(big, boxes * 4, text, colors=cols, width=1)
        return big.permute(1, 2, 0).numpy()

    rows = []
    for i in range(count):
        canvas, inst = src.draw(i)
        img = torch.from_numpy(canvas).float().div(255)[None].expand(cfg.model.in_chans, -1, -1)
        det = predict(model, cfg, img, torch.device("cpu"))
        keep = det["scores"] >= thresh
        truth = draw(canvas, inst.boxes, inst.labels, inst.masks)
        pred = draw(
            canvas, det["boxes"][keep], det["labels"][keep], det["masks"][keep, 0] > 0.5, det["scores"][keep]
        )
        gap = np.full((truth.shape[0], 4, 3), 255, np.uint8)
        plain = draw(canvas, [], [], None)
        rows.append(np.concatenate([plain, gap, truth, gap, pred], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    Image.fromarray(np.concatenate(rows[:-1])).save(out)
    return out


def _colours(n: int) -> list[tuple[int, int, int]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [tuple(int(255 * c) for c in cmap(i % 10)[:3]) for i in range(n)]


def report(runs: Path) -> str:
    lines = [
        "| run | encoder | box AP | box AP50 | box AP75 | mask AP |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, what in RUNS.items():
        f = runs / name / "eval.json"
        if not f.is_file():
            continue
        e = json.loads(f.read_text())
        lines.append(f"| `{name}` | {what} | {e['box_ap']:.1f} | {e['box_ap50']:.1f} | {e['box_ap75']:.1f} | "
                     f"{e['mask_ap']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scenes", help="scenes as a COCO dataset")
    s.add_argument("out", type=Path)
    s.add_argument("--count", type=int, default=8)
    s.add_argument("--first", type=int, default=0)
    s.add_argument("--split", choices=("train", "test"), default="test")
    f = sub.add_parser("figure", help="image | truth | prediction of test scenes")
    f.add_argument("run", type=Path)
    f.add_argument("out", type=Path)
    f.add_argument("--count", type=int, default=6)
    f.add_argument("--score-thresh", type=float, default=0.5, help="the least score drawn (default 0.5)")
    r = sub.add_parser("report", help="the runs' table")
    r.add_argument("runs", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "scenes":
        n = write_scenes(args.out, args.count, args.split, args.first)
        print(f"{n} {args.split} scenes in {args.out}: annotations.json and images/")
    elif args.cmd == "figure":
        print(f"wrote {figure(args.run, args.out, args.count, args.score_thresh)}")
    else:
        print(report(args.runs))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
