"""Vision Transformer parts: attention with interchangeable backends, pre-norm block, fixed 2-D sin-cos
position tables, and the ViT classifier used for fine-tuning and linear probing.

Parameter names follow timm's VisionTransformer (and so the reference MAE release), which is what lets
encoder weights move between mae, the reference release and timm without renaming.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

ATTN_BACKENDS = ("auto", "sdpa", "math", "xformers")
ATTN_BACKEND_ENV = "MAE_ATTN_BACKEND"
# PyTorch's fused CPU attention kernel in bf16/fp16 is slower than the explicit softmax(q k^T) v up to about
# a thousand tokens (MAE ViT-B/16 bf16 training step 2.0x faster with the explicit form; even at 1025 tokens),
# so the 'sdpa' backend uses the explicit form there. fp32 and CUDA keep the fused kernel.
CPU_HALF_EXPLICIT_MAX_TOKENS = 1024
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


# ----------------------------------------------------------------------------------------------------------
# attention backends


@functools.cache
def _xformers_ops():
    """xformers.ops, or None. A wheel built for another torch/CUDA can fail with more than ImportError."""
    try:
        import xformers.ops as xops
    except Exception:
        return None
    return xops


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def resolve_attn_backend(requested: str | None = "auto") -> str:
    """The backend a model built now will use: 'sdpa', 'math' or 'xformers'.

    The environment variable MAE_ATTN_BACKEND, when set, overrides `requested`. 'auto' is sdpa: PyTorch's
    SDPA dispatches to the flash and memory-efficient kernels itself, and an xformers wheel works only with
    the one torch it was built for. An explicit 'xformers' that cannot import falls back to sdpa with one
    warning; one that imports but cannot run is caught by `mae.models.backends.ensure_attn_backends`.
    """
    name = (os.environ.get(ATTN_BACKEND_ENV) or requested or "auto").strip().lower()
    if name not in ATTN_BACKENDS:
        source = ATTN_BACKEND_ENV if os.environ.get(ATTN_BACKEND_ENV) else "attn_backend"
        raise ValueError(f"{source} must be one of {', '.join(ATTN_BACKENDS)}, got {name!r}")
    if name == "auto":
        return "sdpa"
    if name == "xformers" and _xformers_ops() is None:
        _warn_once("attn_backend 'xformers' requested but xformers does not import here; using 'sdpa'")
        return "sdpa"
    return name


def attend(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float,
    backend: str,
    p: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed projections: qkv (B, N, 3 * C) -> (B, N, C), on `backend` (sdpa | math | xformers).
    `bias` (B, heads, N, N), added to the scaled logits (a relative position bias), runs on sdpa or math."""
    if bias is not None and backend == "xformers":
        backend = "sdpa"  # xformers wants its own bias layout; SDPA takes the tensor as it is
    if (
        backend == "sdpa"
        and not qkv.is_cuda
        and qkv.dtype in (torch.bfloat16, torch.float16)
        and qkv.shape[1] <= CPU_HALF_EXPLICIT_MAX_TOKENS
    ):
        backend = "math"
    if backend == "xformers":
        q, k, v = rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=num_heads)
        x = _xformers_ops().memory_efficient_attention(q, k, v, p=p, scale=scale)
        return rearrange(x, "b n h d -> b n (h d)")
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=num_heads)
    if backend == "sdpa":
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    else:  # math: the explicit softmax(q k^T / sqrt(d)) v of the reference
        attn = (q @ k.transpose(-2, -1)) * scale  # (B, h, N, N)
        if bias is not None:
            attn = attn + bias
        attn = F.dropout(attn.softmax(dim=-1), p)
        x = attn @ v
    return rearrange(x, "b h n d -> b n (h d)")


