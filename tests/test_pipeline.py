"""The input pipeline's device half: uint8 batches, device-side JPEG decode and crop, prefetch, synthetic data."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from test_data import data_cfg
from torchvision import transforms as T

from mae.data import DataError, build_train_loader
from mae.data.device import Finisher, Prefetcher, RawBatch, assemble, normalize
from mae.data.jpeg import CropDraw, jpeg_header
from mae.data.transforms import build_transform, sample_seed, seeded

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def photo(k: int, size=(96, 72)) -> Image.Image:
    """Real photos (scikit-image's), resized to a small non-square size."""
    from skimage import data

    pics = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return Image.fromarray(pics[k % len(pics)]).resize(size, Image.BICUBIC)


def jpeg_folder(d, n: int, extra: dict | None = None) -> str:
    """n photos as JPEG files in two class folders, plus `extra` {name: bytes}."""
    for k in range(n):
        os.makedirs(d / f"c{k % 2}", exist_ok=True)
        photo(k).save(d / f"c{k % 2}" / f"{k:03d}.jpg", quality=90)
    for name, data in (extra or {}).items():
        (d / "c0" / name).write_bytes(data)
    return str(d)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def loader(cfg, source, batch_size=4, start_step=0, epoch=0, img_size=32, augment="mae"):
    ld = build_train_loader(cfg, source=source, img_size=img_size, in_chans=3, batch_size=batch_size,
                            augment=augment, seed=3, rank=0, world_size=1)  # fmt: skip
    return ld, list(ld.iterate(epoch, start_step))


def test_uint8_crops_normalised_later_equal_the_float_path():
    cfg = data_cfg(mean=MEAN, std=STD)
    as_uint8 = build_transform(cfg, "mae", 64, 3, uint8=True)
    as_float = build_transform(cfg, "mae", 64, 3)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for k in range(4):
        with seeded(sample_seed(0, k)):
            u = as_uint8(photo(k))
        with seeded(sample_seed(0, k)):
            f = as_float(photo(k))
        assert u.dtype == torch.uint8
        assert (normalize(u[None], mean, std)[0] - f).abs().max() <= 1e-6  # the same operations: same floats


def test_workers_hand_over_a_quarter_of_the_bytes(tmp_path):
    src = jpeg_folder(tmp_path, 8)
    ld, _ = loader(data_cfg(mean=MEAN, std=STD), src)
    raw = next(ld.raw(0))
    assert raw.pixels.dtype == torch.uint8 and raw.nbytes() < 4 * 32 * 32 * 3 + 64
    images, labels, n_bad = ld.finish(raw, torch.device("cpu"))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32) and n_bad == 0


def test_crop_box_and_flip_are_the_cpu_transforms_and_follow_torchvision():
    draw = CropDraw(32, (0.2, 1.0), hflip=True)
    rrc = T.RandomResizedCrop(32, scale=(0.2, 1.0))
    img = torch.zeros(3, 375, 500)
    ours, theirs, flips = [], [], []
    for k in range(3000):
        with seeded(sample_seed(1, k)):
            box, flip = draw(375, 500)
        with seeded(sample_seed(1, k)):  # the same seed: the box the CPU transform crops
            assert box == tuple(rrc.get_params(img, rrc.scale, rrc.ratio))
            assert flip == bool(torch.rand(1) < 0.5)
        ours.append(box)
        flips.append(flip)
    g = torch.Generator().manual_seed(12345)  # independent draws of torchvision itself
    state = torch.random.get_rng_state()
    torch.random.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
    theirs = [tuple(rrc.get_params(img, rrc.scale, rrc.ratio)) for _ in range(3000)]
    torch.random.set_rng_state(state)
    a, b = np.array(ours, float), np.array(theirs, float)
    for f in (
        lambda x: x[:, 2] * x[:, 3],
        lambda x: np.log(x[:, 3] / x[:, 2]),
        lambda x: x[:, 0],
        lambda x: x[:, 1],
    ):
        assert stats.ks_2samp(f(a), f(b)).pvalue > 1e-3
    assert abs(np.mean(flips) - 0.5) < 0.04


