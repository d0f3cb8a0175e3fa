"""Export weights for other libraries: the encoder to timm, the full model to (and from) Hugging Face.

    python -m mae.export SOURCE OUT_DIR --to timm   # model.safetensors + config.json, encoder only
    python -m mae.export SOURCE OUT_DIR --to hf     # a transformers ViTMAEForPreTraining directory
    python -m mae.export HF_DIR OUT_DIR --to mae    # back to our names: model.safetensors + config.json

SOURCE: a pretraining run's output_dir (its latest checkpoint), a checkpoint directory or file, a
reference-release `.pth` ({'model': state_dict}), a directory written by `--to mae`, or a Hugging Face
ViTMAE directory. The architecture comes from the run's config.yaml or the source's config.json; for a bare
file it is read from the tensor shapes, with the head counts of the standard sizes (or --num-heads).

The timm export holds any encoder (every size is in config.json's `model_args`) and loads offline with
    timm.create_model(config["architecture"], pretrained=True, num_classes=0, **config["model_args"],
                      pretrained_cfg_overlay=dict(file=".../model.safetensors", first_conv=None))
(`first_conv=None`: timm keeps the patch projection as it is for any channel count), or with
`timm.create_model("local-dir:OUT_DIR", pretrained=True)`.

OUT_DIR may not be SOURCE, lie inside it or hold it. An OUT_DIR holding other files is refused unless --overwrite;
one holding mae-export's earlier output has it replaced whole. The files appear together when complete.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("hf", "mae", "timm")


# ----------------------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="mae-export", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "source", help="run output_dir, checkpoint, reference .pth, or Hugging Face ViTMAE directory"
    )
    p.add_argument("out_dir", help="directory to write")
    p.add_argument("--to", required=True, choices=FORMATS, help="target format")
    p.add_argument(
        "--num-heads", type=int, help="encoder heads (only for bare weight files of unusual widths)"
    )
    p.add_argument("--decoder-num-heads", type=int, help="decoder heads (likewise)")
    p.add_argument(
        "--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None, help="HF config flag"
    )
    p.add_argument("--mask-ratio", type=float, help="HF config mask_ratio (default: the run's, else 0.75)")
    p.add_argument("--overwrite", action="store_true", help="write into an OUT_DIR that holds other files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from mae.runs.files import OutputDir
    from mae.weights.convert import WRITERS, ExportError, describe_source

    try:
        sd, args, extras = describe_source(opts.source, opts)
        with OutputDir(opts.out_dir, "mae-export", {"SOURCE": opts.source}, overwrite=opts.overwrite) as out:
            staging = out.staging()  # the writers (transformers' save_pretrained among them) fill a folder
            WRITERS[opts.to](sd, args, extras, staging)
            out.adopt(staging)
            out.commit()
    except (ExportError, FileNotFoundError, ValueError, KeyError) as e:
        msg = f"missing tensor {e}" if isinstance(e, KeyError) else str(e)
        print(f"mae-export: error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {opts.to} weights to {opts.out_dir}")
    return 0


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "mae-export")


if __name__ == "__main__":
    cli()
