"""Object detection and instance segmentation on a ViT encoder: ViTDet (Li, Mao, Girshick, He 2022) with
torchvision's Mask R-CNN.

`MaskRCNNViT` is the encoder with timm's parameter names (so every `model.init` source loads into it as into a
classifier, the class token and a classifier's head and norms dropped), made a detection backbone as ViTDet
makes it, and torchvision's Mask R-CNN on top:

- window attention (`window_size` x `window_size` patches, the grid zero-padded to whole windows) in every block
  but four evenly spaced global ones (ViT-B 2, 5, 8, 11; ViT-L 5, 11, 17, 23; 0-based); `window_size=0`: global
  attention everywhere. Every block adds a decomposed relative position bias (MViTv2's), its tables
  `blocks.N.attn.rel_pos_h` / `rel_pos_w` zero-initialised, so a pretrained encoder computes at the start what it
  computed before. No class token; model.init's absolute table follows the patch grid as model.pos_embed_adapt
  says (the detection recipes resample it, as ViTDet), and an image of another grid gets the model's table
  resampled to it in the forward.
- the simple feature pyramid from the last block's map: x4, x2, x1, x0.5 of the patch stride (strides 4, 8, 16,
  32 for patch 16) by transposed convolutions and a max-pool, each level through a 1x1 and a 3x3 convolution with
  channel LayerNorm (`channels`, 256 in ViTDet), and a max-pooled level (stride 64) for the RPN only.
- from torchvision.models.detection: anchors, the RPN (2 convolutions, as ViTDet), MultiScaleRoIAlign, the box
  head of 4 convolutions + 1 fc with LayerNorm (FastRCNNConvFCHead), the mask head of 4 convolutions with
  LayerNorm (MaskRCNNHeads), their predictors, sampling, losses, NMS and mask pasting.

torchvision's MaskRCNN class itself is not the top module: its `backbone` attribute would put the encoder's weights
under `backbone.`, and they must keep the classifier's names. `forward` is GeneralizedRCNN's (backbone -> RPN ->
RoI heads -> boxes and masks back to each image's size) without GeneralizedRCNNTransform: images come resized,
normalised and padded by the data pipeline (mae.data.detection), which torchvision's transform would resize to
800 px and normalise again.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, resample_abs_pos_embed
from timm.models._features import feature_take_indices
from timm.models.vision_transformer_sam import (
    get_decomposed_rel_pos_bias,
    window_partition,
    window_unpartition,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import Conv2dNormActivation

from .vit import (
    OUTPUT_FMTS,
    Attention,
    Block,
    BlockFeatures,
    attend,
    drop_path_rates,
    init_patch_embed,
    init_weights_mae,
    make_patch_embed,
    resolve_attn_backend,
    run_taking,
    sincos_pos_embed_2d,
)

LEVELS = ("0", "1", "2", "3")  # the pyramid levels the RoI heads pool from; "pool" is the RPN's extra level
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def global_blocks(depth: int) -> list[int]:
    """ViTDet's four evenly spaced global-attention blocks, 0-based, the last one included: 12 blocks 2, 5, 8,
    11; 24 blocks 5, 11, 17, 23; fewer than four blocks: all of them."""
    return sorted({math.ceil((i + 1) * depth / 4) - 1 for i in range(4)})


def default_anchor_sizes(patch: int) -> tuple[int, ...]:
    """Anchor sizes (px) of the five RPN levels: 8 x their strides, ViTDet's 32 ... 512 for patch 16."""
    return tuple(2 * patch * 2**i for i in range(5))


# ----------------------------------------------------------------------------------------------------------
# the backbone


