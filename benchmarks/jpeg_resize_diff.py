"""How far the JPEG crops of the MAE transform (torchvision decode + torch's antialiased bicubic) are from
PIL's decode + RandomResizedCrop(bicubic), same boxes: the mean absolute pixel difference on real photos.

    python benchmarks/jpeg_resize_diff.py [--size 224] [--crops 25]

The photos are scikit-image's, saved as JPEG (quality 90); differences are in levels of 255.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's `mae`, run from anywhere

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

from mae.data import build_transform, decode_image  # noqa: E402
from mae.data.jpeg import CropDraw, worker_sample  # noqa: E402
from mae.data.transforms import sample_seed, seeded  # noqa: E402

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "cat",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--crops", type=int, default=25, help="random crops per photo")
    args = p.parse_args()
    cfg = SimpleNamespace(mean=[0.5], std=[0.5], scale_min=0.2, hflip=True, crop_pct=0.875)
    pil = build_transform(cfg, "mae", args.size, 3, uint8=True)
    draw = CropDraw(args.size, (0.2, 1.0), True)
    means, peak, used = [], 0.0, 0
    for name in PHOTOS:
        if not hasattr(skimage.data, name):
            continue
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, format="JPEG", quality=90)
        data, used = buf.getvalue(), used + 1
        for k in range(args.crops):
            seed = sample_seed(7, used, k)
            ours = worker_sample(data, 3, pil, draw, seed, to_device=False)
            with seeded(seed):
                ref = pil(decode_image(data, 3))
            d = (ours.float() - ref.float()).abs()
            means.append(float(d.mean()))
            peak = max(peak, float(d.max()))
    print(f"{len(means)} crops of {used} photos at {args.size} px: mean |diff| {np.mean(means):.3f} levels of 255 "
          f"(per crop {min(means):.3f} to {max(means):.3f}), largest pixel difference {peak:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
