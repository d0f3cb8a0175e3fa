"""Embeddings: the features of a pretrained encoder for any data set, one vector per image.

    mae-embed runs/demo fashion-mnist:test out/emb          # out/emb/embeddings.npy + index.csv
    mae-embed runs/demo fashion-mnist out/emb --knn fashion-mnist:test --neighbours 5
    accelerate launch -m mae.embed SOURCE DATA OUT_DIR      # several processes, the same two files

SOURCE: anything model.init takes (a run's output_dir, a checkpoint, a reference full or encoder-only .pth,
a Hugging Face ViTMAE directory, a timm export). DATA: any data source (an image folder, shards,
fashion-mnist[:test], folders of TIFF / .npy bands); a built-in name without a split is its training split.

The encoder sees every patch: no masking. The evaluation transform (image size, resize and centre crop,
mean / std, channels) is the one the source records (a run's config.yaml, an export's config.json), else
the flags'; a flag given for a recorded value replaces it and says so. The same command writes the same bytes.

OUT_DIR may not be SOURCE, DATA or VAL_DATA, lie inside one or hold one. An OUT_DIR holding other files is
refused unless --overwrite; one holding mae-embed's earlier output has it replaced whole (a neighbours.png the
new command does not draw included). The files appear together at the end; one run at a time writes there.

--pool mean (default): the mean of the patch tokens after the final norm, the feature the pretraining's k-NN
monitor scores (so --knn reproduces its figure), the reference fine-tuning's global average pooling and what
Hugging Face's ViTMAEModel gives as `last_hidden_state[:, 1:].mean(1)` with mask_ratio=0. --pool cls: the cls
token after the final norm, the linear probe's input (the reference probe's choice; neither read-out wins on
every encoder: compare them with --knn). --pool tokens: every patch token, (N, L, D) in row-major patch order.
--layer K: the output of block K (1..depth; -1 the last) through the final norm.

Library use (no accelerate, no wandb):
    from mae.embed import Embedder
    embedder = Embedder.from_pretrained("runs/demo")
    vectors = embedder([Image.open("photo.jpg")])         # (1, D) float32; or normalised (N, C, H, W) tensors
"""

from __future__ import annotations

import argparse
import os
import sys

from mae.weights.encoder import POOLS, PRECISIONS, Embedder, EmbedError, Preprocess

__all__ = ["Embedder", "EmbedError", "Preprocess", "main"]


# ----------------------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.strip("[]").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="mae-embed", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    p.add_argument(
        "source", help="run output_dir, checkpoint, reference .pth, Hugging Face or timm directory"
    )
    p.add_argument(
        "data", help="image folder, shards, fashion-mnist[:test], synthetic[:test], TIFF / .npy folder"
    )
    p.add_argument("out_dir", help="directory for embeddings.npy and index.csv")
    p.add_argument("--pool", choices=POOLS, default="mean", help="read-out (default: %(default)s)")
    p.add_argument("--layer", type=int, help="block K (1..depth, -1 = last; default: the last)")
    p.add_argument(
        "--batch-size", type=_positive, default=256, help="images per forward (default: %(default)s)"
    )
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="of embeddings.npy")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                   help="data loader processes per process (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-samples", type=int, default=0,
                   help="embed the first N of DATA's class-balanced order (the k-NN monitor's bank); 0 = all")  # fmt: skip
    p.add_argument("--knn", metavar="VAL_DATA", help="report the k-NN top-1 of VAL_DATA against DATA")
    p.add_argument(
        "--knn-k", type=_positive, help="neighbours that vote (default: the run's log.knn_k, else 20)"
    )
    p.add_argument("--knn-max-samples", type=int, default=0, help="the first N of VAL_DATA's balanced order")
    p.add_argument(
        "--neighbours", type=_positive, metavar="K", help="write neighbours.png: queries + K nearest"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (off anyway when not a tty)")
    p.add_argument("--overwrite", action="store_true", help="write into an OUT_DIR that holds other files")
    g = p.add_argument_group("transform and architecture, where the source records none (or to replace it)")
    g.add_argument("--img-size", type=_positive)
    g.add_argument("--in-chans", type=_positive)
    g.add_argument("--mean", type=_floats, help="e.g. 0.485,0.456,0.406")
    g.add_argument("--std", type=_floats)
    g.add_argument("--crop-pct", type=float, help="resize to img_size / crop_pct, centre crop; 0 = reference")
    g.add_argument("--num-heads", type=_positive, help="encoder heads of a bare file of a non-standard width")
    opts = p.parse_args(argv)
    if opts.pool == "tokens" and (opts.knn or opts.neighbours):
        p.error("--knn and --neighbours compare one vector per image: use --pool mean or cls")
    if opts.max_samples < 0 or opts.knn_max_samples < 0 or opts.workers < 0:
        p.error("--max-samples, --knn-max-samples and --workers must be >= 0")
    if opts.knn_max_samples and not opts.knn:
        p.error("--knn-max-samples applies to --knn VAL_DATA, which is not given")
    if opts.knn_k and not opts.knn:
        p.error("--knn-k applies to --knn VAL_DATA, which is not given")
    if opts.crop_pct is not None and not 0 <= opts.crop_pct <= 1:
        p.error(f"--crop-pct must be in [0, 1], got {opts.crop_pct}")
    return opts


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from mae.infer.embed import run

    return run(opts)


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "mae-embed")


if __name__ == "__main__":
    cli()
