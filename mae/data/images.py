"""Image decoding, validation and channel conversion, shared by the loaders and data_tools."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("mae.data")

# File extensions read as samples (lower case, no dot), in the order a shard member is looked up. TIFF and .npy
# are arrays of any number of bands (mae.data.bands); the others are images Pillow reads.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "tif", "tiff", "gif", "npy")
SUPPORTED_CHANS = (1, 3, 4)


class ImageDecodeError(ValueError):
    """A sample that is not a readable image (empty, truncated, corrupt, unknown format)."""


def decode_image(data: bytes, in_chans: int | None = None) -> Image.Image:
    """Decode encoded image bytes fully (so truncation is caught here, not in a transform).

    Returns the image converted to `in_chans` channels (see `convert_image`), or in its own mode when
    `in_chans` is None. Raises ImageDecodeError with a short reason.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from None
    if img.width == 0 or img.height == 0:
        raise ImageDecodeError(f"zero-sized image {img.width}x{img.height}")
    if in_chans is None:
        return img
    try:
        return convert_image(img, in_chans)
    except Exception as e:
        raise ImageDecodeError(f"cannot convert mode {img.mode} to {in_chans} channels: {e}") from None


def _to_gray8(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale ('I;16*', 'I', 'F') -> 'L', scaled to the full 8-bit range, not clipped."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        a = a * 255.0 if np.nanmax(a) <= 1.0 else a
    else:
        a = np.clip(a.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with transparency over white (what a viewer shows), returning 'RGB'."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)


def convert_image(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert any PIL mode to 'L' (1), 'RGB' (3) or 'RGBA' (4).

    16-bit and float grayscale are rescaled to 8 bits (PIL's own convert would clip at 255); CMYK,
    palette, YCbCr, LAB and 1-bit images go through PIL's converters; transparent images become
    'RGB'/'L' by compositing over white, so the colour under fully transparent pixels never leaks in.
    """
    if in_chans not in SUPPORTED_CHANS:
        raise ValueError(f"in_chans must be one of {SUPPORTED_CHANS}, got {in_chans}")
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_gray8(img)
    if in_chans == 4:
        return img if img.mode == "RGBA" else img.convert("RGBA")
    if _has_alpha(img):
        img = _flatten_alpha(img)
    if in_chans == 1:
        if img.mode in ("RGB", "L"):
            return img.convert("L")
        return img.convert("RGB").convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


class BadSampleLog:
    """Counts skipped samples and logs them rate-limited: the first `first` by name, then every `every`-th."""

    def __init__(self, first: int = 10, every: int = 1000):
        self.first, self.every, self.count = first, every, 0

    def __call__(self, name: str, reason: str) -> None:
        self.count += 1
        if self.count <= self.first or self.count % self.every == 0:
            more = f" (further bad samples are logged every {self.every})" if self.count == self.first else ""
            log.warning(
                "skipping bad sample %s: %s [%d skipped in this process]%s", name, reason, self.count, more
            )
