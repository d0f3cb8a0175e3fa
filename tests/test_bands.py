"""Multi-band images (TIFF, .npy): exact values through folders and shards, deterministic crops for every
augmentation, the in_chans and data.mean/std checks, the data tools, the figures and a pretraining run."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import webdataset as wds
import yaml
from PIL import Image
from safetensors.torch import load_file

from data_tools import make_shards, stats, verify_shards
from mae.data import DataError, build_eval_loader, build_train_loader
from mae.data.bands import decode_bands
from mae.data.transforms import build_transform, resolve_norm, sample_seed, seeded
from mae.eval.figures import figure
from mae.pretrain import main as pretrain
from tests.conftest import needs_fmnist
from tests.test_data import data_cfg

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16

# How a file is written: (extension, dtype, writer). Each writer takes the (H, W, C) array.
KINDS = {
    "tif-uint16-chunky": ("tif", np.uint16, lambda p, a: tifffile.imwrite(p, a, photometric="minisblack", planarconfig="contig")),
    "tif-uint16-planar": ("tiff", np.uint16, lambda p, a: tifffile.imwrite(p, a.transpose(2, 0, 1), photometric="minisblack", planarconfig="separate")),
    "tif-float32-pages": ("tif", np.float32, lambda p, a: tifffile.imwrite(p, a, photometric="minisblack")),  # pages
    "npy-uint16-hwc": ("npy", np.uint16, lambda p, a: np.save(p, a)),
    "npy-float32-chw": ("npy", np.float32, lambda p, a: np.save(p, a.transpose(2, 0, 1))),
    "npy-uint8-hwc": ("npy", np.uint8, lambda p, a: np.save(p, a)),
}  # fmt: skip
SCALE = {np.uint8: 255.0, np.uint16: 65535.0, np.float32: 1.0}


def random_array(rng, dtype, bands: int, size: int = SIZE) -> np.ndarray:
    if dtype == np.float32:
        return rng.uniform(-1.0, 3.0, (size, size, bands)).astype(np.float32)  # not clipped to [0, 1]
    return rng.integers(0, np.iinfo(dtype).max + 1, (size, size, bands), dtype=dtype)


def write_files(
    root: Path, kind: str, bands: int, n: int, seed: int = 0, classes=("a", "b")
) -> list[np.ndarray]:
    """n files of `kind` spread over class folders (sorted names); returns the expected float32 (C, H, W)
    tensors in the folder's scan order (class by class, file names sorted)."""
    ext, dtype, write = KINDS[kind]
    rng = np.random.default_rng(seed)
    expected = {}
    for i in range(n):
        cls = classes[i % len(classes)]
        (root / cls).mkdir(parents=True, exist_ok=True)
        a = random_array(rng, dtype, bands)
        write(root / cls / f"{i:03d}.{ext}", a)
        expected[(cls, i)] = torch.from_numpy(
            a.transpose(2, 0, 1).astype(np.float32) / np.float32(SCALE[dtype])
        )
    return [expected[k] for k in sorted(expected)]


def eval_values(source: str, bands: int, **kw) -> list[torch.Tensor]:
    """Every sample of `source` through the eval loader at its own size, normalised with mean 0, std 1."""
    cfg = data_cfg(mean=[0.0], std=[1.0], crop_pct=1.0, **kw)
    ev = build_eval_loader(
        cfg, source=source, img_size=SIZE, in_chans=bands, batch_size=3, rank=0, world_size=1
    )
    return [x for b, _, n in ev for x in b]


@pytest.mark.parametrize("bands", [4, 13])
@pytest.mark.parametrize("kind", list(KINDS))
def test_band_files_read_exactly_after_scaling_from_folders_and_shards(tmp_path, kind, bands):
    expected = write_files(tmp_path / "images", kind, bands, n=5)
    from_folder = eval_values(str(tmp_path / "images"), bands)
    assert len(from_folder) == 5
    for got, want in zip(from_folder, expected):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    out = tmp_path / "shards"
    assert (
        make_shards.main(
            [str(tmp_path / "images"), str(out), "--no-shuffle", "--workers", "1", "--no-progress"]
        )
        == 0
    )
    assert verify_shards.main([str(out), "--workers", "1"]) == 0
    from_shards = eval_values(str(out), bands)
    assert len(from_shards) == 5 and all(torch.equal(a, b) for a, b in zip(from_shards, expected))


