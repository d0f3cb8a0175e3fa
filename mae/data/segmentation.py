"""Image / mask pairs for semantic segmentation: folders, the ADE20K release, built-in Fashion-MNIST scenes.

Sources (`data.train` / `data.val`):

- a directory with `images/` and `masks/`: each image `images/<path>/<stem>.<ext>` pairs with the mask
  `masks/<path>/<stem>.png`, a single-channel PNG (mode L or P) of class ids, 255 = ignore;
- the ADE20K release as it unpacks (`ADEChallengeData2016`: `images/{training,validation}/*.jpg` with
  `annotations/{training,validation}/*.png`): `data.train` reads its training split, `data.val` its validation
  split; a path to one split's image folder (`.../images/validation`) reads that split. ADE20K's masks use
  0 for "other": `data.reduce_zero_label=true` makes it 255 and shifts the 150 classes to 0..149;
- `fashion-mnist-scenes[:train|:test]`: 56x56 canvases with 2-4 Fashion-MNIST garments, drawn on the fly and
  deterministically from the Fashion-MNIST files; mask = garment class + 1 on the garment (ink >= 64), 0 on
  the background, 255 on the faint edge pixels (0 < ink < 64) whose class is ambiguous. A range of a split,
  `fashion-mnist-scenes:train[19000:20000]`, is those scenes alone (a labelled subset, a held-out part).

Images are read as the rest of the toolkit reads them (Pillow in `model.in_chans` channels; TIFF / .npy bands
in their own scale). A bad pair (unreadable file, a mask of another size than its image, a class id >=
model.num_classes other than 255, an image without its mask) is named in one line, skipped and counted, never
replaced by zeros; a source with no good pair is an error.

Training transforms keep image and mask aligned (mmsegmentation's ADE20K pipeline): random resize (a scale
`data.resize` = [long, short] side limits, times a ratio from `data.ratio_range`; bilinear for the image,
nearest for the mask), a random `model.img_size` crop that no class fills more than `data.cat_max_ratio` of,
horizontal flip, photometric distortion of the image only, padding (image: the mean, mask: 255).
Evaluation resizes the image by `data.resize` alone and scores at the mask's own size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .bands import decode_bands, ext_of, is_array_ext
from .images import IMAGE_EXTS, BadSampleLog, ImageDecodeError, decode_image
from .loaders import MapTrainLoader, rank_block_loader
from .sources import FMNIST_CLASSES, DataError, read_fashion_mnist
from .transforms import resolve_norm, sample_seed

log = logging.getLogger("mae.data")

SCENES = "fashion-mnist-scenes"
SCENE_SIZE, SCENE_INK, SCENE_LENGTHS = 56, 64, {"train": 20000, "test": 2000}
IGNORE = 255
ADE_SPLITS = {True: "training", False: "validation"}
MASK_MODES = ("L", "P", "1")


class BadPair(ValueError):
    """An image / mask pair that cannot be used (the message names the file)."""


# ----------------------------------------------------------------------------------------------------------
# sources


@dataclass
class PairFolder:
    """Image files and their masks (paths as numpy bytes arrays: no per-item objects for forked workers)."""

    root: str
    images: np.ndarray
    masks: np.ndarray
    reduce_zero_label: bool = False
    layout: str = "images/ + masks/"
    unpaired: int = 0  # images without a mask, left out

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return self.images[i].decode()

    def load(self, i: int, in_chans: int) -> tuple[torch.Tensor, np.ndarray]:
        """(image float32 (C, H, W) in [0, 1] (bands: their own scale), mask uint8 (H, W))."""
        path, mpath = self.images[i].decode(), self.masks[i].decode()
        try:
            with open(path, "rb") as f:
                data = f.read()
            if is_array_ext(ext_of(path)):
                img = decode_bands(data, ext_of(path), in_chans)
            else:
                img = TF.to_dtype(TF.pil_to_tensor(decode_image(data, in_chans)), torch.float32, scale=True)
        except (ImageDecodeError, OSError) as e:
            raise BadPair(f"{path}: {e}") from None
        mask = read_mask(mpath)
        if mask.shape != tuple(img.shape[1:]):
            raise BadPair(
                f"{mpath}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {path} is {img.shape[2]}x{img.shape[1]}"
            )
        return img, reduce_zero(mask) if self.reduce_zero_label else mask

    def mask_ids(self, i: int) -> np.ndarray:
        mask = read_mask(self.masks[i].decode())
        return np.unique(reduce_zero(mask) if self.reduce_zero_label else mask)


def read_mask(path: str) -> np.ndarray:
    try:
        with Image.open(path) as m:
            m.load()
            if m.mode not in MASK_MODES:
                raise BadPair(
                    f"{path}: a mask must be a single-channel PNG of class ids (mode L or P), not {m.mode}"
                )
            return np.array(m.convert("L") if m.mode == "1" else m, dtype=np.uint8)
    except BadPair:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise BadPair(f"{path}: unreadable mask ({type(e).__name__}: {e})") from None


def reduce_zero(mask: np.ndarray) -> np.ndarray:
    """ADE20K's convention: 0 ("other") becomes ignore, classes 1..K become 0..K-1, 255 stays 255."""
    out = mask.astype(np.int16) - 1
    out[mask == 0] = IGNORE
    out[mask == IGNORE] = IGNORE
    return out.astype(np.uint8)


