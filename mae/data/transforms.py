"""Train / eval transforms (torchvision + timm) and per-sample seeding of their randomness."""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import transforms as T

from .crop import SingleDrawRandomResizedCrop
from .sources import DataError

log = logging.getLogger("mae.data")


@dataclass(frozen=True)
class Augmentation:
    """What the loaders need to know of a named augmentation (its steps: `build_transform`)."""

    crops_on_device: bool  # a random resized crop + flip that can be drawn and applied on the device
    uint8: bool  # workers hand over uint8 crops, normalised on the device (no float op in the worker)
    rgb_only: bool = False  # has ops defined for RGB only (RandAugment), which band samples skip


# The augmentation recipes: the MAE paper's pretraining crop, the reference fine-tuning's (RandAugment,
# random erasing), the reference linear probe's single-draw crop, and the evaluation transform.
AUGMENTATIONS = {
    "mae": Augmentation(crops_on_device=True, uint8=True),
    "finetune": Augmentation(crops_on_device=False, uint8=False, rgb_only=True),
    "linprobe": Augmentation(crops_on_device=False, uint8=True),
    "none": Augmentation(crops_on_device=False, uint8=True),
}
AUGMENTS = tuple(AUGMENTATIONS)
BICUBIC = T.InterpolationMode.BICUBIC


def norm_stats(cfg, in_chans: int) -> tuple[list[float], list[float]]:
    """data.mean/std of `cfg` with one value per channel (see `resolve_norm`)."""
    return resolve_norm(cfg.mean, cfg.std, in_chans)


def resolve_norm(mean, std, in_chans: int) -> tuple[list[float], list[float]]:
    """Normalisation with one value per channel: one value is broadcast, and 3 values for 1-channel images
    are averaged (the grey level of the ImageNet statistics); any other length than in_chans is an error."""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    for key, vals in (("data.mean", mean), ("data.std", std)):
        if len(vals) not in (1, in_chans) and not (in_chans == 1 and len(vals) == 3):
            raise DataError(
                f"{key} has {len(vals)} values but model.in_chans={in_chans}; give one per channel "
                "(python -m data_tools.stats computes them)"
            )
    if in_chans == 1 and len(mean) == 3:
        mean = [sum(mean) / 3]
    if in_chans == 1 and len(std) == 3:
        std = [sum(std) / 3]
    if len(mean) == 1:
        mean = mean * in_chans
    if len(std) == 1:
        std = std * in_chans
    if min(std) <= 0:
        raise DataError(f"data.std must be positive, got {std}")
    return mean, std


class SampleTransform(T.Compose):
    """The transform of one augmentation for both kinds of samples: a PIL image goes through `transforms`
    (torchvision on PIL, as before), a float32 (C, H, W) tensor of a TIFF / .npy file through `bands` (the
    same geometry on tensors, any channel count), which always ends normalised."""

    def __init__(self, transforms: list, bands: T.Compose):
        super().__init__(transforms)
        self.bands = bands

    def __call__(self, x):
        return self.bands(x) if isinstance(x, torch.Tensor) else super().__call__(x)


def build_transform(cfg, augment: str, img_size: int, in_chans: int, uint8: bool = False):
    """PIL image (in_chans channels) -> float32 tensor (C, img_size, img_size), normalized; with `uint8`, the
    uint8 crop (C, img_size, img_size) instead, cast and normalised later on the device (mae.data.device).
    A float32 (C, H, W) tensor (a TIFF / .npy sample) takes `band_transform`'s path and is always normalised.

    mae:      RandomResizedCrop(scale=(scale_min, 1), bicubic) + flip, as the reference pretraining.
    finetune: timm's create_transform (RandAugment, random erasing) for RGB; grayscale goes through RGB for
              RandAugment and back; RGBA and multi-band tensors get crop + flip + erasing (RandAugment's ops
              are defined for RGB).
    linprobe: the reference probe's single-draw RandomResizedCrop(scale=(scale_min, 1), bicubic) + flip.
    Every training crop honours data.scale_min (the reference: 0.2 pretraining, 0.08 fine-tuning / probing).
    none:     the eval transform: resize to img_size / crop_pct, center crop (eval_crop_pct).
    """
    if augment not in AUGMENTS:
        raise DataError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    mean, std = norm_stats(cfg, in_chans)
    flip = [T.RandomHorizontalFlip()] if cfg.hflip else []
    tail = [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(mean, std)]
    bands = band_transform(cfg, augment, img_size, mean, std)
    if augment == "mae":
        crop = T.RandomResizedCrop(img_size, scale=(float(cfg.scale_min), 1.0), interpolation=BICUBIC)
        return SampleTransform([crop, *flip, *tail], bands)
    if augment == "linprobe":
        crop = SingleDrawRandomResizedCrop(img_size, scale=(float(cfg.scale_min), 1.0), interpolation=BICUBIC)
        return SampleTransform([crop, *flip, *tail], bands)
    if augment == "finetune":
        if uint8:
            raise ValueError(
                "the fine-tuning transform normalises in the worker (RandAugment, erasing): no uint8"
            )
        return SampleTransform(_finetune_transform(cfg, img_size, in_chans, mean, std).transforms, bands)
    return eval_transform(img_size, mean, std, cfg.crop_pct, uint8=uint8)


