"""Benchmark: shard build rate, and read + decode + RandomResizedCrop throughput per loader worker from
shards vs the same images read file by file from an image folder (torchvision ImageFolder, as the
reference MAE does).

    python -m data_tools.bench [--images 512] [--size 500x375] [--workers N] [--img-size 224]

Images are ImageNet-sized JPEGs cut from scikit-image's photos. Both readers run in one process
(num_workers=0) over files already in the page cache, so the numbers are per-worker decode-bound
rates; on network file systems the folder path also pays one open() per image.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from types import SimpleNamespace

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_images(root: str, n: int, size: tuple[int, int], classes: int = 4) -> None:
    """n JPEGs (quality 90) of `size`, random crops of real photos resized, in `classes` class folders."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = [getattr(skimage.data, p)() for p in PHOTOS]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = (
            Image.fromarray(photo[y : y + ch, x : x + cw])
            .convert("RGB")
            .resize(size, Image.Resampling.BICUBIC)
        )
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def data_cfg() -> SimpleNamespace:
    return SimpleNamespace(train="", val="", fmnist_dir="", num_workers=0, shuffle_buffer=1000, epoch_samples=0,
                           resampled=False, synthetic_samples=0, label_fraction=1.0, mean=[0.485, 0.456, 0.406],
                           std=[0.229, 0.224, 0.225], scale_min=0.2, hflip=True, crop_pct=0.875, auto_augment="",
                           reprob=0.0)  # fmt: skip


def rate(batches, n_expected: int) -> float:
    """Images per second through an iterable of batches whose first element is the image tensor."""
    t0, n = time.perf_counter(), 0
    for b in batches:
        n += len(b[0])
    dt = time.perf_counter() - t0
    assert n >= n_expected * 0.9, f"read {n} of {n_expected} images"
    return n / dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", default="500x375", help="WxH of the generated JPEGs (ImageNet's typical size)")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="make_shards processes")
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each reader (best is reported)")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    import torch  # after the arguments: --help answers without it

    from data_tools import make_shards
    from mae.data import build_train_loader, build_transform

    size = tuple(int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or tmp
        folder, shard_dir = os.path.join(work, "images"), os.path.join(work, "shards")
        make_images(folder, args.images, size)
        folder_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)

        t0 = time.perf_counter()
        argv_build = [folder, shard_dir, "--samples-per-shard", str(args.samples_per_shard), "--overwrite",
                      "--workers", str(args.workers), "--no-progress"]  # fmt: skip
        if make_shards.main(argv_build) != 0:
            return 1
        build_s = time.perf_counter() - t0
        n_shards = len([f for f in os.listdir(shard_dir) if f.endswith(".tar")])

        cfg, kw = data_cfg(), dict(img_size=args.img_size, in_chans=3, batch_size=args.batch_size)
        shards = build_train_loader(cfg, source=shard_dir, augment="mae", seed=0, rank=0, world_size=1, **kw)
        from torchvision.datasets import ImageFolder

        reference = ImageFolder(folder, transform=build_transform(cfg, "mae", args.img_size, 3))
        loader = torch.utils.data.DataLoader(
            reference, batch_size=args.batch_size, shuffle=True, num_workers=0
        )
        shard_rates, folder_rates = [], []
        for epoch in range(
            args.repeats
        ):  # alternate, keep the best: a shared machine only ever slows a run down
            shard_rates.append(rate(shards.iterate(epoch), shards.steps_per_epoch * args.batch_size))
            folder_rates.append(rate(loader, len(reference)))
        shard_rate, folder_rate = max(shard_rates), max(folder_rates)

    result = {
        "images": args.images, "image_size": list(size), "jpeg_bytes_mean": folder_bytes // args.images,
        "build_workers": args.workers, "shards": n_shards, "build_seconds": round(build_s, 3),
        "shards_per_s": round(n_shards / build_s, 2), "build_images_per_s": round(args.images / build_s, 1),
        "shard_read_images_per_s_per_worker": round(shard_rate, 1),
        "folder_read_images_per_s_per_worker": round(folder_rate, 1),
        "shard_vs_folder_ratio": round(shard_rate / folder_rate, 3),
    }  # fmt: skip
    print(f"{args.images} JPEGs {size[0]}x{size[1]} (mean {result['jpeg_bytes_mean'] // 1000} kB), "
          f"RandomResizedCrop {args.img_size} + flip + normalize, torch threads 1")  # fmt: skip
    print(f"build:  {n_shards} shards in {build_s:.2f} s with {args.workers} workers = "
          f"{result['shards_per_s']} shards/s, {result['build_images_per_s']} images/s")  # fmt: skip
    print(f"read per worker:  shards {shard_rate:.1f} img/s   folder (ImageFolder) {folder_rate:.1f} img/s   "
          f"ratio {result['shard_vs_folder_ratio']:.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def cli() -> None:
    from mae.cli import exit_with

    exit_with(main, "data_tools.bench")


if __name__ == "__main__":
    cli()
