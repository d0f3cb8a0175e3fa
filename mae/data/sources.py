"""Map-style sources (built-in datasets and image folders) and the rules that resolve a `source` string."""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .bands import decode_sample, ext_of
from .images import IMAGE_EXTS, convert_image

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
SYNTHETIC_CLASSES = 10
MANIFESTS = ("dataset.json", "sizes.json")
SOURCE_HELP = (
    "expected an image folder, a shard directory, a shard pattern (dir/train-{000000..000009}.tar, pipe:..., "
    "joined with '::'), 'fashion-mnist[:train|:test]' or 'synthetic[:train|:test]'"
)


class DataError(ValueError):
    """A user-facing problem with the data configuration or files (one line; entry points exit with code 2)."""


def read_fashion_mnist(root: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the Fashion-MNIST idx files: images uint8 (N, 28, 28), labels int64 (N,).

    `root` holds `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` (None or "" = the Debian location);
    `split` is "train" (60,000) or "test" (10,000).
    """
    if split not in ("train", "test"):
        raise DataError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    root = root or FMNIST_DEFAULT_DIR
    stem = "train" if split == "train" else "t10k"
    images = _read_idx(root, f"{stem}-images-idx3-ubyte", magic=2051)
    labels = _read_idx(root, f"{stem}-labels-idx1-ubyte", magic=2049)
    if len(images) != len(labels):
        raise DataError(f"fashion-mnist {split} in {root}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def _read_idx(root: str, name: str, magic: int) -> np.ndarray:
    """One idx file (big-endian header: magic, dims...), gzipped or raw."""
    for path, opener in ((os.path.join(root, name + ".gz"), gzip.open), (os.path.join(root, name), open)):
        if os.path.exists(path):
            with opener(path, "rb") as f:
                raw = f.read()
            break
    else:
        raise DataError(
            f"Fashion-MNIST file {name}[.gz] not found in {root}: install it with "
            "`apt-get install dataset-fashion-mnist` or set data.fmnist_dir to a directory holding the idx files"
        )
    ndim = 3 if magic == 2051 else 1
    header = 4 + 4 * ndim
    got_magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if got_magic != magic or len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path} is not a valid idx file (magic {got_magic}, {len(raw)} bytes)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# ---------------------------------------------------------------------------------------------------------
# Map-style sources: `load(i) -> PIL image in `in_chans` channels` (raises ImageDecodeError), `labels`, `name(i)`.


@dataclass
class ArraySource:
    """Images held in memory as uint8 (N, H, W) or (N, H, W, C), e.g. Fashion-MNIST."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return f"#{i}"

    def load(self, i: int, in_chans: int) -> Image.Image:
        return convert_image(Image.fromarray(self.images[i]), in_chans)


@dataclass
class FolderSource:
    """Image files read one by one. Paths are kept as a numpy bytes array (no per-item Python objects,
    so forked loader workers do not copy the list page by page through reference counting)."""

    root: str
    paths: np.ndarray  # bytes, relative to root
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def read(self, i: int) -> bytes:
        """The encoded file."""
        with open(self.name(i), "rb") as f:
            return f.read()

    def ext(self, i: int) -> str:
        return ext_of(self.paths[i].decode())

    def load(self, i: int, in_chans: int):
        """A PIL image in `in_chans` channels, or for a TIFF / .npy file a float32 (C, H, W) tensor."""
        return decode_sample(self.read(i), self.ext(i), in_chans)


@dataclass
class SyntheticSource:
    """Deterministic random images of 10 classes; a class sets the orientation of a sine grating and the
    tint, so a classifier can learn it. `split` 0 (train) and 1 (eval) give disjoint images."""

    size: int
    img_size: int
    split: int = 0

    def __len__(self) -> int:
        return self.size

    @property
    def labels(self) -> np.ndarray:
        return np.arange(self.size, dtype=np.int64) % SYNTHETIC_CLASSES

    @property
    def classes(self) -> list[str]:
        return [f"class_{c}" for c in range(SYNTHETIC_CLASSES)]

    def name(self, i: int) -> str:
        return f"synthetic#{i}"

    def load(self, i: int, in_chans: int) -> Image.Image:
        c, s = i % SYNTHETIC_CLASSES, self.img_size
        rng = np.random.default_rng([self.split, i])
        theta = np.pi * c / SYNTHETIC_CLASSES + rng.normal(0, 0.05)
        freq = rng.uniform(2.0, 5.0) * 2 * np.pi / s
        y, x = np.mgrid[0:s, 0:s].astype(np.float32)
        wave = np.sin(freq * (x * np.cos(theta) + y * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
        hue = np.array(
            [np.cos(2 * np.pi * c / 10), np.cos(2 * np.pi * c / 10 + 2.1), np.cos(2 * np.pi * c / 10 + 4.2)]
        )
        img = 0.5 + 0.3 * wave[..., None] + 0.15 * hue + rng.normal(0, 0.05, (s, s, 3))
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        return convert_image(Image.fromarray(img, "RGB"), in_chans)


def scan_folder(root: str) -> FolderSource:
    """An image folder: class subfolders (sorted names -> labels 0..K-1, files found recursively, as
    torchvision's ImageFolder) or, with no such subfolders, the image files directly inside (label -1)."""
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, labels, classes = [], [], []
    for name in subdirs:
        found = _image_files(os.path.join(root, name))
        if found:
            labels += [len(classes)] * len(found)
            paths += [os.path.join(name, p) for p in found]
            classes.append(name)
    if not paths:
        paths = sorted(e.name for e in os.scandir(root) if e.is_file() and _is_image_name(e.name))
        labels = [-1] * len(paths)
    if not paths:
        raise DataError(f"data source {root!r}: no image files found (extensions: {', '.join(IMAGE_EXTS)})")
    return FolderSource(root, np.array([p.encode() for p in paths]), np.array(labels, np.int64), classes)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in name


def _image_files(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        out += [os.path.normpath(os.path.join(rel, f)) for f in sorted(filenames) if _is_image_name(f)]
    return out


def parse_builtin(source: str, default_split: str) -> tuple[str, str] | None:
    """'fashion-mnist[:split]' / 'synthetic[:split]' -> (name, split); None for anything else."""
    name, _, split = source.partition(":")
    if name not in ("fashion-mnist", "synthetic"):
        return None
    split = split or default_split
    if split not in ("train", "test"):
        raise DataError(f"data source {source!r}: the split must be 'train' or 'test'")
    return name, split


def train_split(source: str) -> str:
    """A built-in name with its training split made explicit ('fashion-mnist' -> 'fashion-mnist:train'), so an
    eval loader reads the training images (e.g. a k-NN memory bank); other sources unchanged."""
    builtin = parse_builtin(source, "train")
    return f"{builtin[0]}:{builtin[1]}" if builtin and ":" not in source else source


def is_shard_source(source: str) -> bool:
    """True for shard patterns/URLs and for directories holding a shard manifest or .tar files."""
    if "::" in source or "{" in source or source.startswith("pipe:") or "://" in source:
        return True
    if source.endswith(".tar"):
        return True
    if os.path.isdir(source):
        if any(os.path.exists(os.path.join(source, m)) for m in MANIFESTS):
            return True
        return any(e.name.endswith(".tar") and e.is_file() for e in os.scandir(source))
    return False


def map_source(cfg, source: str, *, img_size: int, train: bool):
    """Resolve a non-shard source string to a map-style source."""
    builtin = parse_builtin(source, "train" if train else "test")
    if builtin:
        name, split = builtin
        if name == "synthetic":
            return SyntheticSource(int(cfg.synthetic_samples), img_size, split=0 if split == "train" else 1)
        images, labels = read_fashion_mnist(cfg.fmnist_dir or None, split)
        return ArraySource(images, labels, list(FMNIST_CLASSES))
    if os.path.isdir(source):
        return scan_folder(source)
    reason = "no such file or directory" if not os.path.exists(source) else "not a directory"
    raise DataError(f"data source {source!r}: {reason} ({SOURCE_HELP})")


def balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices interleaving the classes round-robin, each class in a seeded random order, so every prefix is
    (as nearly as possible) class-balanced. Unlabelled (-1) data gives a plain seeded permutation."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rank = np.empty(len(labels), np.int64)
    for idx in per_class:
        rank[idx] = np.arange(len(idx))
    keys = rng.random(len(labels))  # random order among classes within one round
    return np.lexsort((keys, rank))


def label_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A seeded class-balanced subset: round(fraction * n_c) (at least 1) of each class, sorted indices."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"data.label_fraction must be in (0, 1], got {fraction}")
    if (labels < 0).any():
        raise DataError(
            "data.label_fraction < 1 needs a labelled source (class subfolders or a built-in dataset)"
        )
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        keep.append(idx[: max(1, round(fraction * len(idx)))])
    return np.sort(np.concatenate(keep))