def garment_mask(ink: np.ndarray, label) -> np.ndarray:
    """A garment's mask in a scene: its class + 1 where the ink is >= SCENE_INK, ignore on the faint edge
    (ink 1 .. SCENE_INK - 1), 0 elsewhere. `label` may be an array that broadcasts against `ink`."""
    return np.where(ink >= SCENE_INK, label + 1, np.where(ink > 0, IGNORE, 0)).astype(np.uint8)


@dataclass
class Scenes:
    """fashion-mnist-scenes: `length` canvases, each from its own seeded draw of the split's garments."""

    garments: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray
    split: str
    classes: tuple = ("background", *FMNIST_CLASSES)
    reduce_zero_label: bool = False
    start: int = 0  # scenes start .. stop - 1 of the split (stop None: to its end)
    stop: int | None = None

    def __len__(self) -> int:
        return (SCENE_LENGTHS[self.split] if self.stop is None else self.stop) - self.start

    def name(self, i: int) -> str:
        return f"{SCENES}:{self.split}#{self.start + i}"

    def placements(self, i: int) -> list[tuple[int, int, int]]:
        """(garment index, top, left) of the i-th scene of the range's 2-4 garments, in the order they are drawn
        (later on top): the same scene whatever range it is read through."""
        rng = np.random.default_rng([0x5CE7E, 0 if self.split == "train" else 1, self.start + i])
        g, out = self.garments.shape[1], []
        for _ in range(int(rng.integers(2, 5))):
            j = int(rng.integers(len(self.garments)))
            y, x = (int(v) for v in rng.integers(0, SCENE_SIZE - g + 1, size=2))
            out.append((j, y, x))
        return out

    def draw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(canvas uint8 (56, 56), mask uint8 (56, 56))."""
        canvas = np.zeros((SCENE_SIZE, SCENE_SIZE), np.uint8)
        mask = np.zeros_like(canvas)
        g = self.garments.shape[1]
        for j, y, x in self.placements(i):
            ink = self.garments[j]
            on = ink > 0
            canvas[y : y + g, x : x + g][on] = ink[on]
            mask[y : y + g, x : x + g][on] = garment_mask(ink, self.labels[j])[on]
        return canvas, mask

    def load(self, i: int, in_chans: int) -> tuple[torch.Tensor, np.ndarray]:
        canvas, mask = self.draw(i)
        img = torch.from_numpy(canvas).float().div_(255).unsqueeze(0)
        if in_chans not in (1, 3):
            raise DataError(f"{SCENES} are grayscale images: model.in_chans must be 1 or 3, got {in_chans}")
        return img.expand(in_chans, -1, -1).contiguous(), mask

    def mask_ids(self, i: int) -> np.ndarray:
        return np.unique(self.draw(i)[1])


def _stems(folder: str, exts: tuple[str, ...]) -> dict[str, str]:
    """Relative path without extension -> file path, for the files under `folder` with one of `exts`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith(".") or "." not in f or f.rsplit(".", 1)[1].lower() not in exts:
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), folder)
            out.setdefault(os.path.splitext(rel)[0], os.path.join(dirpath, f))
    return out


def resolve_pairs(source: str, train: bool) -> tuple[str, str, str]:
    """(image folder, mask folder, layout) of a segmentation source directory."""
    ade_split = os.path.basename(os.path.normpath(source))
    if (
        ade_split in ADE_SPLITS.values()
        and os.path.basename(os.path.dirname(os.path.normpath(source))) == "images"
    ):
        root = os.path.dirname(os.path.dirname(os.path.normpath(source)))
        return source, os.path.join(root, "annotations", ade_split), f"ADE20K {ade_split}"
    split = ADE_SPLITS[train]
    if os.path.isdir(os.path.join(source, "images", split)) and os.path.isdir(
        os.path.join(source, "annotations")
    ):
        return (
            os.path.join(source, "images", split),
            os.path.join(source, "annotations", split),
            f"ADE20K {split}",
        )
    if os.path.isdir(os.path.join(source, "images")) and os.path.isdir(os.path.join(source, "masks")):
        return os.path.join(source, "images"), os.path.join(source, "masks"), "images/ + masks/"
    raise DataError(
        f"segmentation data {source!r}: expected a directory with images/ and masks/, or the ADE20K release "
        "(ADEChallengeData2016 with images/{training,validation} and annotations/)"
    )


