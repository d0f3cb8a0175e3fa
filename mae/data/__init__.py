"""Data: webdataset shards, image folders, Fashion-MNIST and a synthetic set behind one loader interface."""

from .images import IMAGE_EXTS, ImageDecodeError, convert_image, decode_image
from .images import convert_image as to_channels
from .loaders import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from .shards import MANIFEST, read_manifest, resolve_shards
from .sources import FMNIST_CLASSES, DataError, read_fashion_mnist, scan_folder, train_split
from .transforms import build_transform, eval_transform

__all__ = [
    "DataError",
    "EvalLoader",
    "FMNIST_CLASSES",
    "IMAGE_EXTS",
    "ImageDecodeError",
    "MANIFEST",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "build_transform",
    "convert_image",
    "decode_image",
    "eval_transform",
    "read_fashion_mnist",
    "read_manifest",
    "resolve_shards",
    "scan_folder",
    "to_channels",
    "train_split",
]
