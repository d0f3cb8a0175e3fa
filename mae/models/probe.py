"""The linear probe of the reference (facebookresearch/mae main_linprobe.py): a frozen ViT encoder,
BatchNorm1d (no affine) and a linear classifier on its pooled feature."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn


class LinearProbe(nn.Module):
    """Frozen ViT encoder + BatchNorm1d(affine=False) + Linear on its pooled feature (the cls token after
    the final norm unless model.global_pool).

    The encoder never receives gradients and stays in eval mode whatever `train()` is called with, so
    nothing in it changes; only the head's weights and its BatchNorm statistics are learned.
    """

    def __init__(self, vit: nn.Module, num_classes: int) -> None:
        super().__init__()
        dim = vit.embed_dim
        vit.head = nn.Identity()
        self.encoder = vit.requires_grad_(False).eval()
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D), without building a graph through the encoder."""
        with torch.no_grad():
            return self.encoder.forward_head(self.encoder.forward_features(imgs), pre_logits=True)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.head(self.features(imgs).float())
