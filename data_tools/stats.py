"""Per-channel mean and std of a data source, printed as the data.mean / data.std lines of a recipe.

    python -m data_tools.stats SOURCE [--in-chans N] [--samples 10000] [--seed 0] [--workers N]
        [--json PATH] [--progress | --no-progress]                                    # also: mae-data-stats

SOURCE is anything data.train takes: an image folder, shards (a directory, a brace pattern, ...),
fashion-mnist. Every sample is decoded as the loaders decode it, in the scale they feed the model before
normalisation: images converted to --in-chans channels and divided by 255; TIFF / .npy bands uint8 / 255,
uint16 / 65535, floats as stored (mae.data.bands). The statistics are over all pixels of whole samples
(before any crop or resize) of a seeded random subset of --samples of them (every sample of a smaller source).
Shards cannot be read at random: the subset is spread over shards taken in a seeded order, at most
ceil(samples / 16) from each (positions drawn at random within a shard whose size is known, else its first
ones). Unreadable samples are skipped and counted; TIFF / .npy samples of another band count than the
others are an error naming the counts found (a model reads one).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mae-data-stats", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="anything data.train takes: image folder, shards, fashion-mnist, ...")
    p.add_argument(
        "--in-chans", type=int, default=0, help="channels (model.in_chans); 0 = from the first sample"
    )
    p.add_argument("--samples", type=int, default=10000, help="samples to read (0 = all; default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subset (default: 0)")
    p.add_argument(
        "--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="parallel processes"
    )
    p.add_argument(
        "--json", default=None, metavar="PATH", help="also write the statistics (full precision) as JSON"
    )
    p.add_argument(
        "--fmnist-dir", default="", help="Fashion-MNIST idx directory (default: the Debian location)"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    args = p.parse_args(argv)
    if args.in_chans < 0 or args.samples < 0:
        p.error("--in-chans and --samples must be >= 0")
    import numpy as np

    from data_tools.channel_stats import compute, recipe_value
    from mae.data import DataError
    from mae.runs.files import OutputError, atomic_text, check_not_over_inputs

    try:
        if args.json:
            check_not_over_inputs(args.json, {"SOURCE": args.source}, flag="--json")
        m, planned, total, in_chans = compute(args)
    except (DataError, OutputError) as e:
        print(f"mae-data-stats: error: {e}", file=sys.stderr)
        return 2
    if (
        m.other_bands
    ):  # statistics of one band count would describe part of the data and train none of the rest
        found = ", ".join(f"{n} with {b}" for b, n in sorted(m.other_bands.items()))
        print(f"mae-data-stats: error: {args.source} mixes band counts: {m.samples} readable sample(s) with "
              f"{in_chans}, {found}; give the files one band count (model.in_chans reads one)",
              file=sys.stderr)  # fmt: skip
        return 2
    if m.samples == 0:
        print(f"mae-data-stats: error: no readable sample among {planned} ({m.first_bad})", file=sys.stderr)
        return 1
    mean, std = m.mean.tolist(), m.std().tolist()
    of = f" of {total}" if total is not None else ""
    skipped = f"; {m.bad} unreadable skipped (first: {m.first_bad})" if m.bad else ""
    print(
        f"{args.source}: {m.samples}{of} samples (seed {args.seed}), {in_chans} channel{'s' * (in_chans != 1)}, {m.n} pixels{skipped}"
    )
    for k in np.flatnonzero(m.std() == 0):
        print(f"warning: channel {k} is constant (std 0); data.std must be positive", file=sys.stderr)
    print(f"data.mean: [{', '.join(recipe_value(v) for v in mean)}]")
    print(f"data.std: [{', '.join(recipe_value(v) for v in std)}]")
    if args.json:
        import json

        atomic_text(args.json, json.dumps({"source": args.source, "samples": m.samples, "bad": m.bad,
                                           "pixels": m.n, "in_chans": in_chans, "mean": mean, "std": std},
                                          indent=1))  # fmt: skip
    return 0


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "mae-data-stats")


def __getattr__(name: str):
    """The machinery (data_tools.channel_stats) by this module's name too, imported on first use: --help answers
    before torch is imported."""
    import importlib

    return getattr(importlib.import_module("data_tools.channel_stats"), name)


if __name__ == "__main__":
    cli()