class RelPosAttention(Attention):
    """Attention over a (B, H, W, C) map with a decomposed relative position bias (MViTv2, as ViTDet): tables
    rel_pos_h (2H' - 1, head dim) and rel_pos_w for an H' x W' window, linearly resampled for another size."""

    def __init__(self, dim: int, num_heads: int, size: tuple[int, int], backend: str = "sdpa"):
        super().__init__(dim, num_heads, qkv_bias=True, backend=backend)
        head_dim = dim // num_heads
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        qkv = self.qkv(x.reshape(b, h * w, c))  # (B, N, 3C)
        q = qkv[..., :c].reshape(b, h * w, self.num_heads, -1).transpose(1, 2)  # (B, heads, N, d)
        bias = get_decomposed_rel_pos_bias(
            q.reshape(b * self.num_heads, h * w, -1), self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)
        ).reshape(b, self.num_heads, h * w, h * w)
        backend = "sdpa" if self.backend == "xformers" and not x.is_cuda else self.backend
        p = self.attn_drop if self.training else 0.0
        out = attend(qkv, self.num_heads, self.scale, backend, p, bias=bias.to(qkv.dtype))
        return self.proj_drop(self.proj(out)).reshape(b, h, w, c)


class ViTDetBlock(Block):
    """The pre-norm block on a (B, H, W, C) map: attention within windows (the map zero-padded to whole windows
    after norm1, as ViTDet) or over the whole map (`window_size=0`), then the MLP."""

    def __init__(
        self, dim, num_heads, window_size: int, rel_size: tuple[int, int], drop_path=0.0, backend="sdpa"
    ):
        super().__init__(dim, num_heads, drop_path=drop_path, attn_backend=backend)
        self.window_size = window_size
        self.attn = RelPosAttention(dim, num_heads, rel_size, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        h, w = x.shape[1:3]
        y = self.norm1(x)
        if self.window_size:
            y, padded = window_partition(y, self.window_size)  # (B * windows, ws, ws, C)
        y = self.attn(y)
        if self.window_size:
            y = window_unpartition(y, self.window_size, (h, w), padded)
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one (N, D, h, w) map: levels "0".."3" at x4, x2, x1, x0.5 of its resolution and
    "pool" (a stride-2 subsample of "3", torchvision's LastLevelMaxPool), `channels` each."""

    def __init__(self, dim: int, channels: int):
        super().__init__()
        self.scales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(dim, dim // 2, 2, 2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
                ),
                nn.ConvTranspose2d(dim, dim // 2, 2, 2),
                nn.Identity(),
                nn.MaxPool2d(2, 2),
            ]
        )

        def lateral(cin: int) -> nn.Sequential:
            return nn.Sequential(
                Conv2dNormActivation(cin, channels, 1, norm_layer=LayerNorm2d, activation_layer=None),
                Conv2dNormActivation(channels, channels, 3, norm_layer=LayerNorm2d, activation_layer=None),
            )

        self.outputs = nn.ModuleList(lateral(c) for c in (dim // 4, dim // 2, dim, dim))
        self.top = LastLevelMaxPool()
        for m in self.outputs.modules():  # detectron2's c2_xavier_fill
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]
        maps, names = self.top(maps, maps, list(LEVELS))
        return OrderedDict(zip(names, maps))


# ----------------------------------------------------------------------------------------------------------
# the detector


class MaskRCNNViT(BlockFeatures, nn.Module):
    """Mask R-CNN on a ViTDet backbone (module docstring). `num_classes` object classes (labels 1..num_classes;
    0 is the background)."""

    def __init__(
        self,
        num_classes: int,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        window_size: int = 14,
        channels: int = 256,
        anchor_sizes: tuple[int, ...] = (),
        proposals: tuple[int, int] = (1000, 1000),
        roi_samples: int = 512,
        detections: int = 100,
        attn_backend: str = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0 = global attention everywhere), got {window_size}")
        backend = resolve_attn_backend(attn_backend)
        self.num_classes, self.embed_dim, self.depth, self.in_chans = num_classes, embed_dim, depth, in_chans
        self.window_size, self.grad_checkpointing = window_size, grad_checkpointing
        self.patch_embed = make_patch_embed(img_size, patch_size, in_chans, embed_dim)
        grid = tuple(self.patch_embed.grid_size)
        # the classifier's table shape (a cls row first, unused here), so sources load without reshaping
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], embed_dim))
        self.global_blocks = global_blocks(depth) if window_size else list(range(depth))
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            ViTDetBlock(
                embed_dim, num_heads, 0 if i in self.global_blocks else window_size,
                grid if i in self.global_blocks else (window_size, window_size), dpr[i], backend,
            )
            for i in range(depth)
        )  # fmt: skip
        self.norm = nn.Identity()  # ViTDet has no final norm: the pyramid reads the last block's output
        self.pyramid = SimpleFeaturePyramid(embed_dim, channels)
        patch = self.patch_embed.patch_size[0]
        self.anchor_sizes = tuple(anchor_sizes) or default_anchor_sizes(patch)
        self.rpn = build_rpn(channels, self.anchor_sizes, proposals)
        self.roi_heads = build_roi_heads(channels, num_classes, roi_samples, detections, 224 * patch // 16)
        self.init_weights()
        # what model.init does not provide: the heads and the relative position tables
        self.new_prefixes = (
            "pyramid.",
            "rpn.",
            "roi_heads.",
            *(f"blocks.{i}.attn.rel_pos_" for i in range(depth)),
        )
        # the task's own output layers: loaded from a detection source only when all of them fit (its classes);
        # what else a source carries that this model has no place for (a classifier's head and norms, the class
        # token, a segmentation head, a MAE's decoder) mae.weights.adapt drops by its one rule, as for every model
        self.head_prefixes = ("pyramid.", "rpn.", "roi_heads.")

    def init_weights(self) -> None:
        """The encoder as the toolkit initialises a ViT (sin-cos table, xavier linears); relative position
        tables zero; the heads keep torchvision's and the pyramid detectron2's initialisation."""
        self.pos_embed.data[0, 1:] = sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size, False)
        init_patch_embed(self.patch_embed)
        self.blocks.apply(init_weights_mae)
        for blk in self.blocks:
            nn.init.zeros_(blk.attn.rel_pos_h)
            nn.init.zeros_(blk.attn.rel_pos_w)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ---- the backbone

    def embed_grid(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W), H and W multiples of the patch size -> patch tokens with positions (N, H/p, W/p, D);
        another grid than the model's gets the table resampled to it (bicubic, as ViTDet)."""
        p = self.patch_embed.patch_size
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans or imgs.shape[2] % p[0] or imgs.shape[3] % p[1]:
            raise ValueError(
                f"expected images (N, {self.in_chans}, H, W) with H, W multiples of {tuple(p)}, got {tuple(imgs.shape)}"
            )
        x = self.patch_embed.proj(imgs).permute(0, 2, 3, 1)  # (N, h, w, D)
        grid, own = tuple(x.shape[1:3]), tuple(self.patch_embed.grid_size)
        pos = self.pos_embed
        if grid != own:
            pos = resample_abs_pos_embed(pos, list(grid), list(own), num_prefix_tokens=1)
        return x + pos[:, 1:].reshape(1, *grid, -1)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's signature and meaning (mae.models.vit.BlockFeatures) for the windowed blocks, which work on
        (N, h, w, D) maps: block outputs as (N, D, h, w) (`NCHW`) or (N, h*w, D) (`NLC`). There are no prefix
        tokens and no final norm (`norm` changes nothing)."""
        if return_prefix_tokens:
            raise ValueError("the ViTDet backbone has no prefix (class) token")
        if output_fmt not in OUTPUT_FMTS:
            raise ValueError(f"output_fmt must be one of {', '.join(OUTPUT_FMTS)}, got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        x, out = run_taking(blocks, self.embed_grid(x), take, self.grad_checkpointing and self.training)
        out = [y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y.flatten(1, 2) for y in out]
        return out if intermediates_only else (x.flatten(1, 2), out)

    def features(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(N, C, H, W) -> the pyramid: "0".."3" and "pool", (N, channels, H * 4 / p / 2**i, ...), float32
        (torchvision makes anchors and decodes boxes in the features' dtype: bf16 would round a 1000 px
        coordinate to 4 px)."""
        (last,) = self.forward_intermediates(images, [self.depth - 1], intermediates_only=True)
        return OrderedDict((k, v.float()) for k, v in self.pyramid(last).items())

    # ---- detection

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ):
        """images (N, C, H, W), normalised, each image at the top left of the canvas; `image_sizes` the part of
        the canvas each one fills (default: all of it). Training: targets (per image boxes (K, 4) xyxy, labels
        (K,), masks (K, H, W) uint8) -> torchvision's losses {loss_objectness, loss_rpn_box_reg,
        loss_classifier, loss_box_reg, loss_mask}. Evaluation: per image {boxes (K, 4) xyxy, labels (K,),
        scores (K,), masks (K, 1, H0, W0) probabilities} at `original_sizes` (default: image_sizes)."""
        sizes = [tuple(s) for s in image_sizes] if image_sizes else [tuple(images.shape[2:])] * len(images)
        feats = self.features(images)
        proposals, rpn_losses = self.rpn(ImageList(images, sizes), feats, targets)
        detections, roi_losses = self.roi_heads(feats, proposals, sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return [to_original(d, s, o) for d, s, o in zip(detections, sizes, original_sizes or sizes)]


class Float32Conv2d(nn.Conv2d):
    """A convolution that computes in float32 under autocast: box regressions are decoded in their own dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class Float32Linear(nn.Linear):
    """A linear layer that computes in float32 under autocast (see Float32Conv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def _float32(layer: nn.Module) -> nn.Module:
    """The same layer (same weights) as its Float32 kind."""
    cls = Float32Conv2d if isinstance(layer, nn.Conv2d) else Float32Linear
    layer.__class__ = cls
    return layer


def to_original(det: dict, size: tuple[int, int], original: tuple[int, int]) -> dict:
    """Boxes from the resized image's pixels to the original's, masks pasted into the original image (what
    GeneralizedRCNNTransform.postprocess does)."""
    det["boxes"] = resize_boxes(det["boxes"], list(size), list(original))
    if "masks" in det:
        det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], list(original))
    return det


