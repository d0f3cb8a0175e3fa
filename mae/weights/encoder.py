"""A pretrained ViT encoder as a feature extractor, for library use and for `mae-embed`: any source model.init
takes, adapted to the requested image size and channels, with the evaluation transform the source records.

    from mae.embed import Embedder
    embedder = Embedder.from_pretrained("runs/demo")
    vectors = embedder([Image.open("photo.jpg")])         # (1, D) float32; or normalised (N, C, H, W) tensors
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mae.device import resolve_device

if TYPE_CHECKING:
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
        self.device = resolve_device(device, EmbedError)
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
        """Any source model.init takes, through mae.weights.adapt (another img_size or in_chans adapts the weights as
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
        import torch

        return torch.stack(out)

    def __call__(self, images) -> torch.Tensor:
        import torch

        x = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        x = x.unsqueeze(0) if x.ndim == 3 else x
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"),
        ):
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
    from mae.weights.adapt import ArchitectureMismatch, check_architecture, load_weights, read_any
    from mae.weights.formats import read_recorded

    if not os.path.exists(source):
        raise EmbedError(f"SOURCE {source}: no such file or directory")
    try:
        sd, arch, _ = read_any(source)
        extras = read_recorded(source)[1]
    except (ValueError, OSError, KeyError) as e:
        raise EmbedError(f"SOURCE {source} is not model weights: {_first_line(e)}") from None
    from mae.weights.convert import NOT_A_VIT, is_detection

    if is_detection(sd):
        raise EmbedError(
            f"SOURCE {source} is {NOT_A_VIT}; embed the encoder the detection run started from (its model.init)"
        )
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise EmbedError(f"SOURCE {source} holds no ViT encoder (no patch_embed.proj.weight / pos_embed)")
    if arch is None:
        from mae.weights.convert import ExportError, infer_mae_args

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
    if "norm.weight" not in sd and "fc_norm.weight" not in sd and "patch_embed.proj.weight" in sd:
        # an encoder trained without a final norm (a segmentation run's: its heads read the blocks' outputs as
        # they are): its features are those, not the output of a norm it never trained
        from torch import nn

        model.norm = nn.Identity()
        (log or print)(
            "  the source has no final norm (a segmentation encoder): features of the last block as is"
        )
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
    from mae.config import RECIPES_DIR, load_yaml

    return load_yaml(RECIPES_DIR / "base.yaml")["data"]


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