class Attention(nn.Module):
    """Multi-head self-attention; the three backends share one set of parameters (qkv, proj)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        backend = self.backend
        if backend == "xformers" and not x.is_cuda:
            _warn_once("attn_backend 'xformers' needs CUDA tensors; using 'sdpa' for inputs on the CPU")
            backend = "sdpa"
        p = self.attn_drop if self.training else 0.0
        x = attend(self.qkv(x), self.num_heads, self.scale, backend, p)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then the MLP the same way.

    Written here rather than taken from timm because timm's Block passes version-dependent arguments to
    its attention layer; names and order of the parameters are timm's.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, backend=attn_backend)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth growing linearly from 0 at the first block to `rate` at the last."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
    """Apply `blocks` in order; with `grad_checkpointing`, activations are recomputed in backward."""
    return run_taking(blocks, x, [], grad_checkpointing)[0]


def run_taking(
    blocks: nn.ModuleList, x: torch.Tensor, take: list[int], grad_checkpointing: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Apply `blocks` in order: (the last output, the outputs of the blocks numbered in `take`); with
    `grad_checkpointing`, activations are recomputed in backward."""
    use_checkpoint = grad_checkpointing and torch.is_grad_enabled()
    out = []
    for i, blk in enumerate(blocks):
        x = checkpoint(blk, x, use_reentrant=False) if use_checkpoint else blk(x)
        if i in take:
            out.append(x)
    return x, out


def set_attn_backend(model: nn.Module, backend: str) -> str:
    """Switch every Attention in `model` to `backend` (resolved as at build time); returns the one used."""
    resolved = resolve_attn_backend(backend)
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = resolved
    return resolved


# ----------------------------------------------------------------------------------------------------------
# position tables and initialisation


def sincos_pos_embed_2d(
    embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True
) -> torch.Tensor:
    """Fixed 2-D sin-cos position table, (cls_token + gh * gw, embed_dim), float32.

    Reference layout: channel quarters [sin(w), cos(w), sin(h), cos(h)] with frequencies
    1 / 10000 ** (i / (D/4)), tokens in row-major order, a zero row first for the cls token. Computed in
    float64 like the reference's numpy code, then rounded once.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position table needs embed_dim divisible by 4, got {embed_dim}")
    gh, gw = to_2tuple(grid_size)
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    h, w = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    out_w = w.reshape(-1, 1) * omega  # (gh * gw, D/4)
    out_h = h.reshape(-1, 1) * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)
    return table.float()


def init_weights_mae(module: nn.Module) -> None:
    """Reference MAE init for one module: xavier-uniform Linear with zero bias; LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_patch_embed(patch_embed: PatchEmbed) -> None:
    """Xavier-uniform on the patch projection viewed as a (D, C*p*p) matrix; its bias keeps torch's init."""
    w = patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))


def make_patch_embed(img_size, patch_size, in_chans: int, embed_dim: int) -> PatchEmbed:
    img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
    for i, s in zip(img_size, patch_size):
        if i % s:
            raise ValueError(f"img_size {tuple(img_size)} is not divisible by patch_size {tuple(patch_size)}")
    return PatchEmbed(img_size, patch_size, in_chans, embed_dim)