def read_scenes(name: str, split: str, train: bool, fmnist_dir: str = "") -> Scenes:
    """The scenes of the built-in source `name` (SCENES or the detection instances): `split` (or a range of it,
    `train[a:b]`), or by default the training scenes for training and the test scenes for evaluation."""
    split, (start, stop) = scene_range(split or ("train" if train else "test"), name)
    garments, labels = read_fashion_mnist(fmnist_dir or None, split)
    return Scenes(garments, labels, split, start=start, stop=stop)


def scene_range(split: str, name: str = SCENES) -> tuple[str, tuple[int, int]]:
    """`train`, `test` or `train[a:b]` -> (split, (a, b)), a range within the split's scenes (`name`: the
    built-in source, for messages)."""
    split_name, bracket, rest = split.partition("[")
    if split_name not in SCENE_LENGTHS:
        raise DataError(f"{name} split must be train or test (or a range: train[0:2000]), got {split!r}")
    n = SCENE_LENGTHS[split_name]
    if not bracket:
        return split_name, (0, n)
    a, colon, b = rest.removesuffix("]").partition(":")
    try:
        start, stop = int(a or 0), int(b) if b else n
    except ValueError:
        start = stop = -1
    if not rest.endswith("]") or not colon or not 0 <= start < stop <= n:
        raise DataError(f"{name}:{split}: a range is [start:stop] with 0 <= start < stop <= {n}")
    return split_name, (start, stop)


def pair_source(source: str, *, train: bool, reduce_zero_label: bool, fmnist_dir: str = "", log_fn=None):
    """The pairs of `source` (see the module docstring). Images without a mask are named and left out."""
    name, _, split = source.partition(":")
    if name == SCENES:
        scenes = read_scenes(SCENES, split, train, fmnist_dir)
        if reduce_zero_label:
            raise DataError(f"data.reduce_zero_label=true: {SCENES} masks use 0 for the background class")
        return scenes
    if not os.path.isdir(source):
        what = "no such directory" if not os.path.exists(source) else "not a directory"
        raise DataError(
            f"segmentation data {source!r}: {what} (an images/ + masks/ folder, ADE20K, or {SCENES})"
        )
    img_dir, mask_dir, layout = resolve_pairs(source, train)
    if not os.path.isdir(mask_dir):
        raise DataError(f"segmentation data {source!r}: no mask folder {mask_dir}")
    images = _stems(img_dir, tuple(e for e in IMAGE_EXTS if e != "gif"))
    masks = _stems(mask_dir, ("png",))
    if not images:
        raise DataError(f"segmentation data {source!r}: no images in {img_dir}")
    lonely = [p for s, p in images.items() if s not in masks]
    if lonely:
        msg = (
            f"{source}: {len(lonely)} image(s) without a mask in {mask_dir} are skipped (first: {lonely[0]})"
        )
        (log_fn or log.warning)(msg)
    keep = [s for s in images if s in masks]
    if not keep:
        raise DataError(
            f"segmentation data {source!r}: none of its {len(images)} images has a mask in {mask_dir}"
        )
    return PairFolder(
        source,
        np.array([images[s].encode() for s in keep]),
        np.array([masks[s].encode() for s in keep]),
        reduce_zero_label,
        layout,
        len(lonely),
    )


def scan_num_classes(src, log_fn=print) -> int:
    """model.num_classes=0: the largest class id in the masks + 1 (255 = ignore), read once."""
    top, bad = -1, 0
    for i in range(len(src)):
        try:
            ids = src.mask_ids(i)
        except BadPair as e:
            bad += 1
            if bad <= 3:
                log_fn(f"note: {e}")
            continue
        ids = ids[ids != IGNORE]
        if ids.size:
            top = max(top, int(ids.max()))
    if top < 0:
        raise DataError("no mask holds a class id (all pixels are 255 or every mask is unreadable)")
    log_fn(
        f"model.num_classes=0: {top + 1} classes found in the masks of {len(src)} pairs ({bad} unreadable)"
    )
    return top + 1


