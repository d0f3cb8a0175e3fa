"""The segmentation demo's evidence: test scenes as a folder, the picture, and the table of docs/segmentation.md.

    python experiments/segment_demo.py scenes scenes/ --count 8          # test scenes as images/ + masks/
    python experiments/segment_demo.py figure runs/segment_demo docs/segment_demo.png
    python experiments/segment_demo.py report runs                       # the table, from the runs' metrics
    python experiments/segment_demo.py tokens runs/demo random           # what each block's tokens know

`scenes` writes DIR/images/<i>.png and DIR/masks/<i>.png for the first COUNT fashion-mnist-scenes test scenes
(`--split train`: training scenes): the folder layout mae/segment.py reads, images for mae-segment-predict,
and unlabelled images for pretraining on the scenes. `figure` shows COUNT test scenes as rows of
image | truth | prediction (classes coloured, ignore in white) above the colour legend. `report` reads the
runs the docs' commands leave under RUNS and prints their last evaluation as a markdown table. `tokens` asks
of each encoder (a run, or `random`: the first one's architecture, freshly initialised) how well a linear
classifier on one block's patch tokens tells which garment a token lies on, for every block: once for
garments alone in the middle of the 56 px canvas, once in the scenes (2-4 garments); multinomial logistic
regression on the garment tokens of TRAIN training images, accuracy on those of TEST test images.
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


def write_scenes(out: Path, count: int, split: str = "test") -> int:
    from mae.data.segmentation import pair_source

    src = pair_source(f"fashion-mnist-scenes:{split}", train=split == "train", reduce_zero_label=False)
    count = min(count, len(src))
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
    from mae.eval.figures import palette
    from mae.infer.segment import load_run, predict

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


def token_labels(masks: np.ndarray, patch: int) -> np.ndarray:
    """(N, H, W) class-id masks -> (N, H/p * W/p) the most frequent id of each patch, 255 (ignore) left out;
    -1 where a patch is all ignore."""
    n, h, w = masks.shape
    cells = masks.reshape(n, h // patch, patch, w // patch, patch).transpose(0, 1, 3, 2, 4)
    cells = cells.reshape(n, -1, patch * patch).astype(np.int64)
    ids = np.unique(cells[cells != 255])
    if not len(ids):
        return np.full(cells.shape[:2], -1)
    counts = np.stack([(cells == c).sum(-1) for c in ids], -1)
    return np.where(counts.max(-1) > 0, ids[counts.argmax(-1)], -1)


def token_sets(count: int, split: str, size: int = 56) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"alone": ..., "scenes": ...}: (images uint8 (N, size, size), masks) of the split's first `count`."""
    from mae.data.segmentation import garment_mask, pair_source

    src = pair_source(f"fashion-mnist-scenes:{split}", train=split == "train", reduce_zero_label=False)
    g = src.garments.shape[1]
    at = (size - g) // 2
    alone = np.zeros((count, size, size), np.uint8)
    alone[:, at : at + g, at : at + g] = src.garments[:count]
    alone_masks = np.zeros_like(alone)
    alone_masks[:, at : at + g, at : at + g] = garment_mask(
        src.garments[:count], src.labels[:count, None, None]
    )
    scenes = [src.draw(i) for i in range(count)]
    return {
        "alone": (alone, alone_masks),
        "scenes": (np.stack([c for c, _ in scenes]), np.stack([m for _, m in scenes])),
    }


def block_tokens(model, images: np.ndarray, mean: float, std: float) -> list:
    """The patch tokens (N, L, D) after each block of a VisionTransformer, for uint8 (N, H, W) images."""
    import torch

    x = (torch.from_numpy(images).float()[:, None] / 255 - mean) / std
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 250):
            t = model.patch_embed(x[i : i + 250]) + model.pos_embed[:, 1:]
            t = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(len(t), -1, -1), t], 1)
            feats = []
            for block in model.blocks:
                t = block(t)
                feats.append(t[:, 1:])
            out.append(feats)
    return [torch.cat(per_block) for per_block in zip(*out)]


def linear_probe(train_x, train_y, test_x, test_y, l2: float = 1e-3) -> float:
    """Top-1 % of a multinomial logistic regression (standardised inputs, L-BFGS) fitted on (train_x, train_y)."""
    import torch
    import torch.nn.functional as F

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, train_y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return 100.0 * ((b @ w + bias).argmax(1) == test_y).float().mean().item()


def tokens(encoders: list[str], train: int, test: int) -> str:
    import torch

    from mae.models import VisionTransformer
    from mae.weights.encoder import load_encoder

    loaded = {n: load_encoder(n, img_size=56, log=lambda *a: None) for n in encoders if n != "random"}
    if not loaded:
        raise SystemExit("tokens: name at least one encoder besides random")
    first, spec = next(iter(loaded.values()))
    if "random" in encoders:  # the first encoder's architecture, freshly initialised (seed 0)
        torch.manual_seed(0)
        loaded["random"] = VisionTransformer(
            img_size=56, patch_size=first.patch_embed.patch_size, in_chans=first.in_chans, num_classes=0,
            embed_dim=first.embed_dim, depth=first.depth, num_heads=first.blocks[0].attn.num_heads,
        ).eval(), spec  # fmt: skip
    sets = {"train": token_sets(train, "train"), "test": token_sets(test, "test")}
    blocks = " | ".join(f"block {i + 1}" for i in range(first.depth))
    lines = [f"| encoder | garments | {blocks} |", "| --- | --- |" + " --- |" * first.depth]
    for name in encoders:
        model, spec = loaded[name]
        patch = model.patch_embed.patch_size[0]
        for kind in ("alone", "scenes"):
            feats, labels = {}, {}
            for split, data in sets.items():
                images, masks = data[kind]
                y = torch.from_numpy(token_labels(masks, patch)).reshape(-1)
                on = y >= 1  # the tokens on a garment: which garment is it
                labels[split] = y[on] - 1
                tokens_ = block_tokens(model, images, spec.mean[0], spec.std[0])
                feats[split] = [f.reshape(-1, f.shape[-1])[on] for f in tokens_]
            acc = [
                linear_probe(a, labels["train"], b, labels["test"])
                for a, b in zip(feats["train"], feats["test"])
            ]
            lines.append(f"| {name} | {kind} | {' | '.join(f'{v:.1f}' for v in acc)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scenes", help="test scenes as an images/ + masks/ folder")
    s.add_argument("out", type=Path)
    s.add_argument("--count", type=int, default=8)
    s.add_argument("--split", choices=("train", "test"), default="test")
    f = sub.add_parser("figure", help="image | truth | prediction of test scenes")
    f.add_argument("run", type=Path)
    f.add_argument("out", type=Path)
    f.add_argument("--count", type=int, default=6)
    r = sub.add_parser("report", help="the markdown table of the demo runs")
    r.add_argument("runs", type=Path)
    t = sub.add_parser("tokens", help="per block: does a token know which garment it lies on (linear probe)")
    t.add_argument("encoders", nargs="+", help="runs (or checkpoints, exports) and/or `random`")
    t.add_argument("--train", type=int, default=1500, help="training images per setting (default 1500)")
    t.add_argument("--test", type=int, default=500, help="test images per setting (default 500)")
    args = p.parse_args(argv)
    if args.what == "scenes":
        n = write_scenes(args.out, args.count, args.split)
        print(f"{n} {args.split} scenes in {args.out}/images and {args.out}/masks")
    elif args.what == "figure":
        print(f"wrote {figure(args.run, args.out, args.count)}")
    elif args.what == "report":
        print(report(args.runs))
    else:
        print(tokens(args.encoders, args.train, args.test))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
