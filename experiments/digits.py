"""Continue pretraining on your own images: scikit-learn's bundled handwritten digits as the "own" domain.

    python experiments/digits.py data data/digits        # the 1,797 digits as 28 px PNG folders
    python experiments/digits.py report runs             # the table of docs/transfer.md from the runs

`data` writes DIR/train/<digit>/*.png (1,297 images) and DIR/test/<digit>/*.png (50 of each digit, 500): the
8x8 scans (values 0..16) scaled to 0..255 and resized to 28 px (bicubic), the size of the demo encoder's input,
an ordinary image folder as a user would bring one. `report` reads the runs the docs' commands leave under
RUNS (digits_{continued,scratch}, the fine-tunes and probes of those and of the demo encoder) and prints the
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TEST_PER_CLASS = 50
SIZE = 28
PRETRAININGS = {  # run-name suffix: what the encoder was pretrained on
    "continued": "Fashion-MNIST demo, continued on digits",
    "scratch": "digits only, from random init",
    "demo": "Fashion-MNIST demo only (no digits)",
}


def write_folders(out: Path, seed: int = 0) -> dict:
    """The digits as train/ and test/ class folders; returns the counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        for split, part in (("test", idx[:TEST_PER_CLASS]), ("train", idx[TEST_PER_CLASS:])):
            folder = out / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                img = Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8), "L")
                img.resize((SIZE, SIZE), Image.BICUBIC).save(folder / f"{i:04d}.png")
            counts[split] += len(part)
    return counts


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _last(run: Path, key: str) -> float | None:
    values = [r[key] for r in _rows(run) if key in r]
    return values[-1] if values else None


def report(runs: Path) -> str:
    """The markdown table: per pretraining, the final k-NN monitor, the fine-tuned and the probed top-1."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        "| pretraining | k-NN top-1 (monitor) | fine-tune top-1 | linear probe top-1 |",
        "| --- | --- | --- | --- |",
    ]
    for name, what in PRETRAININGS.items():
        knn = _last(runs / f"digits_{name}", "knn_top1")  # the demo-only encoder has no digits monitor
        ft = _last(runs / f"digits_finetune_{name}", "top1")
        lp = _last(runs / f"digits_linprobe_{name}", "top1")
        lines.append(f"| {what} | {fmt(knn)} | {fmt(ft)} | {fmt(lp)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="experiments/digits.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("data", help="write the digits as image folders").add_argument("dir", type=Path)
    sub.add_parser("report", help="print the table from the runs").add_argument("runs", type=Path)
    args = p.parse_args(argv)
    if args.command == "data":
        counts = write_folders(args.dir)
        print(
            f"wrote {counts['train']} training and {counts['test']} test images to {args.dir}/{{train,test}}"
        )
    else:
        print(report(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
