"""Adapting pretrained weights to the model a run builds: another channel count, image size or patch size.

Each function takes the source's tensor and the target's shape and returns the tensor to load, so the same
rules serve pretraining (the full MAE) and transfer (the ViT encoder):

- channels: the patch projection as timm's `adapt_input_conv` (1 channel: the sum of the source's filters, so a
  grey image gives the response its colour version gave; more or fewer: repeated or cut, scaled by
  source / target channels); the decoder's output rows of each pixel as the mean of the source's channels
  (1 channel) or repeated (more channels), so every output channel predicts what its source channel did.
- patch size: the patch projection resampled as timm's `resample_patch_embed` (FlexiViT's pseudo-inverse
  resize: a resized patch gives the token the original patch gave); the decoder's output rows resized the
  same way, so the model predicts the resized patch.
- image size (the patch grid), by `model.pos_embed_adapt`: `recompute` evaluates a fixed 2-D sin-cos table
  on the new grid (a learned table, of timm or Hugging Face classifiers and fine-tuned runs, has no formula and
  is resampled as timm's `resample_abs_pos_embed`, bicubic, antialiased); `resample` resamples every table as
  the reference's `interpolate_pos_embed`, mmsegmentation and ViTDet do (bicubic, no antialiasing). The cls row
  is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed, to_2tuple
from timm.models import adapt_input_conv
from torch import nn

from mae.models import sincos_pos_embed_2d

SINCOS_ATOL = 1e-4  # a stored table within this of the sin-cos table of its grid is that table


def adapt_patch_proj(weight: torch.Tensor, in_chans: int, patch: tuple[int, int]) -> torch.Tensor:
    """Patch projection (D, C, p, q) -> (D, in_chans, *patch)."""
    if weight.shape[1] != in_chans:
        weight = adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])
    if tuple(weight.shape[2:]) != tuple(patch):
        weight = resample_patch_embed(weight, list(patch), interpolation="bicubic", antialias=True)
    return weight


def adapt_pixel_rows(
    t: torch.Tensor, src_patch: tuple[int, int], src_chans: int, patch: tuple[int, int], in_chans: int
) -> torch.Tensor:
    """The decoder's prediction layer, weight (p*q*C, Dd) or bias (p*q*C,), rows in patchify order
    (row-in-patch, col-in-patch, channel) -> the rows of a (patch, in_chans) target."""
    (p, q), rest = src_patch, t.shape[1:]
    x = t.float().reshape(p, q, src_chans, *rest)
    if in_chans == 1:
        x = x.mean(dim=2, keepdim=True)
    elif in_chans != src_chans:
        x = x.repeat(1, 1, -(-in_chans // src_chans), *([1] * len(rest)))[:, :, :in_chans]
    if (p, q) != tuple(patch):  # resize the predicted patch: a linear map of each channel's p x q values
        flat = x.reshape(p, q, -1).permute(2, 0, 1).unsqueeze(1)  # (C*Dd, 1, p, q)
        flat = F.interpolate(flat, size=tuple(patch), mode="bicubic", align_corners=False, antialias=True)
        x = flat.squeeze(1).permute(1, 2, 0).reshape(*patch, in_chans, *rest)
    return x.reshape(-1, *rest).to(t.dtype)


def grid_of(table: torch.Tensor, extra: int = 1) -> tuple[int, int] | None:
    """The square grid of a (1, extra + g*g, D) table, or None when its rows are not a square."""
    n = table.shape[1] - extra
    g = int(round(n**0.5))
    return (g, g) if g * g == n else None


def is_sincos(table: torch.Tensor, grid: tuple[int, int] | None = None) -> bool:
    """Whether the patch rows of a (1, 1 + L, D) table are the fixed 2-D sin-cos table of their grid."""
    grid = grid or grid_of(table)
    if grid is None or table.shape[-1] % 4:
        return False
    ref = sincos_pos_embed_2d(table.shape[-1], grid, cls_token=False)
    return bool(torch.allclose(table[0, 1:].float(), ref, atol=SINCOS_ATOL, rtol=0))


POS_MODES = ("recompute", "resample")  # model.pos_embed_adapt


def adapt_pos_table(
    table: torch.Tensor,
    grid: tuple[int, int],
    src_grid: tuple[int, int] | None = None,
    mode: str = "recompute",
) -> tuple[torch.Tensor, str]:
    """A (1, 1 + L, D) position table for `grid`, and how it was made: "same", "sincos" (recomputed) or
    "resampled" (bicubic, timm's resample_abs_pos_embed). mode "recompute": a fixed sin-cos table is evaluated
    on the new grid (a learned table has no formula and is resampled, antialiased as timm's default);
    "resample": every table is resampled as the reference's interpolate_pos_embed, mmsegmentation's
    resize_pos_embed and ViTDet's get_abs_pos do (bicubic, align_corners=False, no antialiasing). The cls row
    is kept."""
    if mode not in POS_MODES:
        raise ValueError(f"position table mode {mode!r}: expected one of {', '.join(POS_MODES)}")
    src_grid = src_grid or grid_of(table)
    if src_grid is None:
        raise ValueError(f"a position table of {table.shape[1] - 1} patch rows is not a square grid")
    if tuple(src_grid) == tuple(grid):
        return table, "same"
    if mode == "recompute" and is_sincos(table, src_grid):
        rows = sincos_pos_embed_2d(table.shape[-1], grid, cls_token=False).to(table.dtype)
        return torch.cat([table[:, :1], rows.unsqueeze(0)], dim=1), "sincos"
    # resample: bicubic without antialiasing, exactly the reference's interpolate_pos_embed (and mmsegmentation's,
    # ViTDet's); a learned table under recompute keeps timm's default (antialiased)
    out = resample_abs_pos_embed(
        table, list(grid), list(src_grid), num_prefix_tokens=1, antialias=mode != "resample"
    )
    return out, "resampled"


# ----------------------------------------------------------------------------------------------------------
# loading a source into a model


class ArchitectureMismatch(ValueError):
    """The source's architecture differs from the model's where no adaptation exists (width, depth, heads)."""


@dataclass
class LoadResult:
    what: str  # the source, for messages
    missing: list[str]  # keys of the model that the source did not provide (freshly initialised)
    unexpected: list[str]  # keys of the source that the model has no place for
    notes: list[str] = field(default_factory=list)  # one line per adaptation made


_DECODER = ("decoder", "mask_token")  # MAE-only keys (ours and the reference's)
# what a source may hold besides the encoder's blocks: a classifier's head and norms (a fine-tune, a linear
# probe, the reference's mae_finetuned_vit_*.pth, a timm export), the class token (ViTDet's backbone has none), a
# MAE's decoder, a segmentation or detection model's heads. A target without a place for one of them leaves it
# out, and one line names what was left out.
_NOT_ENCODER = (
    "head.", "fc_norm.", "norm.", "cls_token", *_DECODER,
    "decode_head.", "neck.", "aux_head.", "pyramid.", "rpn.", "roi_heads.",
)  # fmt: skip


def unused_parts(
    sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], heads: tuple[str, ...], keep_head: bool
) -> list[str]:
    """The source's keys a target leaves out: its head (`heads`, the task's own output layers) unless the
    target keeps it and every one of its tensors fits, and any part of _NOT_ENCODER (a classifier's head and
    norms, the class token, a MAE's decoder, another task's heads) the target has no place for. Everything else
    must load, or it is an architecture error. One rule for every target: a MAE, a classifier, a linear probe's
    encoder, a segmentation model, a detection backbone."""
    head_fits = keep_head and all(
        k in own and own[k].shape == v.shape for k, v in sd.items() if k.startswith(heads)
    )
    return sorted(
        k for k in sd
        if (heads and k.startswith(heads) and not head_fits) or (k.startswith(_NOT_ENCODER) and k not in own)
    )  # fmt: skip


def _modules(keys: list[str]) -> str:
    """`fc_norm (2 tensors), head (2 tensors)`: the top-level modules of `keys`, the decoder's as one."""
    counts: dict[str, int] = {}
    for k in keys:
        name = "decoder" if k.startswith(_DECODER) else k.split(".")[0]
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} ({c} tensor{'s' * (c > 1)})" for n, c in sorted(counts.items()))


