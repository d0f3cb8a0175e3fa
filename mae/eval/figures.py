"""Figures: the MAE's reconstructions (original | masked | reconstruction | reconstruction + visible, one
row per image), the nearest-neighbour grid of `mae-embed --neighbours`, and class colours over images
(segmentation predictions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from mae.runs.files import atomic_write

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruct(
    model: nn.Module, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four panels (each (N, C, H, W), in the normalised input space).

    With norm_pix_loss the model predicts per-patch normalised pixels; they are mapped back with each
    patch's own mean and variance so the picture is comparable to the input.
    """
    was_training = model.training
    model.eval()
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # pred (N, L, p*p*C), mask (N, L)
    model.train(was_training)
    pred = pred.float()
    if getattr(model, "norm_pix_loss", False):
        target = model.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)
    m = model.unpatchify(mask.float().unsqueeze(-1).expand_as(pred))  # 1 = removed
    masked = imgs * (1 - m)
    pasted = imgs * (1 - m) + recon * m
    return imgs, masked, recon, pasted


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """(C, H, W) normalised -> (H, W, 3) uint8: channels 0-2 as RGB when C >= 3 (the first three bands of
    multi-band data), channel 0 as grey below; values of the loader's [0, 1] scale, clipped."""
    from mae.data.transforms import resolve_norm

    c = x.shape[0]
    mean, std = (torch.tensor(v, dtype=torch.float32).view(c, 1, 1) for v in resolve_norm(mean, std, c))
    img = (x.float().cpu() * std + mean).clamp(0, 1)
    img = img[:3] if c >= 3 else img[:1].expand(3, -1, -1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def figure(panels, mean, std, min_size: int = 112) -> Image.Image:
    """Lay out the panels of `reconstruct` as a grid with a header row."""
    n, _, h, w = panels[0].shape
    scale = max(1, -(-min_size // max(h, w)))
    ph, pw, pad, head = h * scale, w * scale, 4, 14
    canvas = Image.new("RGB", (len(panels) * (pw + pad) + pad, head + n * (ph + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, title in enumerate(COLUMNS[: len(panels)]):
        draw.text((pad + j * (pw + pad), 1), title, fill="black", font=font)
    for i in range(n):
        for j, p in enumerate(panels):
            tile = Image.fromarray(_to_uint8(p[i], mean, std)).resize((pw, ph), Image.NEAREST)
            canvas.paste(tile, (pad + j * (pw + pad), head + pad + i * (ph + pad)))
    return canvas


def neighbour_grid(queries: torch.Tensor, neighbours: torch.Tensor, mean, std, query_labels: list[str],
                   neighbour_labels: list[list[str]], min_size: int = 64) -> Image.Image:  # fmt: skip
    """Queries (Q, C, H, W) and their nearest neighbours (Q, K, C, H, W), normalised, one row per query:
    the query, then its neighbours, nearest first. Each tile is captioned with its label; a neighbour of the
    query's label is framed green, another red (no frames where labels are unknown)."""
    q, k, _, h, w = neighbours.shape
    scale = max(1, -(-min_size // max(h, w)))
    ph, pw, pad, head, cap = h * scale, w * scale, 6, 14, 12
    gap = 12  # between the query column and the neighbours
    width = (k + 1) * (pw + pad) + pad + gap
    canvas = Image.new("RGB", (width, head + q * (ph + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((pad, 1), "query", fill="black", font=font)
    for j in range(k):
        draw.text((pad + gap + (j + 1) * (pw + pad), 1), f"{j + 1}", fill="black", font=font)
    chars = max(4, pw // 6)
    for i in range(q):
        y = head + pad + i * (ph + cap + pad)
        tiles = [(queries[i], pad, query_labels[i], False)]
        for j in range(k):
            x = pad + gap + (j + 1) * (pw + pad)
            tiles.append((neighbours[i, j], x, neighbour_labels[i][j], True))
        for img, x, label, is_neighbour in tiles:
            tile = Image.fromarray(_to_uint8(img, mean, std)).resize((pw, ph), Image.NEAREST)
            canvas.paste(tile, (x, y))
            if is_neighbour and label and query_labels[i]:
                colour = (0, 160, 0) if label == query_labels[i] else (210, 0, 0)
                draw.rectangle((x - 2, y - 2, x + pw + 1, y + ph + 1), outline=colour, width=2)
            draw.text((x, y + ph + 1), label[:chars], fill="black", font=font)
    return canvas


def save_reconstructions(
    model: nn.Module,
    imgs: torch.Tensor,
    path: str | Path,
    mean,
    std,
    mask_ratio: float = 0.75,
    seed: int = 0,
    write: bool = True,
) -> Path:
    """Write the reconstruction PNG for `imgs` with a fixed masking seed (comparable across checkpoints).
    `write=False` runs the forward only (the other ranks of a sharded model)."""
    device = next(model.parameters()).device
    imgs = imgs.to(device)
    g = torch.Generator().manual_seed(seed)
    num_patches = model.patch_embed.num_patches
    noise = torch.rand(imgs.shape[0], num_patches, generator=g).to(device)
    panels = reconstruct(model, imgs, mask_ratio, noise)
    path = Path(path)
    if not write:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = figure(panels, mean, std)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def load_images(paths: list[str], img_size: int, in_chans: int, mean, std) -> torch.Tensor:
    """Read image files for the figure as the loaders do (images converted to the model's channels, TIFF /
    .npy read as bands, which must number in_chans), resize + centre crop, normalise. Raises ImageDecodeError."""
    from mae.data import ImageDecodeError, eval_transform
    from mae.data.bands import decode_sample, ext_of
    from mae.data.transforms import resolve_norm

    tf = eval_transform(img_size, *resolve_norm(mean, std, in_chans), crop_pct=1.0)
    out = []
    for p in paths:
        try:
            out.append(tf(decode_sample(Path(p).read_bytes(), ext_of(p), in_chans)))
        except ImageDecodeError as e:
            raise ImageDecodeError(f"{p}: {e}") from None
    return torch.stack(out)


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours: the PASCAL VOC colour map (class 0 black, then well separated hues)."""
    out = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(len(out)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def overlay(img: torch.Tensor, classes: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (C, H, W in [0, 1]; grey, RGB, or the first band of others) with class colours blended in."""
    rgb = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    base = (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.float32)
    painted = (1 - alpha) * base + alpha * colours[classes].astype(np.float32)
    return painted.round().clip(0, 255).astype(np.uint8)


def detection_overlay(img: torch.Tensor, det: dict, names: list[str]) -> torch.Tensor:
    """The image (C, H, W in [0, 1]; grey, RGB, or the first band of others) as uint8 RGB with masks, boxes and
    `class score` labels drawn by torchvision.utils."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    rgb = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    out = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
    if len(det["boxes"]):
        out = draw_segmentation_masks(out, det["masks"][:, 0] > 0.5, alpha=0.45)
        labels = [f"{names[int(c) - 1]} {s:.2f}" for c, s in zip(det["labels"], det["scores"].tolist())]
        out = draw_bounding_boxes(out, det["boxes"], labels, width=1)
    return out
