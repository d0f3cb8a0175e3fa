"""Inspect and verify webdataset shards: every member decoded, counts checked against the manifest.

    python -m data_tools.verify_shards OUTPUT_DIR [--workers N] [--json REPORT.json]

Reports missing or extra shards, samples per shard against the manifest, corrupt / truncated members and
samples without an image or with a bad label (by shard and key), unfinished builds (.partial files), the
label histogram, an image-size histogram and the per-channel mean/std (TIFF / .npy members: per band, in
the loader's scale, and an error when their band counts differ). Exit code 1 when anything is wrong, 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="verify_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="a directory written by make_shards (or any directory of .tar shards)")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    args = p.parse_args(argv)
    if not os.path.isdir(args.directory):
        print(f"verify_shards: error: {args.directory!r} is not a directory", file=sys.stderr)
        return 2
    if not any(f.endswith((".tar", ".partial", ".json")) for f in os.listdir(args.directory)):
        print(f"verify_shards: error: {args.directory!r} holds no shards and no manifest", file=sys.stderr)
        return 2
    from data_tools.check_shards import print_report, verify
    from mae.runs.files import OutputError, atomic_text, check_not_over_inputs

    try:
        if args.json:  # a report inside the shard directory would sit among the data it describes
            check_not_over_inputs(args.json, {"DIRECTORY": args.directory}, flag="--json")
    except OutputError as e:
        print(f"verify_shards: error: {e}", file=sys.stderr)
        return 2
    rep = verify(args.directory, args.workers)
    print_report(rep)
    if args.json:
        atomic_text(args.json, json.dumps(rep, indent=1))
    return 1 if rep["errors"] else 0


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "verify_shards")


def __getattr__(name: str):
    """The machinery (data_tools.check_shards) by this module's name too, imported on first use: --help answers
    before torch is imported."""
    import importlib

    return getattr(importlib.import_module("data_tools.check_shards"), name)


if __name__ == "__main__":
    cli()