def check_images(imgs: torch.Tensor, patch_embed: PatchEmbed) -> None:
    """One-line errors for images the model was not built for (instead of a shape error deep inside)."""
    expected = (patch_embed.proj.in_channels, *patch_embed.img_size)
    if imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
        raise ValueError(
            f"expected images of shape (N, {', '.join(map(str, expected))}), got {tuple(imgs.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------
# block features


OUTPUT_FMTS = ("NCHW", "NLC")


class BlockFeatures:
    """`forward_intermediates` for an encoder with timm's parts (patch_embed, cls_token, pos_embed, blocks,
    norm): the outputs of chosen blocks as feature maps, with timm's signature and meaning, so a head written
    against timm's VisionTransformer reads ours unchanged."""

    def embed_tokens(self, imgs: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N, C, H, W), H and W multiples of the patch size -> tokens (N, 1 + L, D) with positions, cls
        first, and the patch grid (H/p, W/p). Another grid than the model's gets the position table resampled
        to it (bicubic, as timm's dynamic image size)."""
        n, c, h, w = imgs.shape if imgs.ndim == 4 else (0, -1, 0, 0)
        p = self.patch_embed.patch_size
        if imgs.ndim != 4 or c != self.patch_embed.proj.in_channels or h % p[0] or w % p[1]:
            raise ValueError(
                f"expected images (N, {self.patch_embed.proj.in_channels}, H, W) with H, W multiples of "
                f"{tuple(p)}, got {tuple(imgs.shape)}"
            )
        grid, own = (h // p[0], w // p[1]), tuple(self.patch_embed.grid_size)
        x = self.patch_embed.norm(self.patch_embed.proj(imgs).flatten(2).transpose(1, 2))  # (N, L, D)
        pos = self.pos_embed
        if grid != own:
            pos = resample_abs_pos_embed(pos, list(grid), list(own), num_prefix_tokens=1)
        cls = (self.cls_token + pos[:, :1]).expand(n, -1, -1)
        return torch.cat([cls, x + pos[:, 1:]], dim=1), grid

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
        """The outputs of blocks `indices` (an int n: the last n blocks; a list: 0-based block numbers, negative
        from the end; None: every block), prefix (cls) tokens stripped, optionally through the final `norm`,
        as maps (N, D, H/p, W/p) (`NCHW`) or tokens (N, L, D) (`NLC`). With `return_prefix_tokens`, each is a
        (features, cls tokens (N, 1, D)) pair. Returns the list (`intermediates_only`), else (the final
        normed tokens (N, 1 + L, D), the list). `stop_early` skips the blocks after the last one taken."""
        if output_fmt not in OUTPUT_FMTS:
            raise ValueError(f"output_fmt must be one of {', '.join(OUTPUT_FMTS)}, got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        x, grid = self.embed_tokens(x)
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        x, out = run_taking(blocks, x, take, self.grad_checkpointing and self.training)
        out = [self.norm(y) for y in out] if norm else out
        prefix = [y[:, :1] for y in out]
        out = [y[:, 1:] for y in out]
        if output_fmt == "NCHW":
            out = [y.transpose(1, 2).reshape(y.shape[0], -1, *grid) for y in out]
        if return_prefix_tokens:
            out = list(zip(out, prefix))
        return out if intermediates_only else (self.norm(x), out)


# ----------------------------------------------------------------------------------------------------------
# classifier


class VisionTransformer(BlockFeatures, nn.Module):
    """ViT classifier with timm's parameter names.

    global_pool=True: mean of the patch tokens, then `fc_norm`, then `head` (the reference fine-tuning
    setting; there is no final `norm`). global_pool=False: final `norm`, cls token, `head`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        global_pool: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_backend: str = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        backend = resolve_attn_backend(attn_backend)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.embed_dim, self.depth, self.in_chans = embed_dim, depth, in_chans
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = make_patch_embed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))  # trained when fine-tuning
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i], attn_backend=backend)
                for i in range(depth)
            ]
        )
        self.norm = nn.Identity() if global_pool else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if global_pool else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """MAE-style init (sin-cos pos table as the start value); head weights trunc-normal(2e-5) as the
        reference fine-tuning does, so a fresh head starts near zero."""
        self.pos_embed.data.copy_(
            sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size).unsqueeze(0)
        )
        init_patch_embed(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_weights_mae)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=2e-5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 1 + L, D): all tokens before pooling (after `norm` unless global_pool)."""
        check_images(imgs, self.patch_embed)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = run_blocks(self.blocks, x, self.grad_checkpointing and self.training)
        return self.norm(x)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, 1 + L, D) -> (N, num_classes), or the pooled (N, D) with pre_logits."""
        x = feats[:, 1:].mean(dim=1) if self.global_pool else feats[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.forward_head(self.forward_features(imgs))