def test_jpeg_header_reads_size_and_components():
    assert jpeg_header(encoded(photo(0, (50, 30)), "JPEG")) == (30, 50, 3)
    assert jpeg_header(encoded(photo(0, (50, 30)), "JPEG", progressive=True)) == (30, 50, 3)
    assert jpeg_header(encoded(Image.new("L", (7, 9)), "JPEG")) == (9, 7, 1)
    assert jpeg_header(encoded(Image.new("CMYK", (7, 9)), "JPEG"))[2] == 4
    assert jpeg_header(encoded(photo(0), "PNG")) is None and jpeg_header(b"\xff\xd8garbage") is None


def test_jpeg_crops_are_within_a_pixel_level_of_pil_bicubic():
    """JPEG crops (torchvision decode, torch's antialiased bicubic) against the PIL transform, same seeds."""
    from mae.data import decode_image
    from mae.data.jpeg import worker_sample

    pil = build_transform(data_cfg(), "mae", 48, 3, uint8=True)
    draw = CropDraw(48, (0.2, 1.0), hflip=True)
    for k in range(8):
        data = encoded(photo(k, (160, 120)), "JPEG", quality=90)
        ours = worker_sample(data, 3, pil, draw, sample_seed(5, k), to_device=False)
        with seeded(sample_seed(5, k)):
            ref = pil(decode_image(data, 3))
        assert ours.dtype == ref.dtype == torch.uint8 and ours.shape == ref.shape
        assert (ours.float() - ref.float()).abs().mean() < 1.0  # a fraction of one level of 255


