"""mae.data: sources, splitting across ranks/workers, determinism, bad samples, image modes."""

import gzip
import io
import json
import os
import struct
import tarfile
from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mae.data import (
    DataError,
    ImageDecodeError,
    build_eval_loader,
    build_train_loader,
    convert_image,
    decode_image,
    read_fashion_mnist,
)


def data_cfg(**kw):
    base = dict(train="synthetic", val="", fmnist_dir="", num_workers=0, shuffle_buffer=50, epoch_samples=0,
                resampled=False, synthetic_samples=64, label_fraction=1.0, mean=[0.0], std=[1.0], scale_min=0.2,
                hflip=True, crop_pct=0.875, auto_augment="", reprob=0.0, decode="cpu")  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def png_bytes(value: int, cls: int = 0, size: int = 12) -> bytes:
    """A uniform RGB image whose red channel encodes `value` and green the class (survives any crop)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 40 * cls, 7)).save(buf, format="PNG")
    return buf.getvalue()


def ids_of(images: torch.Tensor) -> list[int]:
    """Recover the red value of uniform images normalized with mean 0, std 1."""
    return [round(float(v) * 255) for v in images[:, 0].mean((1, 2))]


def write_shards(d, n_shards: int, per_shard: int, bad_keys=()) -> list[int]:
    """Shards whose sample k has red value k and label k % 3; returns the ids."""
    os.makedirs(d, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(d, f"train-{s:06d}.tar")) as w:
            for j in range(per_shard):
                k = s * per_shard + j
                data = b"garbage" if k in bad_keys else png_bytes(k, k % 3)
                w.write({"__key__": f"{k:06d}", "png": data, "cls": str(k % 3).encode()})
    return list(range(n_shards * per_shard))


def run_epoch(cfg, source, world_size, batch_size, epoch=0, start_step=0, augment="mae", seed=0):
    out = []
    for rank in range(world_size):
        loader = build_train_loader(cfg, source=source, img_size=8, in_chans=3, batch_size=batch_size,
                                    augment=augment, seed=seed, rank=rank, world_size=world_size)  # fmt: skip
        out.append(list(loader.iterate(epoch, start_step)))
    return loader, out


@pytest.mark.parametrize("n_shards,per_shard", [(8, 6), (3, 8)])
def test_shards_two_ranks_two_workers_every_sample_once(tmp_path, n_shards, per_shard):
    ids = write_shards(tmp_path, n_shards, per_shard)
    cfg = data_cfg(num_workers=2, epoch_samples=len(ids))
    seen_by_epoch = []
    for epoch in (0, 1):
        loader, per_rank = run_epoch(cfg, str(tmp_path), world_size=2, batch_size=3, epoch=epoch)
        assert loader.steps_per_epoch == len(ids) // 6
        assert all(len(batches) == loader.steps_per_epoch for batches in per_rank)
        seen = [i for batches in per_rank for x, _, _ in batches for i in ids_of(x)]
        labels = [int(y) for batches in per_rank for _, ys, _ in batches for y in ys]
        assert sorted(seen) == ids
        assert labels == [i % 3 for i in seen]
        seen_by_epoch.append(seen)
    assert seen_by_epoch[0] != seen_by_epoch[1]  # reshuffled per epoch


UNEVEN = [11, 2, 7, 1, 13, 6]  # 40 samples in shards of very different sizes


def write_uneven_shards(d, sizes: list[int], manifest: bool) -> list[int]:
    """Shards of the given sizes, sample ids numbered across them; a dataset.json manifest or none."""
    os.makedirs(d, exist_ok=True)
    for s in range(len(sizes)):
        with wds.TarWriter(os.path.join(d, f"train-{s:06d}.tar")) as w:
            for k in range(sum(sizes[:s]), sum(sizes[: s + 1])):
                w.write({"__key__": f"{k:06d}", "png": png_bytes(k, k % 3), "cls": str(k % 3).encode()})
    if manifest:
        shards = [{"name": f"train-{s:06d}.tar", "samples": n} for s, n in enumerate(sizes)]
        (d / "dataset.json").write_text(json.dumps({"shards": shards, "classes": None}))
    return list(range(sum(sizes)))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_uneven_shards_one_epoch_reads_every_sample_once(tmp_path, world_size, workers):
    """As the reference's DistributedSampler: every sample once per epoch whatever the shard sizes, ranks
    and workers; with a sample count that no batch x ranks divides, the dropped rest is less than one
    global batch and nothing repeats. The order is a pure function of (seed, epoch), resume included."""
    ids = write_uneven_shards(tmp_path / "a", UNEVEN, manifest=True)
    cfg = data_cfg(num_workers=workers, shuffle_buffer=8)
    loader, per_rank = run_epoch(cfg, str(tmp_path / "a"), world_size, batch_size=4, epoch=2)
    seen = [i for batches in per_rank for x, _, _ in batches for i in ids_of(x)]
    assert sorted(seen) == ids
    assert all(len(batches) == loader.steps_per_epoch for batches in per_rank)
    assert [int(y) for b in per_rank for _, ys, _ in b for y in ys] == [i % 3 for i in seen]

    _, again = run_epoch(cfg, str(tmp_path / "a"), world_size, batch_size=4, epoch=2)
    assert [i for b in again for x, _, _ in b for i in ids_of(x)] == seen
    _, resumed = run_epoch(cfg, str(tmp_path / "a"), world_size, batch_size=4, epoch=2, start_step=1)
    assert [ids_of(x) for x, _, _ in resumed[-1]] == [ids_of(x) for x, _, _ in per_rank[-1][1:]]

    ids = write_uneven_shards(tmp_path / "b", [*UNEVEN, 5], manifest=False)  # 45: sizes from tar headers
    loader, per_rank = run_epoch(cfg, str(tmp_path / "b"), world_size, batch_size=4, epoch=0)
    seen = [i for batches in per_rank for x, _, _ in batches for i in ids_of(x)]
    assert len(seen) == len(set(seen)) == loader.steps_per_epoch * 4 * world_size > len(ids) - 4 * world_size


@pytest.mark.parametrize("epoch_samples", [17, 100])
def test_epoch_samples_other_than_the_shards_total_read_passes_evenly(epoch_samples):
    """data.epoch_samples below the total reads a part, each sample at most once; above it, pass after
    pass, so every sample is read floor or ceil(epoch_samples / total) times."""
    from mae.data.shards import epoch_pieces, worker_span

    offsets, reads = np.cumsum([0, *UNEVEN]), np.zeros(sum(UNEVEN), dtype=int)
    steps = epoch_samples // (2 * 4)
    for rank in range(2):
        for role in range(3):
            begin, end = worker_span(rank, role, 2, 3, steps, 4)
            for i, first, stop in epoch_pieces(UNEVEN, 0, 5, begin, end):
                reads[offsets[i] + first : offsets[i] + stop] += 1
    assert reads.sum() == steps * 2 * 4
    assert reads.max() - reads.min() <= 1


def test_piece_of_a_local_shard_starts_at_its_offset_with_the_same_samples(tmp_path):
    """A piece that starts inside a local shard seeks to its first sample (read from the member headers)
    and yields exactly what reading the shard from its start and dropping the samples before would."""
    from mae.data.shards import ShardStream, resolve_shards, sample_offset

    write_uneven_shards(tmp_path, [9], manifest=False)
    url = str(tmp_path / "train-000000.tar")
    stream = ShardStream(resolve_shards(url), transform=None, in_chans=3, img_size=8, batch_size=2, seed=0,
                         epoch=0, rank=0, world_size=1, train=True)  # fmt: skip
    keys = [s["__key__"] for s in stream._piece(url, 3, 7)]
    assert (
        keys
        == [s["__key__"] for s in islice(stream._samples([url]), 3, 7)]
        == ["000003", "000004", "000005", "000006"]
    )
    assert sample_offset(url, 3) > 0 and sample_offset(url, 9) is None


def test_shard_shorter_than_its_manifest_keeps_every_batch_in_place(tmp_path):
    ids = write_uneven_shards(tmp_path, [6, 6], manifest=False)
    (tmp_path / "dataset.json").write_text(json.dumps({"shards": [
        {"name": "train-000000.tar", "samples": 8}, {"name": "train-000001.tar", "samples": 6}]}))  # fmt: skip
    _, (batches,) = run_epoch(data_cfg(), str(tmp_path), world_size=1, batch_size=7)
    assert len(batches) == 2 and sum(n for *_, n in batches) == 2
    assert sorted(i for x, _, _ in batches for i in ids_of(x)) == ids


def test_shard_resume_matches_uninterrupted(tmp_path):
    write_shards(tmp_path, 4, 6)
    cfg = data_cfg(num_workers=2, epoch_samples=24)
    _, full = run_epoch(cfg, str(tmp_path), world_size=1, batch_size=4, epoch=3)
    _, resumed = run_epoch(cfg, str(tmp_path), world_size=1, batch_size=4, epoch=3, start_step=3)
    assert len(resumed[0]) == len(full[0]) - 3
    for (a, ya, _), (b, yb, _) in zip(full[0][3:], resumed[0]):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_shard_manifest_sets_epoch_and_classes(tmp_path):
    write_shards(tmp_path, 2, 5)
    (tmp_path / "dataset.json").write_text(
        '{"shards": [{"name": "train-000000.tar", "samples": 5}, {"name": "train-000001.tar", "samples": 5}],'
        ' "classes": ["a", "b", "c"], "num_classes": 3}'
    )
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    for source in (str(tmp_path), pattern):
        loader = build_train_loader(data_cfg(), source=source, img_size=8, in_chans=3, batch_size=2,
                                    augment="mae", seed=0, rank=0, world_size=1)  # fmt: skip
        assert (loader.num_samples, loader.steps_per_epoch, loader.num_classes) == (10, 5, 3)


def test_corrupt_shard_member_is_skipped_and_counted(tmp_path):
    write_shards(tmp_path, 2, 6, bad_keys={1, 7, 8})
    cfg = data_cfg(num_workers=0, epoch_samples=12)
    _, (batches,) = run_epoch(cfg, str(tmp_path), world_size=1, batch_size=4)
    seen = [i for x, _, _ in batches for i in ids_of(x)]
    assert sorted(seen) == [i for i in range(12) if i not in {1, 7, 8}]
    assert sum(n for _, _, n in batches) == 3
    assert sum(len(x) for x, _, _ in batches) == 9  # skipped, never replaced by zero images
    ev = build_eval_loader(
        cfg, source=str(tmp_path), img_size=8, in_chans=3, batch_size=5, rank=0, world_size=1
    )
    assert sum(n for _, _, n in ev) == 3


def make_folder(root, n: int, bad: dict | None = None):
    """n class folders holding one image each (label i == id i), plus bad files {name: bytes} in class 0."""
    for i in range(n):
        (root / f"c{i:03d}").mkdir(parents=True)
        (root / f"c{i:03d}" / "img.png").write_bytes(png_bytes(i, 0))
    for name, data in (bad or {}).items():
        (root / "c000" / name).write_bytes(data)


def batches_of(cfg, source, *, rank=0, world_size=1, epoch=0, start_step=0, batch_size=4, seed=0):
    loader = build_train_loader(cfg, source=source, img_size=8, in_chans=3, batch_size=batch_size,
                                augment="mae", seed=seed, rank=rank, world_size=world_size)  # fmt: skip
    return loader, list(loader.iterate(epoch, start_step))


def test_map_style_batches_are_a_pure_function_of_seed_epoch_rank_step(tmp_path):
    cfg0, cfg2 = data_cfg(num_workers=0), data_cfg(num_workers=2)
    loader, full = batches_of(cfg0, "synthetic", rank=1, world_size=2, epoch=2)
    assert len(full) == loader.steps_per_epoch == 64 // 8
    _, workers2 = batches_of(cfg2, "synthetic", rank=1, world_size=2, epoch=2)
    _, resumed = batches_of(cfg2, "synthetic", rank=1, world_size=2, epoch=2, start_step=5)
    for a, b in zip(full, workers2):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _, other_epoch = batches_of(cfg0, "synthetic", rank=1, world_size=2, epoch=3)
    assert not torch.equal(full[0][0], other_epoch[0][0])


def test_map_style_ranks_are_disjoint_and_cover_the_epoch(tmp_path):
    make_folder(tmp_path, 24)
    cfg = data_cfg()
    seen = []
    for rank in range(3):
        loader, batches = batches_of(cfg, str(tmp_path), rank=rank, world_size=3, batch_size=4, epoch=1)
        assert loader.num_classes == 24 and loader.steps_per_epoch == 2
        for x, y, _ in batches:
            assert ids_of(x) == y.tolist()  # the label belongs to the image
            seen += y.tolist()
    assert sorted(seen) == list(range(24))


def test_folder_corrupt_files_are_skipped_and_counted(tmp_path):
    jpg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpg, format="JPEG")
    bad = {"zero.png": b"", "text.jpg": b"hello, not an image", "cut.jpg": jpg.getvalue()[:300]}
    make_folder(tmp_path, 6, bad)
    cfg = data_cfg(num_workers=2)
    ev = build_eval_loader(
        cfg, source=str(tmp_path), img_size=8, in_chans=3, batch_size=4, rank=0, world_size=1
    )
    assert ev.num_samples == 9
    out = list(ev)
    assert sum(n for *_, n in out) == 3
    assert sorted(i for x, _, _ in out for i in ids_of(x)) == list(range(6))


def test_eval_loader_every_sample_once_across_ranks_and_balanced_subset(tmp_path):
    make_folder(tmp_path, 10)
    cfg = data_cfg()
    seen = []
    for rank in range(3):
        ev = build_eval_loader(
            cfg, source=str(tmp_path), img_size=8, in_chans=3, batch_size=3, rank=rank, world_size=3
        )
        seen += [int(v) for _, y, _ in ev for v in y]
    assert sorted(seen) == list(range(10))
    ev = build_eval_loader(cfg, source="synthetic", img_size=8, in_chans=3, batch_size=7, rank=0, world_size=1,
                           max_samples=30)  # fmt: skip
    labels = torch.cat([y for _, y, _ in ev])
    assert ev.num_samples == len(labels) == 30
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 10


def test_label_fraction_is_class_balanced(tmp_path):
    cfg = data_cfg(synthetic_samples=200, label_fraction=0.1)
    loader, batches = batches_of(cfg, "synthetic", batch_size=5)
    labels = torch.cat([y for _, y, _ in batches])
    assert loader.num_samples == 20
    assert torch.bincount(labels, minlength=10).tolist() == [2] * 10
    make_folder(tmp_path / "flat_parent", 1)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        (flat / f"{i}.png").write_bytes(png_bytes(i))
    with pytest.raises(DataError, match="labelled"):
        batches_of(cfg, str(flat))
    loader, batches = batches_of(data_cfg(), str(flat), batch_size=2)
    assert loader.num_classes == 0 and all((y == -1).all() for _, y, _ in batches)


def test_bad_sources_are_data_errors(tmp_path):
    cfg = data_cfg()
    kw = dict(img_size=8, in_chans=3, batch_size=2, augment="mae", seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="nope"):
        build_train_loader(cfg, source=str(tmp_path / "nope"), **kw)
    with pytest.raises(DataError, match="no image files"):
        build_train_loader(cfg, source=str(tmp_path), **kw)
    write_shards(tmp_path / "shards", 1, 2)
    with pytest.raises(DataError, match="train-000001.tar does not exist"):
        build_train_loader(cfg, source=str(tmp_path / "shards" / "train-{000000..000001}.tar"), **kw)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_train_loader(data_cfg(fmnist_dir=str(tmp_path)), source="fashion-mnist", **kw)
    with pytest.raises(DataError, match="augment"):
        build_train_loader(cfg, source="synthetic", **dict(kw, augment="strong"))
    with pytest.raises(DataError, match="data.mean"):
        build_train_loader(data_cfg(mean=[0.5, 0.5]), source="synthetic", **kw)


def write_idx(path, arr: np.ndarray, magic: int, gz: bool):
    raw = struct.pack(f">{1 + arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


@pytest.mark.parametrize("gz", [True, False])
def test_read_fashion_mnist_idx(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, 2051, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(5), 2049, gz)
    x, y = read_fashion_mnist(str(tmp_path), "test")
    assert x.dtype == np.uint8 and x.shape == (5, 28, 28) and (x == images).all()
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 2, 3, 4]
    ev = build_eval_loader(data_cfg(fmnist_dir=str(tmp_path)), source="fashion-mnist", img_size=28, in_chans=1,
                           batch_size=5, rank=0, world_size=1, max_samples=0)  # fmt: skip
    (imgs, labels, n_bad), = list(ev)  # fmt: skip
    assert imgs.shape == (5, 1, 28, 28) and ev.num_classes == 10 and n_bad == 0


def test_finetune_and_grayscale_transforms_shapes():
    for in_chans, mean in ((3, [0.485, 0.456, 0.406]), (1, [0.485, 0.456, 0.406]), (4, [0.5])):
        cfg = data_cfg(mean=mean, std=[0.25], auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
        loader = build_train_loader(cfg, source="synthetic", img_size=16, in_chans=in_chans, batch_size=4,
                                    augment="finetune", seed=0, rank=0, world_size=1)  # fmt: skip
        x, y, n_bad = next(loader.iterate(0))
        assert x.shape == (4, in_chans, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_odd_image_modes_convert():
    cmyk = decode_image(encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"), 3)
    assert cmyk.mode == "RGB" and np.asarray(cmyk).min() >= 250  # no ink = white
    g16 = Image.fromarray(np.array([[0, 32896, 65535, 1000]], dtype=np.uint16))
    gray = decode_image(encode(g16, "PNG"), 1)
    assert gray.mode == "L" and np.asarray(gray).tolist() == [[0, 128, 255, 4]]  # scaled, not clipped at 255
    assert decode_image(encode(g16, "PNG"), 3).mode == "RGB"
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert np.asarray(decode_image(encode(pal, "PNG"), 3)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    data = encode(rgba, "PNG")
    assert np.asarray(decode_image(data, 3)).tolist() == [[[10, 20, 30], [255, 255, 255]]]  # over white
    assert np.asarray(decode_image(data, 4)).tolist() == [[[10, 20, 30, 255], [0, 0, 0, 0]]]
    assert decode_image(data, 1).mode == "L"
    la = Image.new("LA", (2, 2), (100, 255))
    assert np.asarray(decode_image(encode(la, "PNG"), 1)).tolist() == [[100, 100], [100, 100]]
    assert convert_image(Image.new("L", (3, 3), 7), 4).mode == "RGBA"


@pytest.mark.parametrize("data", [b"", b"plain text", encode(Image.new("RGB", (64, 64), 5), "JPEG")[:200]])
def test_decode_rejects_bad_bytes(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data, 3)


def test_truncated_tar_shard_is_counted_and_stream_continues(tmp_path):
    write_shards(tmp_path, 2, 6)
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path) as tf:
        cut = [m for m in tf.getmembers() if m.name.startswith("000003")][0].offset_data + 20
    path.write_bytes(path.read_bytes()[:cut])
    ev = build_eval_loader(
        data_cfg(), source=str(tmp_path), img_size=8, in_chans=3, batch_size=4, rank=0, world_size=1
    )
    out = list(ev)
    seen = sorted(i for x, _, _ in out for i in ids_of(x))
    assert seen == [0, 1, 2] + list(range(6, 12))
    assert sum(n for *_, n in out) >= 1


def test_bare_builtin_name_is_train_split_for_training_and_test_split_for_eval():
    from mae.data import train_split

    assert (
        train_split("fashion-mnist") == "fashion-mnist:train"
        and train_split("synthetic") == "synthetic:train"
    )
    assert train_split("fashion-mnist:test") == "fashion-mnist:test" and train_split("/data/x") == "/data/x"
    cfg = data_cfg(synthetic_samples=10)
    kw = dict(img_size=8, in_chans=3, batch_size=10, rank=0, world_size=1)
    bare, held_out, train = (next(iter(build_eval_loader(cfg, source=s, **kw)))[0] for s in
                             ("synthetic", "synthetic:test", "synthetic:train"))  # fmt: skip
    assert torch.equal(bare, held_out) and not torch.equal(bare, train)
    loader = build_train_loader(cfg, source="synthetic", augment="none", seed=0, **dict(kw, batch_size=5))
    first = torch.cat([x for x, _, _ in loader.iterate(0)])
    assert any(torch.equal(first[0], t) for t in train)  # the training loader reads the train split


def test_every_training_crop_honours_scale_min():
    from mae.data import build_transform
    from mae.tasks import load_config

    for augment, in_chans in (("mae", 3), ("linprobe", 3), ("finetune", 3), ("finetune", 1)):
        cfg = load_config(
            ["data.scale_min=0.35", f"model.in_chans={in_chans}", "data.mean=[0.5]", "data.std=[0.5]"]
        )
        t = build_transform(cfg.data, augment, 32, in_chans)
        crops = [x for x in t.transforms if "RandomResizedCrop" in type(x).__name__]
        assert [tuple(c.scale) for c in crops] == [(0.35, 1.0)], (augment, in_chans)


def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    """rand-m9-mstd0.5-inc1 can draw posterize with 0 bits, which Pillow 12+ refuses."""
    from PIL import Image

    from mae.data import build_transform
    from mae.tasks import load_config

    cfg = load_config(["recipe=finetune_vit_base", "model.img_size=32"])
    t = build_transform(cfg.data, "finetune", 32, 3)
    ra = next(x for x in t.transforms if type(x).__name__ == "RandAugment")
    post = next(op for op in ra.ops if op.name.startswith("Posterize"))
    img = Image.new("RGB", (40, 40), (200, 100, 50))
    out = post.aug_fn(img, 0)
    assert out.size == img.size and out.getpixel((0, 0)) == (0, 0, 0)
    assert post.aug_fn(img, 4).getpixel((0, 0)) == (192, 96, 48)


def reference_crop_params(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The reference linear probe's crop box (facebookresearch/mae util/crop.py), transcribed: one draw of
    area and log aspect ratio, clamped to the image."""
    import math

    target_area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
    w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
    h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
    i = torch.randint(0, height - h + 1, size=(1,)).item()
    j = torch.randint(0, width - w + 1, size=(1,)).item()
    return i, j, h, w


@pytest.mark.parametrize("size,ref_area,tv_area", [((500, 375), 0.518, 0.435), ((500, 333), 0.502, 0.391)])
def test_linprobe_crop_is_the_reference_single_draw_crop(size, ref_area, tv_area):
    """Same boxes as the reference for the same torch RNG state, hence its larger mean crop area than
    torchvision's retry-loop crop."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    from mae.data import build_transform

    crop = next(t for t in build_transform(data_cfg(scale_min=0.08), "linprobe", 224, 3).transforms)
    img = Image.new("RGB", size)
    torch.manual_seed(0)
    ours = [crop.get_params(img, crop.scale, crop.ratio) for _ in range(4000)]
    torch.manual_seed(0)
    assert ours == [reference_crop_params(*size) for _ in range(4000)]
    torch.manual_seed(0)
    torchvision = [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    area = lambda boxes: sum(h * w for *_, h, w in boxes) / len(boxes) / (size[0] * size[1])  # noqa: E731
    assert area(ours) == pytest.approx(ref_area, abs=0.01) and area(torchvision) == pytest.approx(
        tv_area, abs=0.01
    )
    assert crop.size == (224, 224) and crop.interpolation == InterpolationMode.BICUBIC