def test_npy_layouts_and_dtypes(tmp_path):
    gray = np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE)
    buf = io.BytesIO()
    np.save(buf, gray)
    assert torch.equal(decode_bands(buf.getvalue(), "npy"), torch.from_numpy(gray[None] / np.float32(65535)))
    for bad, why in [(np.zeros((4, 4), np.int16), "int16"), (np.full((4, 4), np.nan, np.float32), "NaN"),
                     (np.zeros((2, 3, 4, 5), np.uint8), "expected")]:  # fmt: skip
        buf = io.BytesIO()
        np.save(buf, bad)
        with pytest.raises(ValueError, match=why):
            decode_bands(buf.getvalue(), "npy")


AUGMENTS = [("mae", {}), ("finetune", {"reprob": 0.5}), ("linprobe", {})]


def epoch(source, bands, augment, seed, cfg, start_step=0, img_size=12):
    loader = build_train_loader(cfg, source=source, img_size=img_size, in_chans=bands, batch_size=4,
                                augment=augment, seed=seed, rank=0, world_size=1)  # fmt: skip
    return list(loader.iterate(1, start_step))


@pytest.mark.parametrize("augment,extra", AUGMENTS)
def test_band_training_crops_are_a_pure_function_of_seed_epoch_and_position(tmp_path, augment, extra):
    write_files(tmp_path / "images", "npy-uint16-hwc", 13, n=12)
    source = str(tmp_path / "images")
    base = epoch(source, 13, augment, 7, data_cfg(**extra))
    assert len(base) == 3 and all(x.shape == (4, 13, 12, 12) and x.dtype == torch.float32 for x, _, _ in base)
    workers = epoch(source, 13, augment, 7, data_cfg(num_workers=2, **extra))
    resumed = epoch(source, 13, augment, 7, data_cfg(**extra), start_step=1)
    other = epoch(source, 13, augment, 8, data_cfg(**extra))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(base, workers))
    assert len(resumed) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(base[1:], resumed))
    assert not torch.equal(base[0][0], other[0][0])
    out = tmp_path / "shards"
    assert make_shards.main([source, str(out), "--workers", "1", "--no-progress"]) == 0
    cfg = data_cfg(shuffle_buffer=4, **extra)
    shard_base = epoch(str(out), 13, augment, 7, cfg)
    shard_resumed = epoch(str(out), 13, augment, 7, cfg, start_step=2)
    assert torch.equal(shard_base[2][0], shard_resumed[0][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(shard_base, epoch(str(out), 13, augment, 7, cfg)))


@pytest.mark.parametrize("augment", ["mae", "linprobe", "none"])
def test_band_crops_match_the_pil_crops_of_the_same_image(augment):
    """The tensor path draws the same boxes and flips as the PIL path under the same seed: a 3-band uint8
    array and the same pixels as a PNG give crops within one level (bicubic on floats vs uint8)."""
    rng = np.random.default_rng(3)
    a = np.kron(rng.integers(0, 256, (10, 15, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # 40 x 60, blocky
    t = build_transform(data_cfg(mean=[0.0], std=[1.0], crop_pct=0.875), augment, 24, 3)
    bands = torch.from_numpy(a.transpose(2, 0, 1) / np.float32(255))
    for k in range(10):
        with seeded(sample_seed(1, k)):
            ours = t(bands)
        with seeded(sample_seed(1, k)):
            ref = t(Image.fromarray(a))
        assert (ours - ref).abs().mean() < 1 / 255, k


def test_mixed_folder_of_images_and_arrays_gives_one_normalised_batch(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        a = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(a).save(tmp_path / f"{i}a.png")
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        (tmp_path / f"{i}b.jpg").write_bytes(buf.getvalue())
        np.save(tmp_path / f"{i}c.npy", a)
    values = eval_values(str(tmp_path), 3)
    assert len(values) == 9
    for i in range(3):  # the PNG and the uint8 array of the same pixels: the same values
        assert torch.equal(values[3 * i], values[3 * i + 2])
    for decode in ("cpu", "device"):  # JPEGs left for the device decoder in a batch with arrays
        cfg = data_cfg(mean=[0.5], std=[0.25], decode=decode, scale_min=1.0, hflip=False)
        batches = epoch(str(tmp_path), 3, "mae", 0, cfg, img_size=SIZE)
        assert sum(len(x) for x, _, _ in batches) == 8 and all(n == 0 for *_, n in batches)
        if decode == "cpu":
            first = batches
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, batches))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


TINY = ["model.name=mae_vit_tiny_patch16", "model.img_size=16", "model.patch_size=4", "model.depth=1",
        "model.embed_dim=32", "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
        "model.decoder_num_heads=2", "train.precision=fp32", "data.num_workers=0", "log.every_steps=1"]  # fmt: skip


@pytest.mark.slow
def test_in_chans_mismatch_exits_2_from_the_script_with_one_line_before_output_dir(tmp_path):
    write_files(tmp_path / "rgb", "npy-uint8-hwc", 3, n=4)
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "mae/pretrain.py", f"data.train={tmp_path / 'rgb'}", "model.in_chans=1", f"output_dir={out}",
         "data.mean=[0.5]", "data.std=[0.25]", *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: data source '{tmp_path / 'rgb'}': {tmp_path / 'rgb' / 'a' / '000.npy'} has 3 bands but "
        "model.in_chans=1 (npy 16x16x3 as (H, W, C))"
    ]
    assert not out.exists()


def test_in_chans_mismatch_is_one_line_exit_2_before_output_dir(tmp_path, capsys):
    write_files(tmp_path / "rgb", "npy-uint8-hwc", 3, n=4)
    write_files(tmp_path / "s2", "tif-uint16-chunky", 13, n=4)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "photos" / "x.png")
    out = tmp_path / "run"
    cases = [("rgb", 1, ("000.npy has 3 bands but model.in_chans=1",)),
             ("s2", 4, ("000.tif has 13 bands but model.in_chans=4", "axes YXS")),
             ("photos", 13, ("x.png is an ordinary image", "not model.in_chans=13")),
             ("s2", 13, ())]  # fmt: skip
    for source, chans, names in cases:
        args = [f"data.train={tmp_path / source}", f"model.in_chans={chans}", f"output_dir={out}", "data.mean=[0.5]",
                "data.std=[0.25]", *TINY]  # fmt: skip
        if not names:  # the matching band count gets past the check
            build_train_loader(data_cfg(mean=[0.5], std=[0.25]), source=str(tmp_path / source), img_size=16,
                               in_chans=chans, batch_size=2, augment="mae", seed=0, rank=0, world_size=1)  # fmt: skip
            continue
        assert pretrain(args) == 2
        line = one_line_error(capsys)
        assert all(s in line for s in names), line
        assert not out.exists()


def test_later_file_of_another_band_count_is_skipped_and_counted(tmp_path):
    write_files(tmp_path, "npy-uint16-hwc", 4, n=8)
    np.save(tmp_path / "b" / "999.npy", np.zeros((SIZE, SIZE, 3), np.uint16))
    batches = epoch(str(tmp_path), 4, "mae", 0, data_cfg(epoch_samples=9), img_size=8)  # 2 batches of 4
    ev = build_eval_loader(data_cfg(), source=str(tmp_path), img_size=8, in_chans=4, batch_size=9, rank=0,
                           world_size=1)  # fmt: skip
    (x, _, n_bad), = list(ev)  # fmt: skip
    assert len(x) == 8 and n_bad == 1
    assert sum(len(x) for x, _, _ in batches) + sum(n for *_, n in batches) == 8


def test_mean_std_of_another_length_is_one_line_exit_2(tmp_path, capsys):
    write_files(tmp_path / "b4", "npy-float32-chw", 4, n=4)
    out = tmp_path / "run"
    for key, vals, n in [("data.mean", "[0.1,0.2,0.3]", 3), ("data.std", "[0.1,0.2,0.3,0.4,0.5]", 5)]:
        other = "data.std=[0.2]" if key == "data.mean" else "data.mean=[0.2]"
        assert pretrain([f"data.train={tmp_path / 'b4'}", "model.in_chans=4", f"{key}={vals}", other,
                         f"output_dir={out}", *TINY]) == 2  # fmt: skip
        assert f"{key} has {n} values but model.in_chans=4" in one_line_error(capsys)
        assert not out.exists()
    # the documented conveniences: one value for every channel, ImageNet's three averaged for one channel
    assert resolve_norm([0.5], [0.25], 13) == ([0.5] * 13, [0.25] * 13)
    mean, std = resolve_norm([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 1)
    assert mean == [pytest.approx(0.449)] and std == [pytest.approx(0.226)]
    with pytest.raises(DataError, match="data.mean has 2 values but model.in_chans=3"):
        resolve_norm([0.1, 0.2], [0.3], 3)


def test_stats_tool_prints_the_recipe_lines_numpy_computes(tmp_path, capsys):
    expected = write_files(tmp_path / "images", "tif-uint16-planar", 4, n=6)
    expected += write_files(tmp_path / "images", "npy-float32-chw", 4, n=4, seed=1, classes=("c",))
    pixels = np.concatenate([x.double().numpy().reshape(4, -1).T for x in expected])
    report = tmp_path / "stats.json"
    assert stats.main([str(tmp_path / "images"), "--in-chans", "4", "--samples", "0", "--workers", "2",
                       "--json", str(report)]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    got = json.loads(report.read_text())
    assert got["samples"] == 10 and got["pixels"] == len(pixels)
    np.testing.assert_allclose(got["mean"], pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(got["std"], pixels.std(0), rtol=1e-9)
    recipe = yaml.safe_load("\n".join(lines[-2:]))  # the two lines paste into a recipe as they are
    assert list(recipe) == ["data.mean", "data.std"]
    np.testing.assert_allclose(recipe["data.mean"], pixels.mean(0), rtol=5e-4)
    np.testing.assert_allclose(recipe["data.std"], pixels.std(0), rtol=5e-4)
    # sampled: seeded, and the channel count taken from the data when not given
    assert stats.main([str(tmp_path / "images"), "--samples", "3", "--seed", "1", "--workers", "1"]) == 0
    first = capsys.readouterr().out
    assert stats.main([str(tmp_path / "images"), "--samples", "3", "--seed", "1", "--workers", "1"]) == 0
    assert capsys.readouterr().out == first and "3 of 10 samples (seed 1), 4 channels" in first
    # shards of the same files: the same statistics
    out = tmp_path / "shards"
    assert make_shards.main([str(tmp_path / "images"), str(out), "--workers", "1", "--no-progress",
                             "--samples-per-shard", "3"]) == 0  # fmt: skip
    assert stats.main([str(out), "--samples", "0", "--json", str(report), "--workers", "1"]) == 0
    np.testing.assert_allclose(json.loads(report.read_text())["mean"], pixels.mean(0), rtol=1e-9)
    assert stats.main([str(out), "--samples", "4", "--workers", "1"]) == 0
    assert "4 of 10 samples" in capsys.readouterr().out
    assert stats.main([str(tmp_path / "missing")]) == 2


def test_make_shards_packs_arrays_and_verify_shards_checks_them(tmp_path, capsys):
    write_files(tmp_path / "images", "tif-uint16-chunky", 13, n=3)
    write_files(tmp_path / "images", "npy-uint16-hwc", 13, n=2, classes=("c",))
    out = tmp_path / "shards"
    assert (
        make_shards.main(
            [str(tmp_path / "images"), str(out), "--no-shuffle", "--workers", "1", "--no-progress"]
        )
        == 0
    )
    files = sorted(p for p in (tmp_path / "images").rglob("*") if p.is_file())
    members = [s for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)]
    assert [next(k for k in m if k in ("tif", "npy")) for m in members] == ["tif", "tif", "tif", "npy", "npy"]
    assert [m.get("tif", m.get("npy")) for m in members] == [p.read_bytes() for p in files]  # their own bytes
    capsys.readouterr()
    assert verify_shards.main([str(out), "--workers", "1"]) == 0
    assert "modes:  uint16x13=5" in capsys.readouterr().out
    # --resize shrinks arrays to .npy in their own dtype; --format png cannot hold 13 bands: exit 2
    small = tmp_path / "small"
    assert (
        make_shards.main(
            [str(tmp_path / "images"), str(small), "--resize", "8", "--workers", "1", "--no-progress"]
        )
        == 0
    )
    arrays = [
        np.load(io.BytesIO(m["npy"]))
        for m in wds.WebDataset(str(small / "train-000000.tar"), shardshuffle=False)
    ]
    assert all(a.shape == (8, 8, 13) and a.dtype == np.uint16 for a in arrays) and len(arrays) == 5
    assert (
        make_shards.main(
            [str(tmp_path / "images"), str(tmp_path / "png"), "--format", "png", "--no-progress"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be written as png" in err[0]
    # verify: a corrupt array and a shard of another band count are errors (exit 1)
    with wds.TarWriter(str(out / "train-000001.tar")) as w:
        w.write({"__key__": "x1", "npy": b"\x93NUMPY broken"})
        buf = io.BytesIO()
        np.save(buf, np.zeros((4, 4, 3), np.uint8))
        w.write({"__key__": "x2", "npy": buf.getvalue()})
    manifest = json.loads((out / "dataset.json").read_text())
    manifest["shards"].append({"name": "train-000001.tar", "samples": 2})
    manifest["total"] += 2
    (out / "dataset.json").write_text(json.dumps(manifest))
    assert verify_shards.main([str(out), "--workers", "1"]) == 1
    report = capsys.readouterr().out
    assert "train-000001.tar: x1: npy: not a readable .npy array" in report
    assert "different band counts: 3 bands (first train-000001.tar: x2), 13 bands" in report


@pytest.mark.parametrize("chans", [1, 2, 4, 13])
def test_reconstruction_figure_shows_the_first_three_bands_or_band_zero(chans):
    levels = torch.tensor([0.1, 0.5, 0.9, 0.3] + [0.7] * 9)[:chans]
    img = levels.view(1, chans, 1, 1).expand(1, chans, 8, 8)
    mean, std = [0.2] * chans, [0.5] * chans
    panels = [(img - 0.2) / 0.5] * 4
    canvas = np.asarray(figure(panels, mean, std, min_size=8))
    pixel = canvas[14 + 4 + 2, 4 + 2]  # inside the first tile, below the header row
    want = levels[:3] if chans >= 3 else levels[:1].expand(3)
    assert pixel.tolist() == (want * 255 + 0.5).to(torch.uint8).tolist()


def test_pretraining_a_tiny_model_on_a_4_band_npy_folder(tmp_path, capsys):
    write_files(tmp_path / "bands", "npy-uint16-hwc", 4, n=32)
    out = tmp_path / "run"
    args = [f"data.train={tmp_path / 'bands'}", f"data.val={tmp_path / 'bands'}", "model.in_chans=4",
            "data.mean=[0.5]", "data.std=[0.29]", f"output_dir={out}", "train.batch_size=8", "train.max_steps=4",
            "checkpoint.every_steps=2", "log.viz_images=4", "log.knn_every_steps=2", "log.knn_train_samples=16",
            "log.knn_val_samples=8", *TINY]  # fmt: skip
    assert pretrain(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["bad_samples"] == 0 for r in rows if "loss" in r)
    assert sum("knn_top1" in r for r in rows) == 2
    assert Image.open(out / "reconstruction-last.png").mode == "RGB"
    # stopped right after its step-2 checkpoint, the same command resumes and ends with the same weights
    cut = tmp_path / "cut"
    shutil.copytree(out, cut, symlinks=True)
    shutil.rmtree(cut / "checkpoint-00000004")
    (cut / "checkpoint-last").unlink()
    os.symlink("checkpoint-00000002", cut / "checkpoint-last")
    assert pretrain([a for a in args if not a.startswith("output_dir=")] + [f"output_dir={cut}"]) == 0
    a, b = (load_file(str(d / "checkpoint-00000004" / "model.safetensors")) for d in (out, cut))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@needs_fmnist
def test_docs_quote_the_stats_tool_output_on_fashion_mnist(capsys):
    """docs/data.md shows what `python -m data_tools.stats fashion-mnist` prints: the same lines."""
    text = (ROOT / "docs" / "data.md").read_text()
    quoted = text.split("```text\nfashion-mnist:", 1)[1].split("```", 1)[0]
    assert stats.main(["fashion-mnist"]) == 0
    assert capsys.readouterr().out == "fashion-mnist:" + quoted


def test_stats_tool_refuses_mixed_band_counts_naming_the_counts(tmp_path, capsys):
    """15 of 25 files of another band count were once called "unreadable", with exit 0 and statistics of the rest."""
    write_files(tmp_path / "images", "npy-float32-chw", 4, n=10)
    write_files(tmp_path / "images", "tif-uint16-planar", 3, n=15, seed=1, classes=("c",))
    assert stats.main([str(tmp_path / "images"), "--in-chans", "4", "--samples", "0", "--workers", "2"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "mixes band counts: 10 readable sample(s) with 4, 15 with 3" in err[0], err
    assert "data.mean" not in captured.out