def test_device_decode_matches_the_cpu_path_and_resumes_exactly(tmp_path):
    src = jpeg_folder(tmp_path, 16)
    _, cpu = loader(data_cfg(mean=[0.0], std=[1.0]), src)
    ld, dev = loader(data_cfg(mean=[0.0], std=[1.0], decode="device"), src)
    assert ld.decode == "device" and next(ld.raw(0)).jpeg is not None
    for (xc, yc, _), (xd, yd, _) in zip(cpu, dev):
        assert torch.equal(yc, yd) and torch.equal(xc, xd)  # the same crop code, in the worker or not
    _, resumed = loader(data_cfg(mean=[0.0], std=[1.0], decode="device"), src, start_step=2)
    assert len(resumed) == 2
    for (xa, ya, _), (xb, yb, _) in zip(dev[2:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_device_decode_falls_back_for_png_and_cmyk_and_counts_corrupt_files(tmp_path):
    jpg = encoded(photo(1), "JPEG")
    extra = {
        "png.png": encoded(photo(2), "PNG"),
        "cmyk.jpg": encoded(photo(3).convert("CMYK"), "JPEG"),
        "truncated.jpg": jpg[: len(jpg) // 2],  # a readable header: left for the device, which rejects it
        "garbage.jpg": b"\xff\xd8not a jpeg at all",  # no header: the worker's decoder rejects it
    }
    src = jpeg_folder(tmp_path, 8, extra)  # 12 files, 3 batches of 4
    ld = build_train_loader(data_cfg(decode="device", num_workers=1), source=src, img_size=32, in_chans=3,
                            batch_size=4, augment="mae", seed=0, rank=0, world_size=1)  # fmt: skip
    raws = list(ld.raw(0))
    in_worker = sum(len(r.pixels) for r in raws)
    on_device = sum(len(r.deferred_at) for r in raws if r.jpeg is not None)
    assert in_worker == 2 and on_device == 9 and sum(r.n_bad for r in raws) == 1  # png + cmyk; garbage
    batches = [ld.finish(r, torch.device("cpu")) for r in raws]
    assert sum(len(x) for x, _, _ in batches) == 10 and sum(n for _, _, n in batches) == 2
    assert all(x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all() for x, _, _ in batches)
    cpu = build_train_loader(data_cfg(decode="cpu", num_workers=1), source=src, img_size=32, in_chans=3,
                             batch_size=4, augment="mae", seed=0, rank=0, world_size=1)  # fmt: skip
    on_cpu = list(cpu.iterate(0))  # the same two files are bad, found in the worker
    assert sum(len(x) for x, _, _ in on_cpu) == 10 and sum(n for _, _, n in on_cpu) == 2
    for (xa, ya, _), (xb, yb, _) in zip(batches, on_cpu):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_decode_setting_is_checked(tmp_path):
    kw = dict(source="synthetic", img_size=16, in_chans=3, batch_size=4, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="data.decode"):
        build_train_loader(data_cfg(decode="gpu"), augment="mae", **kw)
    with pytest.raises(DataError, match="finetune"):
        build_train_loader(data_cfg(decode="device"), augment="finetune", **kw)
    src = jpeg_folder(tmp_path, 8)
    auto = build_train_loader(data_cfg(decode="auto"), **dict(kw, source=src), augment="mae")
    assert auto.decode == ("device" if torch.cuda.is_available() else "cpu")


def test_prefetcher_on_cpu_passes_batches_through_in_order():
    finish = Finisher([0.5], [0.25], 4, 1)
    raws = [assemble([torch.full((1, 4, 4), k, dtype=torch.uint8)], [k], k % 2, (1, 4, 4)) for k in range(5)]
    pulled = []

    def source():
        for r in raws:
            pulled.append(r)
            yield r

    it = iter(Prefetcher(source(), torch.device("cpu"), finish))
    first = next(it)
    assert len(pulled) == 1  # no read-ahead where there is nothing to overlap
    out = [first, *it]
    assert [int(y) for _, y, _ in out] == list(range(5)) and [n for *_, n in out] == [0, 1, 0, 1, 0]
    for k, (x, _, _) in enumerate(out):
        assert torch.allclose(x, torch.full((1, 1, 4, 4), (k / 255 - 0.5) / 0.25))


def test_synthetic_pretraining_batches_are_drawn_on_the_device_and_resume_exactly():
    cfg = data_cfg(synthetic_samples=48, mean=[0.5], std=[0.25])
    ld, full = loader(cfg, "synthetic", batch_size=8, epoch=1)
    raw = next(ld.raw(1))
    assert isinstance(raw, RawBatch) and raw.render is not None and raw.nbytes() < 200  # indices and labels
    _, resumed = loader(cfg, "synthetic", batch_size=8, epoch=1, start_step=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], resumed))
    x = torch.cat([b[0] for b in full])
    assert x.shape == (48, 3, 32, 32) and not torch.equal(full[0][0], full[1][0])
    # the distribution of sources.SyntheticSource: mean pixel ~0.5 (+ tint), a visible grating
    pixels = x * 0.25 + 0.5
    assert 0.35 < float(pixels.mean()) < 0.65 and float(pixels.std()) > 0.15
    labels = torch.cat([b[1] for b in full])
    assert sorted(labels.tolist()) == sorted(i % 10 for i in range(48))


def test_device_decode_from_shards_resumes_exactly_and_counts_a_corrupt_jpeg(tmp_path):
    import webdataset as wds

    jpg = encoded(photo(0), "JPEG")
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as w:
        for k in range(16):
            data = jpg[: len(jpg) // 2] if k == 5 else encoded(photo(k), "JPEG", quality=85)
            w.write({"__key__": f"{k:04d}", "jpg": data, "cls": str(k % 2).encode()})
    cfg = data_cfg(decode="device", num_workers=2, shuffle_buffer=8)
    _, full = loader(cfg, str(tmp_path))
    _, resumed = loader(cfg, str(tmp_path), start_step=1)
    assert sum(n for *_, n in full) == 1 and sum(len(x) for x, _, _ in full) == 15
    for (xa, ya, _), (xb, yb, _) in zip(full[1:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_bench_data_puts_decode_modes_beside_the_reference_loader(tmp_path, capsys):
    from mae.bench import main

    src = jpeg_folder(tmp_path / "imgs", 8)
    out = tmp_path / "data.json"
    argv = ["--data", src, "--decode", "cpu,device", "--reference", "--img-size", "32", "--batch", "4"]
    assert main([*argv, "--data-batches", "1", "--json", str(out)]) == 0
    rows = {(r["loader"], r["decode"]): r for r in json.loads(out.read_text())["data"]}
    assert set(rows) == {("mae", "cpu"), ("mae", "device"), ("reference", "cpu")}
    assert all(r["images"] == 4 and r["img_per_s_per_worker"] > 0 for r in rows.values())
    # uint8 crops: a quarter of the reference's float32 bytes; device decode: the encoded files
    assert rows[("reference", "cpu")]["bytes_per_image"] / rows[("mae", "cpu")]["bytes_per_image"] > 3.9
    jpeg_sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs]
    assert rows[("mae", "device")]["bytes_per_image"] < max(jpeg_sizes) + 100
    assert "vs ref" in capsys.readouterr().out
