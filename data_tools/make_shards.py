"""Build webdataset shards from an image folder, a list/CSV file or a built-in dataset.

    python -m data_tools.make_shards SOURCE OUTPUT_DIR [--prefix train] [--samples-per-shard 10000]
        [--max-shard-bytes 1G] [--resize S] [--format keep|jpg|png] [--quality 95] [--seed 0 | --no-shuffle]
        [--workers N] [--progress | --no-progress] [--overwrite]

Writes OUTPUT_DIR/PREFIX-000000.tar ... (members KEY.jpg|png|tif|npy|..., KEY.cls when labelled, KEY.json with
the source path), dataset.json (the manifest the loader reads) and classes.json. Each shard is written as
PREFIX-NNNNNN.tar.partial and renamed when complete; progress is recorded in .make_shards.json after each
shard, so re-running the same command resumes an interrupted build, and a different command refuses. Until it
is complete the directory is refused as training data. OUTPUT_DIR may not be SOURCE or lie inside it; a
non-empty OUTPUT_DIR that holds no build of this command is refused unless --overwrite; one build at a time
writes into a directory.
"""

from __future__ import annotations

import argparse
import os
import sys


def _size(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    t = text.strip().lower().rstrip("b")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(n)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parse_args(argv):
    p = argparse.ArgumentParser(prog="make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "source",
        help="image folder (class subfolders = labels), list/CSV file (path[,label]) or fashion-mnist[:train|:test]",
    )
    p.add_argument("output_dir")
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--samples-per-shard", type=_positive, default=10000)
    p.add_argument("--max-shard-bytes", type=_size, default=10**9, help="e.g. 500M, 1G (default: 1G)")
    p.add_argument(
        "--resize", type=int, default=0, metavar="S", help="shrink so the shorter side is at most S (0: keep)"
    )
    p.add_argument(
        "--format", choices=("keep", "jpg", "png"), default="keep", help="keep original bytes or re-encode"
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--seed", type=int, default=0, help="shuffle the samples with this seed (default: 0)")
    p.add_argument(
        "--no-shuffle", dest="seed", action="store_const", const=None, help="keep the source order"
    )
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="parallel processes")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    p.add_argument(
        "--fmnist-dir", default=None, help="Fashion-MNIST idx directory (default: the Debian location)"
    )
    p.add_argument("--overwrite", action="store_true", help="delete an existing build in OUTPUT_DIR first")
    args = p.parse_args(argv)
    if args.resize < 0 or not 1 <= args.quality <= 100:
        p.error("--resize must be >= 0 and --quality in 1..100")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from data_tools.build_shards import UsageError, build
    from mae.runs.files import OutputError
    from mae.runs.lock import OutputDirBusy

    try:
        return build(args)
    except (UsageError, OutputError, OutputDirBusy) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "make_shards", "the shards written so far are kept: the same command finishes the build")


def __getattr__(name: str):
    """The machinery (data_tools.build_shards) by this module's name too, imported on first use: --help answers
    before torch is imported."""
    import importlib

    return getattr(importlib.import_module("data_tools.build_shards"), name)


if __name__ == "__main__":
    cli()