def build_rpn(
    channels: int, anchor_sizes: tuple[int, ...], proposals: tuple[int, int]
) -> RegionProposalNetwork:
    """torchvision's RPN as ViTDet configures it: 3 aspect ratios per level, a head of 2 convolutions,
    `proposals` (train, test) boxes kept per image after NMS and twice / once as many per level before it
    (ViTDet: 1000 / 1000 after, 2000 / 1000 before)."""
    if len(anchor_sizes) != len(LEVELS) + 1:
        raise ValueError(f"anchor sizes: one per RPN level ({len(LEVELS) + 1}), got {list(anchor_sizes)}")
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), (ASPECT_RATIOS,) * len(anchor_sizes))
    head = RPNHead(channels, len(ASPECT_RATIOS), conv_depth=2)
    head.bbox_pred = _float32(head.bbox_pred)
    return RegionProposalNetwork(
        anchors, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n=dict(training=2 * proposals[0], testing=proposals[1]),
        post_nms_top_n=dict(training=proposals[0], testing=proposals[1]), nms_thresh=0.7,
    )  # fmt: skip


def build_roi_heads(
    channels: int, num_classes: int, samples: int, detections: int, canonical: int
) -> RoIHeads:
    """torchvision's RoI heads with ViTDet's box head (4 convolutions + 1 fc of 4 x channels, LayerNorm) and
    mask head (4 convolutions, LayerNorm); RoIAlign with adaptive sampling (detectron2's sampling_ratio=0).
    `canonical`: the box side that pools from the stride-16-equivalent level (224 for patch 16), so a smaller
    patch maps boxes to levels as a patch-16 model does on an image scaled to it."""
    box_pool = MultiScaleRoIAlign(list(LEVELS), 7, sampling_ratio=0, canonical_scale=canonical)
    mask_pool = MultiScaleRoIAlign(list(LEVELS), 14, sampling_ratio=0, canonical_scale=canonical)
    box_head = FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [4 * channels], norm_layer=LayerNorm2d)
    box_predictor = FastRCNNPredictor(4 * channels, num_classes + 1)
    box_predictor.bbox_pred = _float32(box_predictor.bbox_pred)
    mask_head = MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=LayerNorm2d)
    return RoIHeads(
        box_pool, box_head, box_predictor,
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=samples, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=detections,
        mask_roi_pool=mask_pool, mask_head=mask_head, mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1),
    )  # fmt: skip


def detection_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of Mask R-CNN's losses (each weighted 1, as torchvision and detectron2)."""
    return sum(v.float() for v in losses.values())