def check_some_pairs(src, in_chans: int, num_classes: int, source: str, n: int = 8) -> None:
    """Before training: one of the first `n` pairs must be good, else the first problem is the error."""
    first = None
    for i in range(min(n, len(src))):
        try:
            _, mask = src.load(i, in_chans)
            check_ids(mask, num_classes, src.name(i))
            return
        except BadPair as e:
            first = first or str(e)
    raise DataError(f"segmentation data {source!r}: none of its first pairs is usable ({first})")


def check_ids(mask: np.ndarray, num_classes: int, name: str) -> None:
    ids = np.unique(mask)
    over = ids[(ids >= num_classes) & (ids != IGNORE)]
    if over.size:
        raise BadPair(f"{name}: mask has class id {int(over.max())} >= model.num_classes={num_classes}")


# ----------------------------------------------------------------------------------------------------------
# transforms


@dataclass
class SegTransform:
    """Training (random) or evaluation (deterministic resize only) transform of an image / mask pair."""

    crop: int
    mean: list[float]
    std: list[float]
    resize: tuple[int, int] | None = None  # (long, short) side limits, or None: the image's own size
    ratio_range: tuple[float, float] = (1.0, 1.0)
    cat_max_ratio: float = 1.0
    hflip: bool = False
    photometric: bool = False
    train: bool = True

    def scale_for(self, h: int, w: int, ratio: float) -> tuple[int, int]:
        if self.resize is None:
            f = ratio
        else:
            long, short = self.resize[0] * ratio, self.resize[1] * ratio
            f = min(long / max(h, w), short / min(h, w))
        return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))

    def normalise(self, img: torch.Tensor) -> torch.Tensor:
        return TF.normalize(img, self.mean, self.std)

    def __call__(self, img: torch.Tensor, mask: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.from_numpy(np.ascontiguousarray(mask))[None]
        if not self.train:
            size = self.scale_for(*img.shape[1:], 1.0)
            if size != tuple(img.shape[1:]):
                img = TF.resize(img, list(size), InterpolationMode.BILINEAR, antialias=True)
            return self.normalise(img), m[0].long()  # the mask stays at its own size: scores are taken there
        rng = np.random.default_rng(seed)
        size = self.scale_for(*img.shape[1:], float(rng.uniform(*self.ratio_range)))
        img = TF.resize(img, list(size), InterpolationMode.BILINEAR, antialias=True)
        m = TF.resize(m, list(size), InterpolationMode.NEAREST)
        img, m = self._crop(img, m, rng)
        if self.hflip and rng.random() < 0.5:
            img, m = TF.horizontal_flip(img), TF.horizontal_flip(m)
        if self.photometric:
            img = photometric_distortion(img, rng)
        img = self.normalise(img)
        h, w = img.shape[1:]
        if (h, w) != (self.crop, self.crop):  # smaller than the crop: pad with the mean (0 once normalised)
            pad = [0, 0, self.crop - w, self.crop - h]
            img, m = TF.pad(img, pad, fill=0.0), TF.pad(m, pad, fill=IGNORE)
        return img, m[0].long()

    def _crop(self, img: torch.Tensor, m: torch.Tensor, rng: np.random.Generator):
        """A random crop of at most crop x crop; up to 10 draws for one in which no class covers more than
        cat_max_ratio of the labelled pixels (mmsegmentation's RandomCrop)."""
        h, w = img.shape[1:]
        ch, cw = min(self.crop, h), min(self.crop, w)
        for _ in range(10 if self.cat_max_ratio < 1 else 1):
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            if self.cat_max_ratio >= 1:
                break
            counts = torch.bincount(m[0, y : y + ch, x : x + cw].flatten().long(), minlength=256)[:IGNORE]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        return img[:, y : y + ch, x : x + cw], m[:, y : y + ch, x : x + cw]


def photometric_distortion(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion on a [0, 1] image, each step with probability 1/2: brightness
    +-32/255, contrast x[0.5, 1.5] (before or after the colour steps), and for RGB saturation x[0.5, 1.5] and
    hue +-18 degrees (torchvision's adjust_saturation / adjust_hue)."""
    if rng.random() < 0.5:
        img = (img + float(rng.uniform(-32, 32)) / 255).clamp(0, 1)
    contrast_first = rng.random() < 0.5

    def contrast(x):
        return (x * float(rng.uniform(0.5, 1.5))).clamp(0, 1) if rng.random() < 0.5 else x

    if contrast_first:
        img = contrast(img)
    if img.shape[0] == 3:
        if rng.random() < 0.5:
            img = TF.adjust_saturation(img, float(rng.uniform(0.5, 1.5)))
        if rng.random() < 0.5:
            img = TF.adjust_hue(img, float(rng.uniform(-18, 18)) / 360)
    if not contrast_first:
        img = contrast(img)
    return img


def seg_transform(cfg, img_size: int, in_chans: int, train: bool) -> SegTransform:
    """The transform the `data` section describes (see the module docstring)."""
    mean, std = resolve_norm(cfg.mean, cfg.std, in_chans)
    resize = tuple(int(v) for v in cfg.resize) if len(cfg.resize) else None
    if resize is not None and (len(resize) != 2 or min(resize) < 1):
        raise DataError(
            f"data.resize must be [long, short] side limits in pixels or [], got {list(cfg.resize)}"
        )
    ratio = tuple(float(v) for v in cfg.ratio_range)
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise DataError(
            f"data.ratio_range must be [low, high] with 0 < low <= high, got {list(cfg.ratio_range)}"
        )
    return SegTransform(
        crop=img_size, mean=mean, std=std, resize=resize, ratio_range=ratio,
        cat_max_ratio=float(cfg.cat_max_ratio), hflip=bool(cfg.hflip), photometric=bool(cfg.photometric),
        train=train,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# loaders


class _PairDataset(torch.utils.data.Dataset):
    """(index, position) -> (image, mask, name) or (None, reason) for a bad pair; randomness from (seed, epoch,
    position), so it does not depend on the worker."""

    def __init__(self, src, transform: SegTransform, in_chans: int, num_classes: int, seed: int, epoch: int):
        self.src, self.transform, self.in_chans, self.num_classes = src, transform, in_chans, num_classes
        self.seed, self.epoch = seed, epoch
        self.badlog = BadSampleLog()

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, item):
        i, pos = int(item[0]), item[1]
        try:
            img, mask = self.src.load(i, self.in_chans)
            check_ids(mask, self.num_classes, self.src.name(i))
        except BadPair as e:
            self.badlog(self.src.name(i), str(e))
            return None
        img, m = self.transform(img, mask, sample_seed(self.seed, self.epoch, pos))
        return img, m, self.src.name(i)


class SegTrainLoader(MapTrainLoader):
    """Training batches of a rank: (images (B', C, S, S) float, masks (B', S, S) long, n_bad) on the CPU, for
    steps start_step .. steps_per_epoch - 1 (mae.data.loaders.MapTrainLoader: exact resume from a step)."""

    what = "segmentation data: pairs"

    def __init__(self, src, transform, *, in_chans, num_classes, batch_size, seed, rank, world_size, workers,
                 epoch_samples=0):  # fmt: skip
        super().__init__(len(src), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                         workers=workers, epoch_samples=epoch_samples)  # fmt: skip
        self.src, self.transform, self.in_chans, self.num_classes = src, transform, in_chans, num_classes

    def dataset(self, epoch: int) -> _PairDataset:
        return _PairDataset(self.src, self.transform, self.in_chans, self.num_classes, self.seed, epoch)

    def collate(self, items):
        good, shape = (
            [it for it in items if it is not None],
            (self.in_chans, self.transform.crop, self.transform.crop),
        )
        if not good:
            return torch.zeros(0, *shape), torch.zeros(0, *shape[1:], dtype=torch.long), len(items)
        return torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), len(items) - len(good)


class SegEvalLoader:
    """Every pair once across ranks (rank r: a contiguous block; no padding, nothing counted twice): lists of
    (image (C, H', W') normalised and resized, mask (H, W) long at its own size, name) and the bad count."""

    def __init__(self, src, transform, *, in_chans, num_classes, batch_size, rank, world_size, workers):
        self.src, self.num_samples = src, len(src)
        ds = _PairDataset(src, transform, in_chans, num_classes, 0, 0)
        self._loader = rank_block_loader(
            ds, len(src), batch_size=batch_size, rank=rank, world_size=world_size, workers=workers
        )

    def __iter__(self):
        return iter(self._loader)


def read_image_file(path: str, in_chans: int) -> torch.Tensor:
    """One image for prediction: float32 (C, H, W) in the loader's scale. Raises BadPair."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if is_array_ext(ext_of(path)):
            return decode_bands(data, ext_of(path), in_chans)
        return TF.to_dtype(TF.pil_to_tensor(decode_image(data, in_chans)), torch.float32, scale=True)
    except (ImageDecodeError, OSError) as e:
        raise BadPair(f"{path}: {e}") from None
