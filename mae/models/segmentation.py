"""Semantic segmentation on a ViT encoder: the MAE paper's UperNet transfer (He et al. 2022, Sec. 5; BEiT's
set-up as mmsegmentation reproduces it) and a linear head for probing.

`SegmentationViT` is a `VisionTransformer` (same parameter names, so every `model.init` source loads into
it as into a classifier) whose head reads the patch tokens of chosen blocks:

- `upernet`: the tokens of 4 blocks (ViT-B: 4/6/8/12) become a 4x / 2x / 1x / 0.5x pyramid (transposed
  convolutions, identity, max-pool: mmsegmentation's Feature2Pyramid), then UPerNet (Xiao et al. 2018:
  pyramid pooling on the coarsest map, a top-down FPN, the fused maps -> classes) and, while training, an
  auxiliary FCN head on the third map whose loss weighs `aux_weight`.
- `linear`: BatchNorm + 1x1 convolution on the last block's tokens, upsampled (a frozen-encoder probe).

Logits come at the input's resolution. Images of another size than `img_size` are encoded with the
position table resampled to their patch grid (whole-image inference); `slide_inference` covers large
images with overlapping `img_size` windows, as mmsegmentation's `slide` mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import VisionTransformer

SEG_HEADS = ("upernet", "linear")
IGNORE_INDEX = 255


def default_blocks(depth: int) -> list[int]:
    """The blocks (1-based) UPerNet reads by default: a third, a half, two thirds and the last, as BEiT and
    the MAE paper (ViT-B 4/6/8/12, ViT-L 8/12/16/24)."""
    return [max(1, round(depth / 3)), max(1, round(depth / 2)), max(1, round(2 * depth / 3)), depth]


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU, as mmcv's ConvModule with a norm."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Feature2Pyramid(nn.Module):
    """Four same-stride token maps -> strides x1/4, x1/2, x1, x2 of the patch stride (rescales 4, 2, 1, 0.5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, 2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, 2),
        )
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: average-pool to 1x1, 2x2, 3x3, 6x6, project, upsample back."""

    def __init__(self, dim: int, channels: int, scales=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1)) for s in scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[2:]
        return [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]


class UPerHead(nn.Module):
    """UPerNet's decoder over a 4-level pyramid (finest first) -> class logits at the finest level."""

    def __init__(self, dim: int, channels: int, num_classes: int, dropout: float = 0.1, scales=(1, 2, 3, 6)):
        super().__init__()
        self.psp = PyramidPooling(dim, channels, scales)
        self.bottleneck = conv_bn_relu(dim + len(scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats[:3])]
        laterals.append(self.bottleneck(torch.cat([feats[3], *self.psp(feats[3])], dim=1)))
        for i in range(3, 0, -1):  # top-down
            up = F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="bilinear", align_corners=False
            )
            laterals[i - 1] = laterals[i - 1] + up
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [
            F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]
        ]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv + BN + ReLU, dropout, 1x1 to classes."""

    def __init__(self, dim: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.convs = conv_bn_relu(dim, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class LinearHead(nn.Module):
    """BatchNorm + 1x1 convolution on a token map."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv_seg = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.bn(x))


