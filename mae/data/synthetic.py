"""The `synthetic` training source drawn on the device, so that `data.train=synthetic` times the loop alone.

Same distribution as `sources.SyntheticSource` (class-oriented sine grating, class tint, pixel noise,
quantised to uint8), drawn for a whole batch in a few tensor operations where the batch is used. The
per-sample parameters come from a hash of the sample index and the pixel noise from a generator seeded by
the batch's indices, so a batch is a pure function of its indices (resume stays exact); the pixels are not
those of `SyntheticSource.load` (which the eval loaders and augmented training still use).
"""

from __future__ import annotations

import numpy as np
import torch

from .sources import SYNTHETIC_CLASSES
from .transforms import sample_seed


def _uniform(index: np.ndarray, split: int, salt: int) -> np.ndarray:
    """Uniform [0, 1) per index, a splitmix64 hash of (split, salt, index)."""
    with np.errstate(over="ignore"):
        h = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(sample_seed(split, salt))
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53


def render(index: torch.Tensor, split: int, size: int, in_chans: int, device: torch.device) -> torch.Tensor:
    """Sample indices (N,) -> uint8 images (N, in_chans, size, size) on `device`."""
    idx = index.cpu().numpy()
    c = idx % SYNTHETIC_CLASSES
    u1, u2 = np.maximum(_uniform(idx, split, 1), 1e-12), _uniform(idx, split, 2)
    theta = np.pi * c / SYNTHETIC_CLASSES + 0.05 * np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
    freq = (2.0 + 3.0 * _uniform(idx, split, 3)) * 2 * np.pi / size
    phase = 2 * np.pi * _uniform(idx, split, 4)
    hue = np.cos(2 * np.pi * c[:, None] / 10 + np.array([0.0, 2.1, 4.2]))  # (N, 3)
    params = torch.tensor(
        np.stack([freq * np.cos(theta), freq * np.sin(theta), phase], 1), dtype=torch.float32
    )
    fx, fy, ph = params.to(device).unbind(1)
    grid = torch.arange(size, dtype=torch.float32, device=device)
    wave = torch.sin(fx[:, None, None] * grid + fy[:, None, None] * grid[:, None] + ph[:, None, None])
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(split, len(idx), *idx[:2].tolist(), int(idx.sum())))
    noise = torch.randn(len(idx), 3, size, size, generator=g, device=device)
    tint = torch.tensor(0.5 + 0.15 * hue, dtype=torch.float32).to(device)
    img = noise.mul_(0.05).add_(tint[:, :, None, None]).add_(wave[:, None], alpha=0.3)
    img = img.clamp_(0, 1).mul_(255).to(torch.uint8)  # truncation, as the numpy source
    if in_chans == 1:  # PIL's "L" conversion: ITU-R 601-2 luma
        luma = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
        return (img.float() * luma).sum(1, keepdim=True).round_().to(torch.uint8)
    if in_chans == 4:
        return torch.cat([img, torch.full_like(img[:, :1], 255)], 1)
    return img