def band_transform(cfg, augment: str, img_size: int, mean, std) -> T.Compose:
    """The augmentation of multi-band tensors (C, H, W) float32, unnormalised -> (C, img_size, img_size)
    normalised: the crops, flips and resizes of the PIL transforms (same RNG calls, so the same boxes for
    the same seed), bicubic with antialias on floats (no clamping or rounding). Fine-tuning gets crop, flip
    and random erasing; RandAugment is RGB-only and is not applied (the loader says so once)."""
    flip = [T.RandomHorizontalFlip()] if cfg.hflip else []
    scale = (float(cfg.scale_min), 1.0)
    norm = T.Normalize(mean, std)
    if augment in ("mae", "finetune"):
        steps = [
            T.RandomResizedCrop(img_size, scale=scale, interpolation=BICUBIC, antialias=True),
            *flip,
            norm,
        ]
        if augment == "finetune" and float(cfg.reprob) > 0:
            from timm.data.random_erasing import RandomErasing

            steps.append(RandomErasing(float(cfg.reprob), mode="pixel", max_count=1, device="cpu"))
        return T.Compose(steps)
    if augment == "linprobe":
        crop = SingleDrawRandomResizedCrop(img_size, scale=scale, interpolation=BICUBIC, antialias=True)
        return T.Compose([crop, *flip, norm])
    return _band_eval(img_size, mean, std, cfg.crop_pct)


def eval_crop_pct(crop_pct: float, img_size: int) -> float:
    """data.crop_pct, or for 0 the reference's: 224 / 256 up to 224 px, 1.0 (no crop) above."""
    if float(crop_pct) > 0:
        return float(crop_pct)
    return 224 / 256 if img_size <= 224 else 1.0


def eval_transform(img_size: int, mean, std, crop_pct: float = 0.0, uint8: bool = False) -> SampleTransform:
    """Resize the shorter side to img_size / crop_pct (bicubic), center crop img_size, normalize (or, with
    `uint8`, leave the uint8 crop of a PIL image for the device; multi-band tensors are normalised here)."""
    size = int(img_size / eval_crop_pct(crop_pct, img_size))
    tail = [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(mean, std)]
    steps = [T.Resize(size, interpolation=BICUBIC), T.CenterCrop(img_size), *tail]
    return SampleTransform(steps, _band_eval(img_size, mean, std, crop_pct))


def _band_eval(img_size: int, mean, std, crop_pct: float) -> T.Compose:
    size = int(img_size / eval_crop_pct(crop_pct, img_size))
    resize = T.Resize(size, interpolation=BICUBIC, antialias=True)
    return T.Compose([resize, T.CenterCrop(img_size), T.Normalize(mean, std)])


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, with 0 bits (RandAugment's 'inc' variant at magnitude 10) giving a black image as
    Pillow < 12 did; Pillow 12+ raises for bits outside 1..8."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe(transform):
    """Swap in `_posterize` for the posterize ops of any timm RandAugment/AutoAugment inside `transform`."""
    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _finetune_transform(cfg, img_size: int, in_chans: int, mean, std):
    from timm.data import create_transform
    from timm.data.random_erasing import RandomErasing

    aa = str(cfg.auto_augment or "") or None
    if in_chans == 3:
        return _pillow_safe(create_transform(
            img_size, is_training=True, scale=(float(cfg.scale_min), 1.0), color_jitter=None, auto_augment=aa,
            interpolation="bicubic",
            re_prob=float(cfg.reprob), re_mode="pixel", re_count=1, mean=mean, std=std, hflip=0.5 if cfg.hflip else 0.0,
        ))  # fmt: skip
    steps = [T.RandomResizedCrop(img_size, scale=(float(cfg.scale_min), 1.0), interpolation=BICUBIC)]
    steps += [T.RandomHorizontalFlip()] if cfg.hflip else []
    if aa and in_chans == 1:
        rgb_aa = _pillow_safe(
            create_transform(img_size, is_training=True, auto_augment=aa, color_jitter=None)
        )
        rgb_aa = rgb_aa.transforms
        aug = next(t for t in rgb_aa if type(t).__name__ in ("RandAugment", "AutoAugment", "AugMixAugment"))
        steps += [T.Lambda(lambda im: aug(im.convert("RGB")).convert("L"))]
    elif aa:
        log.warning(
            "data.auto_augment=%s is not applied to %d-channel images (RandAugment is RGB-only)", aa, in_chans
        )
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if float(cfg.reprob) > 0:
        steps += [RandomErasing(float(cfg.reprob), mode="pixel", max_count=1, device="cpu")]
    return T.Compose(steps)


def sample_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers (run seed, epoch, position, ...) with splitmix64 steps."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = ((h ^ (int(k) & _M64)) + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h >> 1


_M64 = (1 << 64) - 1


@contextlib.contextmanager
def seeded(seed: int):
    """Run transforms with python, numpy and torch-CPU RNGs seeded (timm uses all three). In the main process
    (num_workers=0) the previous states are restored after, so the training's own random state is untouched."""
    restore = torch.utils.data.get_worker_info() is None
    if restore:
        states = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.default_generator.set_state(states[2])