class SegmentationViT(VisionTransformer):
    """A ViT encoder (no final norm, no classifier) with a segmentation head; `forward(images)` -> logits
    (N, num_classes, H, W). While training with `aux_weight` > 0 it returns (logits, auxiliary logits)."""

    # the parts model.init does not provide (a classifier's head / norms are the source's own, left out)
    new_prefixes = ("decode_head.", "neck.", "aux_head.", "head.", "fc_norm.", "norm.")
    # the task's own output layers: loaded from a segmentation source only when all of them fit (its classes)
    head_prefixes = ("decode_head.", "neck.", "aux_head.")

    def __init__(
        self,
        num_classes: int,
        head: str = "upernet",
        blocks: list[int] | tuple[int, ...] = (),
        channels: int = 512,
        aux_weight: float = 0.4,
        freeze_encoder: bool = False,
        **vit_kwargs,
    ) -> None:
        # no classifier and no final norm: the blocks' tokens go to the head
        vit_kwargs.update(num_classes=0, global_pool=True)
        super().__init__(**vit_kwargs)
        if head not in SEG_HEADS:
            raise ValueError(f"segmentation head {head!r}: expected one of {', '.join(SEG_HEADS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.fc_norm = nn.Identity()
        self.seg_classes, self.head_type, self.freeze_encoder = num_classes, head, freeze_encoder
        blocks = list(blocks) or (default_blocks(self.depth) if head == "upernet" else [self.depth])
        want = 4 if head == "upernet" else 1
        if len(blocks) != want or any(not 1 <= b <= self.depth for b in blocks) or blocks != sorted(blocks):
            raise ValueError(
                f"the {head} head reads {want} block(s) in non-decreasing order from 1..{self.depth}, got {blocks}"
            )
        self.out_blocks = blocks
        dim = self.embed_dim
        self.aux_weight = aux_weight if head == "upernet" else 0.0
        self.neck = self.aux_head = None
        if head == "upernet":
            self.neck = Feature2Pyramid(dim)
            self.decode_head = UPerHead(dim, channels, num_classes)
            if self.aux_weight > 0:  # a third of UPerNet's channels, at most 256 (mmsegmentation's)
                self.aux_head = FCNHead(dim, max(min(channels // 3, 256), 16), num_classes)
        else:
            self.decode_head = LinearHead(dim, num_classes)
        # as mmsegmentation: He init of the head's convolutions, N(0, 0.01) for its classifiers
        for name, m in self.named_modules():
            if not name.startswith(("neck", "decode_head", "aux_head")) or not isinstance(m, nn.Conv2d):
                continue
            if name.endswith("conv_seg"):
                nn.init.normal_(m.weight, std=0.01)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if freeze_encoder:
            for name, p in self.named_parameters():
                if not name.startswith(("decode_head.", "neck.", "aux_head.")):
                    p.requires_grad_(False)

    def train(self, mode: bool = True):
        """A frozen encoder stays in eval mode (no drop path) while its head trains."""
        super().train(mode)
        if mode and self.freeze_encoder:
            for name, child in self.named_children():
                if name not in ("decode_head", "neck", "aux_head"):
                    child.eval()
        return self

    def token_maps(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """(N, C, H, W), H and W multiples of the patch size -> the patch tokens of `out_blocks` as maps
        (N, D, H/p, W/p). Another grid than the model's gets the position table resampled to it."""
        # a shallow encoder reads one block twice (depth 2: blocks 1, 1, 1, 2); forward_intermediates gives
        # each block once, as timm's
        indices = sorted({b - 1 for b in self.out_blocks})
        maps = self.forward_intermediates(imgs, indices, stop_early=True, intermediates_only=True)
        return [maps[indices.index(b - 1)] for b in self.out_blocks]

    def forward(self, imgs: torch.Tensor):
        size = imgs.shape[2:]
        if self.freeze_encoder:
            with torch.no_grad():
                maps = [m.detach() for m in self.token_maps(imgs)]
        else:
            maps = self.token_maps(imgs)
        if self.head_type == "linear":
            logits = self.decode_head(maps[0])
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        pyramid = self.neck(maps)
        logits = F.interpolate(self.decode_head(pyramid), size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux_head is not None:
            aux = F.interpolate(self.aux_head(pyramid[2]), size=size, mode="bilinear", align_corners=False)
            return logits, aux
        return logits


def segmentation_loss(out, masks: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """Pixel cross-entropy ignoring 255, plus `aux_weight` x the auxiliary head's (when it gave logits)."""
    if isinstance(out, tuple):
        logits, aux = out
        return F.cross_entropy(
            logits.float(), masks, ignore_index=IGNORE_INDEX
        ) + aux_weight * F.cross_entropy(aux.float(), masks, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(out.float(), masks, ignore_index=IGNORE_INDEX)


def _padded(img: torch.Tensor, multiple: tuple[int, int] | int, at_least: tuple[int, int] = (0, 0)):
    """Zero-pad (N, C, H, W) at the bottom/right to multiples of `multiple` (and at least `at_least`)."""
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
    h, w = img.shape[2:]
    th = max(math.ceil(h / mh) * mh, at_least[0])
    tw = max(math.ceil(w / mw) * mw, at_least[1])
    return F.pad(img, (0, tw - w, 0, th - h)) if (th, tw) != (h, w) else img


@torch.no_grad()
def whole_inference(model: SegmentationViT, img: torch.Tensor) -> torch.Tensor:
    """Logits (N, K, H, W) of images of any size: padded to the patch size, encoded whole."""
    h, w = img.shape[2:]
    return model(_padded(img, tuple(model.patch_embed.patch_size)))[:, :, :h, :w]


@torch.no_grad()
def slide_inference(model: SegmentationViT, img: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Logits (N, K, H, W) averaged over overlapping crop x crop windows `stride` apart (the last window of a
    row or column flush with the border), as mmsegmentation's slide mode; an image smaller than a window is
    zero-padded (the mean after normalisation) and the padding cut off."""
    n, _, h, w = img.shape
    padded = _padded(img, 1, (crop, crop))
    ph, pw = padded.shape[2:]
    rows = max(ph - crop + stride - 1, 0) // stride + 1
    cols = max(pw - crop + stride - 1, 0) // stride + 1
    logits = count = None
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride, ph - crop), min(c * stride, pw - crop)
            out = model(padded[:, :, y1 : y1 + crop, x1 : x1 + crop]).float()
            if logits is None:
                logits = out.new_zeros(n, out.shape[1], ph, pw)
                count = out.new_zeros(1, 1, ph, pw)
            logits[:, :, y1 : y1 + crop, x1 : x1 + crop] += out
            count[:, :, y1 : y1 + crop, x1 : x1 + crop] += 1
    return (logits / count)[:, :, :h, :w]


EVAL_MODES = ("whole", "slide")


def segment_logits(model: SegmentationViT, images: torch.Tensor, mode: str, stride: int = 0) -> torch.Tensor:
    """Logits (N, K, H, W) of normalised images: the whole image at once, or (`slide`) img_size windows
    `stride` apart (0: two thirds of a window)."""
    if mode == "slide":
        crop = model.patch_embed.img_size[0]
        return slide_inference(model, images, crop, stride or max(1, crop * 2 // 3))
    if mode != "whole":
        raise ValueError(f"inference mode {mode!r}: expected one of {', '.join(EVAL_MODES)}")
    return whole_inference(model, images)
