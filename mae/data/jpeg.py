"""JPEG samples left encoded in the workers: header sniffing and the crop a worker draws for the device.

With `data.decode=device` a worker does not decode a JPEG: it reads the size from the header, draws the
RandomResizedCrop box and the flip from the sample's seeded RNG exactly as the CPU transform would (same
calls, same order, so the same box), and hands over the encoded bytes. Anything that is not a baseline
1- or 3-component JPEG (PNG, CMYK/YCCK, a broken header) takes the CPU path in the worker instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
from torchvision import transforms as T

from .images import decode_image
from .transforms import seeded

# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic coded).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG's start-of-frame header; None if `data` is not a JPEG or the
    header is unreadable (the full decoder then reports why)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            if i + 10 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            comps = data[i + 9]
            return (height, width, comps) if height and width else None
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        i += 2 + length
    return None


@dataclass
class DeferredCrop:
    """A JPEG sample for the device: its encoded bytes and the crop a worker drew for it."""

    data: bytes
    box: tuple[int, int, int, int]  # top, left, height, width in the decoded image
    flip: bool
    name: str = ""  # for the bad-sample log


class CropDraw:
    """Draws (box, flip) with the RNG calls of RandomResizedCrop(scale, ratio) + RandomHorizontalFlip, so
    under the same seed the box equals the one the PIL transform crops. `size`: the output side."""

    def __init__(self, size: int, scale: tuple[float, float], hflip: bool,
                 ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)):  # fmt: skip
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip

    def __call__(self, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        shape_only = torch.empty(1, 1, 1).expand(1, height, width)  # get_params reads the size only
        box = T.RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(1) < 0.5) if self.hflip else False
        return tuple(int(v) for v in box), flip


def defer(data: bytes, in_chans: int, draw: CropDraw, name: str = "") -> DeferredCrop | None:
    """A DeferredCrop for a JPEG the device decoder reads (1 or 3 components, 1- or 3-channel models), or None:
    decode it on the CPU (PNG, CMYK, 4-channel models, unreadable header)."""
    if in_chans not in (1, 3):
        return None
    head = jpeg_header(data)
    if head is None or head[2] not in (1, 3):
        return None
    box, flip = draw(head[0], head[1])
    return DeferredCrop(data, box, flip, name)


def resized_crop(image: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> the box resized to (C, size, size), bicubic with antialias (as PIL), flipped."""
    from torchvision.transforms.v2 import functional as F

    out = F.resized_crop(image, *box, [size, size], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    return out.flip(-1) if flip else out


def decode_mode(in_chans: int):
    from torchvision.io import ImageReadMode

    return ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY


def crop_here(sample: DeferredCrop, in_chans: int, size: int) -> torch.Tensor:
    """Decode a DeferredCrop in this process (libjpeg-turbo) and crop it: uint8 (C, size, size). A file
    torchvision refuses gets PIL's verdict: decoded by it (same crop), or ImageDecodeError."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        data = torch.frombuffer(bytearray(sample.data), dtype=torch.uint8)
        image = decode_jpeg(data, mode=decode_mode(in_chans))
    except RuntimeError:
        image = pil_to_tensor(decode_image(sample.data, in_chans))
    return resized_crop(image, sample.box, sample.flip, size)


def worker_sample(data: bytes, in_chans: int, transform, draw: CropDraw | None, seed: int, to_device: bool,
                  name: str = "", ext: str = ""):  # fmt: skip
    """A worker's share of one sample, the transform's randomness seeded with `seed`. With `draw` (MAE crops),
    a JPEG is cropped by `resized_crop`: here (decoded with torchvision, 2x faster than PIL's decode + resize)
    or, `to_device`, left encoded for the device (a DeferredCrop). A TIFF / .npy file (by `ext`) becomes a
    float32 tensor of its bands (mae.data.bands), anything else a PIL image; then `transform`.
    Raises ImageDecodeError for bytes that are not a readable image."""
    from .bands import decode_sample, is_array_ext

    with seeded(seed):
        if draw is not None and not is_array_ext(ext) and (deferred := defer(data, in_chans, draw, name)):
            return deferred if to_device else crop_here(deferred, in_chans, draw.size)
        return transform(decode_sample(data, ext, in_chans))
