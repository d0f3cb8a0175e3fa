"""Masked Autoencoder (He et al., 2022): a ViT encoder on the visible patches, a light decoder that
reconstructs the masked ones. Stages, parameter names and numerics follow the reference release
(facebookresearch/mae, models_mae.py); beyond it: any channel count, given masking noise, fused
attention, gradient checkpointing, and an unmasked encoder pass for features.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from .vit import (
    Block,
    BlockFeatures,
    LayerNorm,
    check_images,
    drop_path_rates,
    init_patch_embed,
    init_weights_mae,
    make_patch_embed,
    resolve_attn_backend,
    run_blocks,
    sincos_pos_embed_2d,
)


class MaskedAutoencoder(BlockFeatures, nn.Module):
    """MAE with a ViT encoder and decoder. `model(imgs, mask_ratio, noise) -> (loss, pred, mask)`."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        drop_path_rate: float = 0.0,
        attn_backend: str = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        backend = resolve_attn_backend(attn_backend)
        self.in_chans, self.embed_dim, self.depth = in_chans, embed_dim, depth
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = grad_checkpointing

        # encoder (construction order = the reference's, so a seed gives the reference's init)
        self.patch_embed = make_patch_embed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i], attn_backend=backend)
                for i in range(depth)
            ]
        )
        self.norm = LayerNorm(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, attn_backend=backend)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        p, q = self.patch_embed.patch_size
        self.decoder_pred = nn.Linear(decoder_embed_dim, p * q * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Fixed sin-cos tables; xavier patch projection; tokens normal(0.02); xavier Linear, zero bias."""
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0)
        )
        init_patch_embed(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_weights_mae)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ---- patches ---------------------------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), patch vector order (row-in-patch, col-in-patch, channel)."""
        p, q = self.patch_embed.patch_size
        if imgs.ndim != 4 or imgs.shape[2] % p or imgs.shape[3] % q:
            raise ValueError(
                f"patchify: expected (N, C, H, W) with H, W divisible by {p}, got {tuple(imgs.shape)}"
            )
        return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=q)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W), the inverse of `patchify` on this model's grid."""
        p, q = self.patch_embed.patch_size
        gh, gw = self.patch_embed.grid_size
        if x.ndim != 3 or x.shape[1] != gh * gw or x.shape[2] % (p * q):
            raise ValueError(f"unpatchify: expected (N, {gh * gw}, {p * q}*C), got {tuple(x.shape)}")
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=gh, p=p, q=q)

    # ---- masking ---------------------------------------------------------------------------------------

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the int(L * (1 - mask_ratio)) tokens with the smallest noise.

        x: (N, L, D); noise: (N, L) or None for torch.rand. Returns the kept tokens (N, L_keep, D) in
        ascending-noise order, mask (N, L) with 1 = removed in the original order, and ids_restore (N, L).
        """
        N, L, D = x.shape
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        elif tuple(noise.shape) != (N, L):
            raise ValueError(f"noise must have shape (N, L) = ({N}, {L}), got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))  # no index copy
        # the reference's ones/zeros table gathered by ids_restore is exactly "rank in the noise >= len_keep"
        mask = (ids_restore >= len_keep).float()
        return x_masked, mask, ids_restore

    # ---- stages ----------------------------------------------------------------------------------------

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(blocks, x, self.grad_checkpointing and self.training)

    def _prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> latent (N, 1 + L_keep, D), mask (N, L), ids_restore (N, L)."""
        check_images(imgs, self.patch_embed)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        x = self._blocks(self.blocks, self._prepend_cls(x))
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + L_keep, D), ids_restore (N, L) -> pred (N, L, p*p*C)."""
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self._blocks(self.decoder_blocks, x))
        return self.decoder_pred(x)[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE; imgs (N, C, H, W), pred (N, L, p*p*C), mask (N, L)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:  # per-patch normalised pixels (paper Sec. 3); unbiased variance as reference
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
        return (loss * mask).sum() / mask.sum().clamp_min(1)  # an empty batch (all samples bad): 0, not 0/0

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> loss (), pred (N, L, p*p*C), mask (N, L) with 1 = removed."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder on every patch, original order, after the final norm: (N, C, H, W) -> (N, 1 + L, D)."""
        check_images(imgs, self.patch_embed)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        return self.norm(self._blocks(self.blocks, self._prepend_cls(x)))
