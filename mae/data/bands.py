"""Multi-band images: TIFF (read with tifffile) and .npy arrays, for any number of channels.

A sample of one of these files becomes a float32 tensor (C, H, W) in the scale the model sees before
normalisation: uint8 / 255, uint16 / 65535, floats as stored, bool as 0 / 1. Other dtypes (int16, int32,
uint32, complex, ...) have no agreed scale and are refused, as are non-finite values (NaN no-data pixels
would turn the loss into NaN). There is no conversion between channel counts: a file must hold exactly
model.in_chans bands.

Where the bands are (docs/data.md, "Multi-band images"):
- .npy: (H, W) is one band; a 3-D array is (H, W, C), or (C, H, W) when its first axis is shorter than
  both others (a (13, 256, 256) array is 13 bands of 256 x 256).
- TIFF: the file says it. Samples per pixel (chunky, `YXS`, or planar, `SYX`) and pages or other stacked
  axes (ImageJ channels `CYX`, ...) are bands, Y and X the image. A page stack of unknown meaning
  (tifffile's `Q`, what `tifffile.imwrite` writes for a 3-D array without `planarconfig`) is read by the
  .npy rule. Palette TIFFs become their RGB colours; compressed TIFFs decode through imagecodecs.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from .images import ImageDecodeError, decode_image

ARRAY_EXTS = ("tif", "tiff", "npy")  # read as arrays of bands, never through Pillow
SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def is_array_ext(ext: str) -> bool:
    return ext.lower() in ARRAY_EXTS


def ext_of(name: str) -> str:
    """'dir/a.TIF' -> 'tif' (lower case, no dot; '' without an extension)."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def read_array(data: bytes, ext: str) -> tuple[np.ndarray, str]:
    """Encoded .npy / TIFF bytes -> (array (H, W, C) in the file's dtype, how it was read, e.g.
    "npy (13, 64, 64) as (C, H, W)"). Raises ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file")
    if ext.lower() == "npy":
        try:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # ValueError (pickled objects, bad header), EOFError, OSError, ...
            raise ImageDecodeError(f"not a readable .npy array: {type(e).__name__}: {e}") from None
        if not isinstance(a, np.ndarray):
            raise ImageDecodeError("an .npz archive, not one .npy array")
        a, how = _by_shape(a, "npy")
    else:
        a, how = _read_tiff(data)
    if 0 in a.shape:
        raise ImageDecodeError(f"empty array ({how})")
    return a, how


def _by_shape(a: np.ndarray, what: str) -> tuple[np.ndarray, str]:
    """(H, W) -> one band; 3-D -> (H, W, C), or (C, H, W) when the first axis is shorter than both others."""
    shape = "x".join(str(n) for n in a.shape)
    if a.ndim == 2:
        return a[:, :, None], f"{what} {shape} as (H, W)"
    if a.ndim != 3:
        raise ImageDecodeError(f"{what} of shape {shape}: expected (H, W), (H, W, C) or (C, H, W)")
    if a.shape[0] < a.shape[1] and a.shape[0] < a.shape[2]:
        return np.moveaxis(a, 0, -1), f"{what} {shape} as (C, H, W)"
    return a, f"{what} {shape} as (H, W, C)"


def _read_tiff(data: bytes) -> tuple[np.ndarray, str]:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            a, axes = series.asarray(), series.axes
            page = series.pages[0] if series.pages else None
            colormap = page.colormap if page is not None and page.photometric == 3 else None  # PALETTE
    except Exception as e:  # TiffFileError, ValueError, KeyError (codec), struct.error, MemoryError, ...
        raise ImageDecodeError(f"not a readable TIFF: {type(e).__name__}: {e}") from None
    if colormap is not None and a.ndim == 2:  # palette indices -> RGB (uint16 colour table)
        return np.moveaxis(colormap[:, a], 0, -1), f"palette TIFF {a.shape[0]}x{a.shape[1]} as RGB"
    shape = "x".join(str(n) for n in a.shape)
    if set(axes) <= set("QYX") and axes.endswith("YX") and a.ndim <= 3:
        return _by_shape(a, f"TIFF {axes}")  # no axis metadata beyond a page stack
    if "Y" not in axes or "X" not in axes:
        raise ImageDecodeError(f"TIFF of shape {shape} (axes {axes}) has no Y and X axes")
    hw = np.moveaxis(a, [axes.index("Y"), axes.index("X")], [0, 1])
    return hw.reshape(hw.shape[0], hw.shape[1], -1), f"TIFF {shape} (axes {axes})"


def scale_array(a: np.ndarray) -> np.ndarray:
    """(H, W, C) in its dtype -> float32 in the model's scale: uint8 / 255, uint16 / 65535, floats and bool
    as they are. Raises ImageDecodeError for other dtypes and for non-finite values."""
    if a.dtype in SCALES:
        return a.astype(np.float32) / np.float32(SCALES[a.dtype])
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype.kind != "f":
        raise ImageDecodeError(
            f"{a.dtype} samples: only uint8 (/ 255), uint16 (/ 65535), float and bool arrays have a defined "
            "scale; convert the file"
        )
    out = a.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        raise ImageDecodeError(f"{int(bad.sum())} of {out.size} values are NaN or infinite")
    return out


def decode_bands(data: bytes, ext: str, in_chans: int | None = None) -> torch.Tensor:
    """Encoded .npy / TIFF bytes -> float32 (C, H, W) in the model's scale (see `scale_array`). With
    `in_chans`, a file of another band count raises ImageDecodeError naming both numbers."""
    a, how = read_array(data, ext)
    if in_chans is not None and a.shape[2] != in_chans:
        raise BandMismatch(a.shape[2], in_chans, how)
    return torch.from_numpy(np.ascontiguousarray(scale_array(a).transpose(2, 0, 1)))


class BandMismatch(ImageDecodeError):
    """A TIFF / .npy sample of another band count than model.in_chans (`bands`: its count)."""

    def __init__(self, bands: int, in_chans: int, how: str):
        super().__init__(band_mismatch(bands, in_chans, how))
        self.bands = bands


def band_mismatch(bands: int, in_chans: int, how: str) -> str:
    return f"{bands} band{'s' if bands != 1 else ''} but model.in_chans={in_chans} ({how})"


def decode_sample(data: bytes, ext: str, in_chans: int | None = None):
    """A file's bytes by its extension: TIFF / .npy -> float32 (C, H, W) tensor (`decode_bands`); anything
    else -> PIL image in `in_chans` channels (`decode_image`). Raises ImageDecodeError."""
    if is_array_ext(ext):
        return decode_bands(data, ext, in_chans)
    return decode_image(data, in_chans)
