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
from dataclasses import dataclass
from pathlib import Path

import torch

POOLS = ("mean", "cls", "tokens")
PRECISIONS = ("auto", "fp32", "bf16")


class EmbedError(ValueError):
    """A user-facing problem with the source, the data or the options (one line, exit code 2)."""


@dataclass
class Preprocess:
    """The evaluation transform: resize the shorter side to img_size / crop_pct (bicubic), centre crop
    img_size, convert to in_chans channels, normalise with mean / std. `origin` says where each came from."""

    img_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    crop_pct: float
    origin: str = ""

    def describe(self) -> str:
        from mae.data.transforms import eval_crop_pct

        crop = eval_crop_pct(self.crop_pct, self.img_size)
        return (
            f"{self.img_size} px (resize {int(self.img_size / crop)}, centre crop), {self.in_chans} channel(s), "
            f"mean {self.mean} std {self.std}" + (f" ({self.origin})" if self.origin else "")
        )


class Embedder:
    """A pretrained ViT encoder as a feature extractor: `embedder(images)` -> (N, D) float32 on the CPU
    ((N, L, D) with pool="tokens"). Images: a normalised (N, C, H, W) tensor as the eval loaders give, or PIL
    images / file paths, which go through `preprocess` (the source's evaluation transform)."""

    def __init__(self, model, preprocess: Preprocess, pool: str = "mean", device: str | torch.device = "auto",
                 precision: str = "auto") -> None:  # fmt: skip
        if pool not in POOLS:
            raise EmbedError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.device = resolve_device(device)
        self.precision = resolve_embed_precision(precision, self.device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.spec, self.pool = preprocess, pool
        self._transform = None

    @classmethod
    def from_pretrained(cls, source: str | Path, *, pool: str = "mean", layer: int | None = None,
                        device: str | torch.device = "auto", precision: str = "auto", img_size: int | None = None,
                        in_chans: int | None = None, mean: list[float] | None = None,
                        std: list[float] | None = None, crop_pct: float | None = None,
                        num_heads: int | None = None, log=None) -> Embedder:  # fmt: skip
        """Any source model.init takes, through mae.adapt (another img_size or in_chans adapts the weights as
        pretraining does: position table, patch projection). `layer`: block K (1..depth, negative from the
        end; None: the last). `log` gets the adaptation notes."""
        model, spec = load_encoder(source, img_size, in_chans, mean, std, crop_pct, num_heads, log)
        truncate(model, layer)
        return cls(model, spec, pool, device, precision)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def transform(self):
        """PIL image (in_chans channels) or bands tensor -> normalised float32 (C, img_size, img_size)."""
        if self._transform is None:
            from mae.data import eval_transform
            from mae.data.transforms import resolve_norm

            s = self.spec
            self._transform = eval_transform(s.img_size, *resolve_norm(s.mean, s.std, s.in_chans), s.crop_pct)
        return self._transform

    def preprocess(self, images) -> torch.Tensor:
        """PIL images or image / TIFF / .npy file paths -> (N, C, S, S) normalised, as the eval loaders make."""
        from PIL import Image

        from mae.data import convert_image
        from mae.data.bands import decode_sample, ext_of

        out = []
        for im in [images] if isinstance(images, (Image.Image, str, Path)) else images:
            if isinstance(im, (str, Path)):
                im = decode_sample(Path(im).read_bytes(), ext_of(str(im)), self.spec.in_chans)
            elif isinstance(im, Image.Image):
                im = convert_image(im, self.spec.in_chans)
            out.append(self.transform(im))
        return torch.stack(out)

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        x = x.unsqueeze(0) if x.ndim == 3 else x
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            # the last block kept (truncate), through the final norm: tokens (N, L, D), cls (N, 1, D)
            ((tokens, cls),) = self.model.forward_intermediates(
                x.to(self.device, non_blocking=True), 1, return_prefix_tokens=True, norm=True,
                output_fmt="NLC", intermediates_only=True,
            )  # fmt: skip
            feats = {"cls": cls[:, 0], "mean": tokens.mean(dim=1), "tokens": tokens}[self.pool]
            feats = self.model.fc_norm(feats)  # a global-pool classifier's norm (identity otherwise)
        return feats.float().cpu()


# ----------------------------------------------------------------------------------------------------------
# the encoder and its transform from a source


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EmbedError(f"device {device} asked for, but CUDA is not available")
    return device


def resolve_embed_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on CUDA, fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise EmbedError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


ENCODER_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")


def load_encoder(source, img_size=None, in_chans=None, mean=None, std=None, crop_pct=None, num_heads=None,
                 log=None):  # fmt: skip
    """(VisionTransformer with the source's encoder in eval mode, its Preprocess). Raises EmbedError."""
    from mae.adapt import ArchitectureMismatch, check_architecture, load_weights, read_any
    from mae.weights import read_recorded

    if not os.path.exists(source):
        raise EmbedError(f"SOURCE {source}: no such file or directory")
    try:
        sd, arch, _ = read_any(source)
        extras = read_recorded(source)[1]
    except (ValueError, OSError, KeyError) as e:
        raise EmbedError(f"SOURCE {source} is not model weights: {_first_line(e)}") from None
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise EmbedError(f"SOURCE {source} holds no ViT encoder (no patch_embed.proj.weight / pos_embed)")
    if arch is None:
        from mae.export import ExportError, infer_mae_args

        try:
            encoder = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
            arch = infer_mae_args(encoder, num_heads)
        except (ExportError, KeyError) as e:
            raise EmbedError(f"SOURCE {source}: {_first_line(e)}") from None
    elif num_heads is not None and num_heads != arch.get("num_heads"):
        raise EmbedError(
            f"--num-heads {num_heads}: SOURCE {source} records num_heads={arch.get('num_heads')}"
        )
    spec = _preprocess(source, arch, extras, img_size, in_chans, mean, std, crop_pct)
    kw = {k: arch[k] for k in ENCODER_ARGS if k in arch}
    kw.update(img_size=spec.img_size, in_chans=spec.in_chans)
    # a classifier fine-tuned with global pooling has fc_norm in place of the final norm (timm's pre-logits)
    global_pool = "fc_norm.weight" in sd and "norm.weight" not in sd
    from mae.models import VisionTransformer

    model = VisionTransformer(num_classes=0, global_pool=global_pool, **kw)
    try:
        check_architecture(model, sd, arch)
        result = load_weights(model, sd, keep_head=False)
    except (ArchitectureMismatch, ValueError) as e:
        raise EmbedError(f"SOURCE {source} does not load as a ViT encoder: {_first_line(e)}") from None
    if result.missing:
        raise EmbedError(f"SOURCE {source} lacks encoder weights {', '.join(result.missing[:3])}")
    for note in result.notes:
        (log or print)(f"  {note}")
    return model.eval(), spec


def _preprocess(source, arch, extras, img_size, in_chans, mean, std, crop_pct) -> Preprocess:
    """The recorded transform, each flag replacing its value; defaults (recipes/base.yaml's mean / std, the
    reference's crop) where neither says. Checked like a recipe's data.mean / data.std."""
    from mae.data import DataError
    from mae.data.transforms import resolve_norm

    img = arch["img_size"]
    img = img if isinstance(img, int) else (img[0] if img[0] == img[1] else None)
    recorded = dict(img_size=img, in_chans=arch.get("in_chans"), mean=extras.get("mean"), std=extras.get("std"),
                    crop_pct=extras.get("crop_pct"))  # fmt: skip
    flags = dict(img_size=img_size, in_chans=in_chans, mean=mean, std=std, crop_pct=crop_pct)
    defaults = dict(mean=base_data()["mean"], std=base_data()["std"], crop_pct=0.0)
    values, said = {}, []
    for key, rec in recorded.items():
        if flags[key] is not None:
            values[key] = flags[key]
            if rec is not None and rec != flags[key]:
                said.append(f"--{key.replace('_', '-')} {flags[key]} for the recorded {rec}")
        elif rec is not None:
            values[key] = rec
        elif key in defaults:
            values[key] = defaults[key]
            said.append(f"{key} default {defaults[key]}")
        else:
            raise EmbedError(f"SOURCE {source} records no square image size; pass --img-size")
    try:
        resolve_norm(values["mean"], values["std"], values["in_chans"])
    except DataError as e:
        msg = str(e).replace("data.mean", "mean").replace("data.std", "std")
        raise EmbedError(f"{msg} (pass --mean / --std)") from None
    where = "recorded by the source" if any(v is not None for v in recorded.values()) else "flags"
    return Preprocess(**values, origin="; ".join([where, *said]))


def base_data() -> dict:
    """recipes/base.yaml's data section: every data key's default."""
    from mae.config import RECIPES_DIR, _load_yaml

    return _load_yaml(RECIPES_DIR / "base.yaml")["data"]


def truncate(model, layer: int | None) -> int:
    """Keep blocks 1..K of the encoder (its final norm stays), as timm's prune_intermediate_layers: the last
    block's features are then block K's. Returns K."""
    depth = len(model.blocks)
    if layer is None:
        return depth
    k = layer + depth + 1 if layer < 0 else layer
    if not 1 <= k <= depth:
        raise EmbedError(f"--layer {layer}: the encoder has {depth} blocks (1..{depth}, or -1 for the last)")
    model.blocks = model.blocks[:k]
    return k


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    from mae.embed_run import run

    return run(opts)


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