def _blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})


def check_architecture(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: dict | None) -> None:
    """Raise ArchitectureMismatch naming the first size that differs and its config key: encoder width, depth,
    MLP width and heads; for a full MAE target also the decoder's, when the source has a decoder. Heads are
    compared with the source's recorded architecture (`arch`; the weights' shapes do not tell them)."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        some = ", ".join(list(sd)[:4])
        raise ArchitectureMismatch(
            f"holds no ViT encoder (no 4-d patch_embed.proj.weight; keys: {some}, ...)"
        )
    own = model.state_dict()
    pairs = [
        ("embed_dim", w.shape[0], own["patch_embed.proj.weight"].shape[0], "model.embed_dim"),
        ("depth (blocks)", _blocks(sd, "blocks"), _blocks(own, "blocks"), "model.depth"),
        (
            "MLP width",
            _width(sd, "blocks.0.mlp.fc1.weight"),
            _width(own, "blocks.0.mlp.fc1.weight"),
            "model.name",
        ),
    ]
    if arch and arch.get("num_heads"):
        pairs.append(("num_heads", arch["num_heads"], model.blocks[0].attn.num_heads, "model.num_heads"))
    if hasattr(model, "decoder_pred") and "decoder_embed.weight" in sd:
        pairs += [
            ("decoder_embed_dim", sd["decoder_embed.weight"].shape[0], own["decoder_embed.weight"].shape[0],
             "model.decoder_embed_dim"),
            ("decoder_depth", _blocks(sd, "decoder_blocks"), _blocks(own, "decoder_blocks"), "model.decoder_depth"),
        ]  # fmt: skip
        if arch and arch.get("decoder_num_heads"):
            heads = model.decoder_blocks[0].attn.num_heads if len(model.decoder_blocks) else None
            pairs.append(("decoder_num_heads", arch["decoder_num_heads"], heads, "model.decoder_num_heads"))
    for name, theirs, ours, key in pairs:
        if theirs is not None and ours is not None and theirs != ours:
            raise ArchitectureMismatch(
                f"{name} is {theirs} in the source, {ours} in this model (set {key} to match)"
            )


def _width(sd: Mapping[str, torch.Tensor], key: str) -> int | None:
    return sd[key].shape[0] if key in sd else None


def _source_grid(arch: dict | None, table: torch.Tensor) -> tuple[int, int] | None:
    """The patch grid a source's table was made for: its recorded image / patch size, else a square."""
    if arch and arch.get("img_size") and arch.get("patch_size"):
        img, patch = to_2tuple(arch["img_size"]), to_2tuple(arch["patch_size"])
        grid = (img[0] // patch[0], img[1] // patch[1])
        if grid[0] * grid[1] == table.shape[1] - 1:
            return grid
    return grid_of(table)


def read_any(source: str | Path | Mapping) -> tuple[dict, dict | None, str]:
    """(state dict in our names, recorded architecture or None, the source named for messages)."""
    if isinstance(source, Mapping):
        return dict(source), None, "state dict"
    from mae.weights.formats import load_state_dict_any, read_recorded

    return load_state_dict_any(source), read_recorded(source)[0], str(source)


def load_weights(
    model: nn.Module, source: str | Path | Mapping, keep_head: bool = True, pos_embed: str = "recompute"
) -> LoadResult:
    """Load any source into a MaskedAutoencoder (pretraining: the decoder too when the source has one) or a
    VisionTransformer (transfer: the encoder, and a classifier head of the model's shape when `keep_head`),
    adapting channels, patch size and position tables (module docstring; `pos_embed`: adapt_pos_table's
    mode for another patch grid, model.pos_embed_adapt). Raises ArchitectureMismatch for sizes that cannot be
    adapted and ValueError for other shape conflicts.

    What the model has no place for is left out and named in one note (unused_parts): a classifier's head and
    norms, a MAE's decoder, a linear probe's head, the class token and heads of another task. So every
    classifier initialises a MAE, another classifier, a segmentation or a detection model. As the reference
    fine-tuning, a ViT under global pooling drops the source's final `norm` and starts `fc_norm` fresh (unless
    the source has an `fc_norm`); a MAE from a classifier starts `norm` fresh when the source has none."""
    sd, arch, what = read_any(source)
    check_architecture(model, sd, arch)
    own = model.state_dict()
    is_mae = hasattr(model, "decoder_pred")
    notes: list[str] = []
    heads = () if is_mae else getattr(model, "head_prefixes", ("head.",))  # the task's own output layers
    dropped = unused_parts(sd, own, heads, keep_head)
    if dropped:
        gone = set(dropped)
        sd = {k: v for k, v in sd.items() if k not in gone}
        notes.append(f"dropped from the source (this model does not use them): {_modules(dropped)}")

    # channels and patch size: the patch projection, and the decoder's pixel rows
    w, target = sd["patch_embed.proj.weight"], own["patch_embed.proj.weight"]
    (src_c, src_p), (c, p) = (w.shape[1], tuple(w.shape[2:])), (target.shape[1], tuple(target.shape[2:]))
    decoder = is_mae and "decoder_pred.weight" in sd
    if (src_c, src_p) != (c, p):
        sd["patch_embed.proj.weight"] = adapt_patch_proj(w, c, p)
        for k in ("decoder_pred.weight", "decoder_pred.bias"):
            if is_mae and k in sd:
                sd[k] = adapt_pixel_rows(sd[k], src_p, src_c, p, c)
    if src_c != c:
        how = "the sum of its filters" if c == 1 else f"filters repeated and scaled by {src_c}/{c}"
        rows = "the mean of its channels' rows" if c == 1 else "its channels' rows repeated"
        notes.append(
            f"channels: {src_c} -> {c}: patch embedding adapted as timm's adapt_input_conv ({how})"
            + (f"; decoder output: {rows}" if decoder else "")
        )
    if src_p != p:
        notes.append(
            f"patch size: {src_p[0]}x{src_p[1]} -> {p[0]}x{p[1]}: patch embedding resampled as timm's "
            "resample_patch_embed" + ("; decoder output patches resized alike" if decoder else "")
        )

    # image size: position tables for the model's patch grid
    for k in ("pos_embed", "decoder_pos_embed"):
        if k not in sd or k not in own or sd[k].shape == own[k].shape:
            continue
        grid = tuple(model.patch_embed.grid_size)
        src_grid = _source_grid(arch, sd[k])
        sd[k], how = adapt_pos_table(sd[k], grid, src_grid, pos_embed)
        if how == "sincos":
            made = "recomputed (the fixed sin-cos table)"
        elif pos_embed == "resample":
            made = "resampled (bicubic, as the reference's interpolate_pos_embed)"
        else:
            made = "resampled as timm (a learned table)"
        notes.append(f"image size: {k} {src_grid[0]}x{src_grid[1]} -> {grid[0]}x{grid[1]} patches, {made}")

    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(
                f"{k} has shape {tuple(v.shape)} in the source, {tuple(own[k].shape)} in this model"
            )
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if is_mae and any(k.startswith(_DECODER) for k in missing):
        notes.append(
            "decoder: the source holds the encoder only; the decoder and mask token start freshly initialised"
        )
    if is_mae and any(k.startswith("norm.") for k in missing):
        notes.append(
            "norm: the source (a classifier with fc_norm) has no final norm; it starts freshly initialised"
        )
    return LoadResult(what, list(missing), list(unexpected), notes)
