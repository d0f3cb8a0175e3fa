"""mae-embed and mae.embed.Embedder: the encoder's features of any data source, in the source's order, the same
bytes for the same command, from every source model.init takes, equal to the k-NN monitor's and to
Hugging Face's."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mae.config import to_yaml
from mae.embed import Embedder, main
from mae.models import create_mae
from mae.tasks import load_config
from tests.conftest import TINY_FMNIST, TINY_MODEL, TWO_CPU_PROCESSES, needs_fmnist, rows

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)  # fmt: skip
RUN_KEYS = [
    "recipe=demo",
    *TINY_MODEL,
    "data.crop_pct=0.0",
]  # crop 0: the reference's 0.875 (resize 32, crop 28)


def _run_dir(path: Path, model, overrides) -> Path:
    """A pretraining run directory as the training loop leaves it."""
    (path / "checkpoint-00000007").mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(load_config(overrides)))
    save_file(model.state_dict(), str(path / "checkpoint-00000007" / "model.safetensors"))
    (path / "checkpoint-last").symlink_to("checkpoint-00000007")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(MAE, its run directory, a labelled folder of 7 images: 2 classes, sizes and modes mixed, one corrupt)."""
    root = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    model = create_mae("mae_vit_tiny_patch16", **TINY).eval()
    run = _run_dir(root / "run", model, RUN_KEYS)
    rng = np.random.default_rng(0)
    for cls, mode in (("boots", "L"), ("shirts", "RGB")):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(3):
            shape = (36 + 4 * i, 30) if mode == "L" else (30, 40, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / "images" / cls / f"{i}.png"
            )
    (root / "images" / "boots" / "1b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return model, run, root / "images"


def _files(images: Path) -> list[str]:
    return [str(images / c / f"{i}.png") for c in ("boots", "shirts") for i in range(3)]


def _read_index(out: Path) -> list[dict]:
    with open(out / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def _mean_patch_features(model, imgs: torch.Tensor) -> torch.Tensor:
    """What the pretraining's k-NN monitor reads (mae.eval.metrics.mean_patch_features)."""
    from mae.eval.metrics import mean_patch_features

    with torch.no_grad():
        return mean_patch_features(model)(imgs)


# ----------------------------------------------------------------------------------------------------------
# the files


def test_folder_to_embeddings_and_index_in_order_corrupt_image_skipped(tiny, tmp_path, capsys, caplog):
    model, run, images = tiny
    out = tmp_path / "out"
    assert main([str(run), str(images), str(out), "--workers", "0", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    emb = np.load(out / "embeddings.npy")
    index = _read_index(out)
    assert emb.shape == (6, 64) and emb.dtype == np.float32
    assert [r["path"] for r in index] == _files(images)  # the folder's order; the corrupt file is not a row
    assert [r["label"] for r in index] == ["boots"] * 3 + ["shirts"] * 3
    assert "1b_corrupt.png" in caplog.text and "skipped 1 unreadable image" in err  # named and counted
    assert "img/s" not in err  # no progress bar when stderr is not a terminal
    # the monitor's feature (mean patch token after the final norm) of the eval transform's images
    embedder = Embedder.from_pretrained(run)
    pixels = embedder.preprocess(_files(images))
    assert pixels.shape == (6, 1, 28, 28)
    expected = _mean_patch_features(model, pixels).numpy()
    np.testing.assert_allclose(emb, expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(
        embedder([Image.open(p) for p in _files(images)]).numpy(), expected, rtol=0, atol=2e-6
    )


def test_same_command_same_bytes_and_float16(tiny, tmp_path):
    _, run, images = tiny
    args = [str(run), str(images), "--workers", "0", "--neighbours", "2", "--pool", "cls"]
    assert main([args[0], args[1], str(tmp_path / "a"), *args[2:]]) == 0
    assert main([args[0], args[1], str(tmp_path / "b"), *args[2:]]) == 0
    for name in ("embeddings.npy", "index.csv", "neighbours.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (
        main([args[0], args[1], str(tmp_path / "h"), "--workers", "0", "--pool", "cls", "--dtype", "float16"])
        == 0
    )
    half, full = np.load(tmp_path / "h" / "embeddings.npy"), np.load(tmp_path / "a" / "embeddings.npy")
    assert (
        half.dtype == np.float16
        and (tmp_path / "h" / "embeddings.npy").stat().st_size
        < 0.6 * (tmp_path / "a" / "embeddings.npy").stat().st_size
    )
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=1e-3, atol=1e-3)
    grid = Image.open(tmp_path / "a" / "neighbours.png")
    assert grid.width > 3 * 64 and grid.height > 6 * 64  # 6 query rows (all of DATA) of query + 2 neighbours


def test_pools_and_layers(tiny, tmp_path):
    model, run, images = tiny
    pixels = Embedder.from_pretrained(run).preprocess(_files(images))
    with torch.no_grad():
        x = model.patch_embed(pixels) + model.pos_embed[:, 1:]
        x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(6, -1, -1), x], dim=1)
        after_block1 = model.norm(model.blocks[0](x))
        last = model.forward_features(pixels)
    cases = {
        ("mean", None): last[:, 1:].mean(1),
        ("cls", None): last[:, 0],
        ("tokens", None): last[:, 1:],
        ("mean", 1): after_block1[:, 1:].mean(1),
        ("cls", -2): after_block1[:, 0],
        ("mean", -1): last[:, 1:].mean(1),
    }
    for (pool, layer), expected in cases.items():
        got = Embedder.from_pretrained(run, pool=pool, layer=layer)(pixels)
        assert got.shape == expected.shape, (pool, layer)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    out = tmp_path / "tokens"
    assert main([str(run), str(images), str(out), "--workers", "0", "--pool", "tokens", "--layer", "1"]) == 0
    assert np.load(out / "embeddings.npy").shape == (6, 16, 64)  # (N, 4x4 patches, D)


def test_bands_folder(tmp_path):
    """A 4-band model on a folder of .npy files: the bands' eval transform, one row per file."""
    torch.manual_seed(0)
    model = create_mae("mae_vit_tiny_patch16", **{**TINY, "in_chans": 4}).eval()
    keys = ["recipe=demo", *TINY_MODEL, "model.in_chans=4", "data.mean=[0.5]", "data.std=[0.25]"]
    run = _run_dir(tmp_path / "run", model, keys)
    rng = np.random.default_rng(1)
    (tmp_path / "tiles").mkdir()
    for i in range(3):
        np.save(tmp_path / "tiles" / f"t{i}.npy", rng.integers(0, 65536, (32, 30, 4), dtype=np.uint16))
    assert main([str(run), str(tmp_path / "tiles"), str(tmp_path / "out"), "--workers", "0"]) == 0
    emb, index = np.load(tmp_path / "out" / "embeddings.npy"), _read_index(tmp_path / "out")
    assert emb.shape == (3, 64) and [r["label"] for r in index] == ["", "", ""]  # a flat folder: unlabelled
    embedder = Embedder.from_pretrained(run)
    pixels = embedder.preprocess([r["path"] for r in index])
    np.testing.assert_allclose(emb, _mean_patch_features(model, pixels).numpy(), rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------------------------------------
# every source model.init takes


def test_every_source_kind_gives_the_run_embeddings(tiny, tmp_path):
    from mae.export import main as export

    model, run, images = tiny
    ref = Embedder.from_pretrained(run)
    pixels = ref.preprocess(_files(images))
    expected = ref(pixels)
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": model.state_dict()}, tmp_path / "full.pth")
    torch.save({"model": encoder}, tmp_path / "encoder.pth")
    assert export([str(run), str(tmp_path / "timm"), "--to", "timm"]) == 0
    assert export([str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    bare = dict(num_heads=2, mean=[0.286], std=[0.353], crop_pct=0.0)  # a bare file records none of these
    sources = {
        run / "checkpoint-00000007": {},
        tmp_path / "full.pth": bare,
        tmp_path / "encoder.pth": bare,
        tmp_path / "timm": {},  # mean / std / crop recorded by the export
        tmp_path / "hf": dict(mean=[0.286], std=[0.353], crop_pct=0.0),
    }
    for source, flags in sources.items():
        e = Embedder.from_pretrained(source, **flags)
        assert e.spec.img_size == 28 and e.spec.in_chans == 1, source
        torch.testing.assert_close(
            e(e.preprocess(_files(images))), expected, rtol=0, atol=1e-5, msg=str(source)
        )
    # a RGB source on grey data, at another size: adapted as pretraining adapts model.init
    rgb = create_mae("mae_vit_tiny_patch16", **{**TINY, "in_chans": 3})
    torch.save({"model": rgb.state_dict()}, tmp_path / "rgb.pth")
    notes = []
    e = Embedder.from_pretrained(tmp_path / "rgb.pth", num_heads=2, in_chans=1, img_size=42, log=notes.append)
    assert e(e.preprocess(_files(images))).shape == (6, 64)
    assert any("channels: 3 -> 1" in n for n in notes) and any("4x4 -> 6x6" in n for n in notes)


def test_a_global_pool_classifier_gives_its_pre_logits(tiny, tmp_path):
    """A classifier fine-tuned with global pooling has fc_norm instead of the final norm: --pool mean is timm's
    pre-logits feature (the mean patch token through fc_norm), the head left out."""
    from mae.models import create_vit

    _, _, images = tiny
    torch.manual_seed(1)
    vit = create_vit(
        "vit_tiny_patch16",
        num_classes=5,
        global_pool=True,
        **{k: TINY[k] for k in TINY if not k.startswith("decoder")},
    ).eval()
    torch.nn.init.normal_(vit.fc_norm.weight)  # not the identity a fresh LayerNorm is
    save_file(vit.state_dict(), str(tmp_path / "classifier.safetensors"))
    e = Embedder.from_pretrained(tmp_path / "classifier.safetensors", num_heads=2, mean=[0.3], std=[0.3])
    pixels = e.preprocess(_files(images))
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(pixels), pre_logits=True)
    torch.testing.assert_close(e(pixels), expected, rtol=0, atol=2e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_bf16_by_default_close_to_the_cpu(tiny):
    _, run, images = tiny
    gpu, cpu = Embedder.from_pretrained(run), Embedder.from_pretrained(run, device="cpu")
    assert gpu.device.type == "cuda" and gpu.precision == "bf16" and cpu.precision == "fp32"
    pixels = cpu.preprocess(_files(images))
    torch.testing.assert_close(gpu(pixels), cpu(pixels), rtol=0.05, atol=0.05)


def test_hf_export_in_transformers_gives_the_same_embeddings(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    from mae.export import main as export

    _, run, images = tiny
    assert export([str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    embedder = Embedder.from_pretrained(run)
    pixels = embedder.preprocess(_files(images))
    hf = transformers.ViTMAEModel.from_pretrained(str(tmp_path / "hf"), mask_ratio=0.0).eval()
    with torch.no_grad():
        theirs = hf(pixel_values=pixels).last_hidden_state[:, 1:].mean(dim=1)
    diff = (embedder(pixels) - theirs).abs().max().item()
    print(f"Hugging Face ViTMAEModel (mask_ratio=0) mean pooling vs mae-embed: max |diff| = {diff:.2e}")
    assert diff < 1e-5


# ----------------------------------------------------------------------------------------------------------
# k-NN, processes, shards


@needs_fmnist
def test_knn_equals_the_pretraining_monitors_figure(tmp_path, capsys):
    """The run's last k-NN monitor row and `--knn` on the same bank, queries and weights agree exactly."""
    from mae.pretrain import main as pretrain

    run = tmp_path / "run"
    args = [*TINY_FMNIST, f"output_dir={run}", "train.max_steps=4", "log.knn_every_steps=4",
            "log.knn_train_samples=300", "log.knn_val_samples=150", "log.knn_k=10"]  # fmt: skip
    assert pretrain(args) == 0
    monitor = [r["knn_top1"] for r in rows(run) if "knn_top1" in r]
    assert len(monitor) == 1
    capsys.readouterr()
    argv = [str(run), "fashion-mnist", str(tmp_path / "emb"), "--workers", "0", "--max-samples", "300"]
    assert main([*argv, "--knn", "fashion-mnist:test", "--knn-max-samples", "150"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("k-NN top-1"))
    assert "10-NN" in line and "150 queries, 300 in the bank" in line  # the run's log.knn_k by default
    right = int(line.rsplit("(", 1)[1].split()[0])
    print(f"k-NN top-1: monitor {monitor[0]:.4f}%, mae-embed --knn {100 * right / 150:.4f}% ({line})")
    assert 100.0 * right / 150 == monitor[0]
    assert [r["path"] for r in _read_index(tmp_path / "emb")] == sorted(
        (r["path"] for r in _read_index(tmp_path / "emb")), key=int
    )


def _shards(tmp_path: Path, images: Path) -> Path:
    from data_tools.make_shards import main as make_shards

    out = tmp_path / "shards"
    argv = [
        str(images),
        str(out),
        "--samples-per-shard",
        "2",
        "--no-shuffle",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert make_shards(argv) == 0
    return out


def test_shard_eval_ids_put_every_rank_and_worker_back_in_order(tiny, tmp_path):
    from mae.data import build_eval_loader

    _, run, images = tiny
    shards = _shards(tmp_path, images)
    seen = []
    for rank in range(2):
        for workers in (0, 2):
            cfg = load_config([*RUN_KEYS, f"data.num_workers={workers}"]).data
            loader = build_eval_loader(cfg, source=str(shards), img_size=28, in_chans=1, batch_size=2, rank=rank,
                                       world_size=2)  # fmt: skip
            got = [(i, n) for _, _, ids, names, _ in loader.keyed() for i, n in zip(ids.tolist(), names)]
            seen.append(sorted(got))
    assert seen[0] == seen[1] and seen[2] == seen[3]  # workers do not change a rank's share
    everything = sorted(seen[0] + seen[2])
    assert (
        len(everything) == 6 and len({i for i, _ in everything}) == 6
    )  # the corrupt image is not in the shards


def test_shards_give_the_folder_embeddings(tiny, tmp_path):
    _, run, images = tiny
    shards = _shards(tmp_path, images)
    assert main([str(run), str(images), str(tmp_path / "f"), "--workers", "0"]) == 0
    assert main([str(run), str(shards), str(tmp_path / "s"), "--workers", "2", "--batch-size", "3"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "s" / "embeddings.npy"), np.load(tmp_path / "f" / "embeddings.npy"),
                               rtol=0, atol=2e-6)  # fmt: skip
    index = _read_index(tmp_path / "s")
    assert [r["label"] for r in index] == ["boots"] * 3 + ["shirts"] * 3
    assert all(r["path"].startswith(str(shards)) and ".tar:" in r["path"] for r in index)


@pytest.mark.slow
def test_two_processes_write_the_files_whole_and_in_order(tiny, tmp_path):
    _, run, images = tiny
    shards = _shards(tmp_path, images)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT))
    for source, name in ((images, "folder"), (shards, "shards")):
        one, two = tmp_path / f"{name}1", tmp_path / f"{name}2"
        assert main([str(run), str(source), str(one), "--workers", "0", "--neighbours", "2"]) == 0
        cmd = [sys.executable, *TWO_CPU_PROCESSES, "-m", "mae.embed", str(run), str(source), str(two),
               "--workers", "1", "--batch-size", "2", "--neighbours", "2"]  # fmt: skip
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (
            r.stdout.count("wrote ") == 2 and "2 process(es)" in r.stdout
        )  # rank 0 alone writes and reports
        assert (two / "index.csv").read_bytes() == (one / "index.csv").read_bytes()
        np.testing.assert_allclose(
            np.load(two / "embeddings.npy"), np.load(one / "embeddings.npy"), rtol=0, atol=2e-6
        )
        assert (two / "neighbours.png").is_file()


# ----------------------------------------------------------------------------------------------------------
# bad input and the import


def test_bad_input_is_one_line_and_exit_code_2(tiny, tmp_path, capsys):
    _, run, images = tiny
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "other" / "cats").mkdir(parents=True)
    Image.new("L", (28, 28)).save(tmp_path / "other" / "cats" / "0.png")
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "missing"), str(images), out], "no such file"),
        ([str(tmp_path / "notes.txt"), str(images), out], "not model weights"),
        ([str(images), str(images), out], "not model weights"),
        ([str(run), str(tmp_path / "nowhere"), out], "DATA"),
        ([str(run), "fashion-mnist:validation", out], "split"),
        ([str(run), str(images), out, "--pool", "max"], "--pool"),
        ([str(run), str(images), out, "--batch-size", "0"], "--batch-size"),
        ([str(run), str(images), out, "--layer", "3"], "--layer 3"),
        ([str(run), str(images), out, "--pool", "tokens", "--knn", str(images)], "--pool mean or cls"),
        ([str(run), str(images), out, "--knn", str(tmp_path / "other")], "other classes"),
        ([str(run), str(images), out, "--num-heads", "4"], "num_heads=2"),
        ([str(tmp_path / "enc.pth"), str(images), out], "--num-heads"),
        ([str(run), str(images), out, "--mean", "0.1,0.2", "--std", "0.3,0.3"], "--mean / --std"),
    ]
    model = create_mae("mae_vit_tiny_patch16", **TINY)
    torch.save({"model": model.state_dict()}, tmp_path / "enc.pth")
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mae-embed: error:") and needle in err[0], (argv, err)
    assert not (tmp_path / "out").exists()


def test_import_loads_neither_accelerate_nor_wandb():
    code = "import sys, mae.embed; print(sorted(m for m in ('accelerate', 'wandb') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_console_script_and_module(tiny, tmp_path):
    _, run, images = tiny
    assert 'mae-embed = "mae.embed:cli"' in (ROOT / "pyproject.toml").read_text()
    r = subprocess.run([sys.executable, "-m", "mae.embed", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0 and "--pool" in r.stdout and "--knn" in r.stdout
    cmd = [sys.executable, "-m", "mae.embed", str(run), str(images), str(tmp_path / "out"), "--workers", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (
        "1b_corrupt.png" in r.stderr and "skipped 1 unreadable image" in r.stderr
    )  # named on stderr, counted
