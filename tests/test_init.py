"""model.init in pretraining: every source kind loads exactly (the same first loss), it initialises without
resuming, and sources that do not fit are one-line errors (exit 2) before anything is read or written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mae.export import main as export_main
from mae.finetune import main as finetune_main
from mae.pretrain import main
from tests.conftest import TINY_FMNIST, TINY_MODEL, needs_fmnist, rows

TINY = TINY_FMNIST


def first_loss(out: Path) -> float:
    return rows(out)[0]["loss"]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A trained tiny run and its weights in the other forms: reference full file, reference encoder-only
    file, Hugging Face export, timm export."""
    root = tmp_path_factory.mktemp("src")
    run = root / "run"
    assert main([*TINY, f"output_dir={run}", "train.max_steps=12", "train.blr=5e-3"]) == 0
    sd = load_file(str(run / "checkpoint-last" / "model.safetensors"))
    torch.save({"model": sd, "epoch": 0}, root / "full.pth")
    encoder = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder}, root / "encoder.pth")
    assert export_main([str(run), str(root / "hf"), "--to", "hf"]) == 0
    assert export_main([str(run), str(root / "timm"), "--to", "timm"]) == 0
    return {"root": root, "run": run, "sd": sd}


@needs_fmnist
def test_every_full_source_gives_the_same_first_loss_and_a_fresh_run_does_not(tmp_path, source_run, capsys):
    root, losses = source_run["root"], {}
    for name, src in (("run", source_run["run"]), ("full", root / "full.pth"), ("hf", root / "hf")):
        out = tmp_path / name
        assert main([*TINY, f"output_dir={out}", "train.max_steps=1", f"model.init={src}"]) == 0
        losses[name] = first_loss(out)
        assert rows(out)[0]["step"] == 1  # an initialisation, not a resume: step, optimizer, schedule fresh
    assert main([*TINY, f"output_dir={tmp_path / 'fresh'}", "train.max_steps=1"]) == 0
    assert losses["run"] == losses["full"] == losses["hf"]
    assert first_loss(tmp_path / "fresh") > losses["run"] + 0.1
    assert "decoder" not in capsys.readouterr().out.split("initialised from")[1].split("missing keys")[0]


@needs_fmnist
@pytest.mark.parametrize("kind", ["encoder.pth", "timm"])
def test_an_encoder_only_source_starts_the_decoder_fresh_and_says_so(tmp_path, source_run, capsys, kind):
    out = tmp_path / "out"
    assert (
        main([*TINY, f"output_dir={out}", "train.max_steps=1", f"model.init={source_run['root'] / kind}"])
        == 0
    )
    log = capsys.readouterr().out
    assert log.count("decoder: the source holds the encoder only") == 1
    assert main([*TINY, f"output_dir={tmp_path / 'fresh'}", "train.max_steps=1"]) == 0
    # the first step runs at lr 0 (warm-up), so the checkpoint holds the initial weights: the source's encoder
    # and the decoder a fresh model of this seed draws
    w = load_file(str(out / "checkpoint-last" / "model.safetensors"))
    fresh = load_file(str(tmp_path / "fresh" / "checkpoint-last" / "model.safetensors"))
    for k, v in w.items():
        expected = fresh[k] if k.startswith(("decoder", "mask_token")) else source_run["sd"][k]
        assert torch.equal(v, expected), k


@needs_fmnist
def test_rerunning_resumes_the_runs_own_checkpoint_not_model_init(tmp_path, source_run, capsys):
    out = tmp_path / "out"
    args = [*TINY, f"output_dir={out}", f"model.init={source_run['run']}", "checkpoint.every_steps=2"]
    assert main([*args, "train.max_steps=2"]) == 0
    assert main([*args, "train.max_steps=4"]) == 0
    log = capsys.readouterr().out
    assert "model.init is not read" in log and "resumed from" in log
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]


@needs_fmnist
@pytest.mark.parametrize(
    "override,message",
    [
        ("model.embed_dim=32", r"embed_dim is 64 in the source, 32 in this model \(set model.embed_dim"),
        ("model.depth=3", r"depth \(blocks\) is 2 in the source, 3 in this model \(set model.depth"),
        ("model.num_heads=4", r"num_heads is 2 in the source, 4 in this model \(set model.num_heads"),
        ("model.decoder_num_heads=4", r"decoder_num_heads is 2 in the source, 4 in this model"),
    ],
)
def test_a_size_that_cannot_be_adapted_is_one_line_before_anything_is_written(
    tmp_path, source_run, capsys, override, message
):
    out = tmp_path / "out"
    assert main([*TINY, f"output_dir={out}", f"model.init={source_run['run']}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: model.init='{source_run['run']}'")
    assert pytest.importorskip("re").search(message, err), err
    assert not out.exists()


def _bad_sources(root: Path, run: Path) -> dict:
    (root / "notes.pth").write_text("these are not weights\n")
    good = run / "checkpoint-last" / "model.safetensors"
    (root / "cut.safetensors").write_bytes(good.read_bytes()[:5000])
    shutil.copy(run / "checkpoint-last" / "state.pt", root / "optimizer.pt")
    other = root / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({"embeddings.word_embeddings.weight": torch.zeros(4, 4)}, str(other / "model.safetensors"))
    return {
        "notes.pth": "is not a weights file \\(not a PyTorch checkpoint",
        "cut.safetensors": "cannot read .* as safetensors",
        "optimizer.pt": "holds no model weights",
        "bert": "is a Hugging Face 'bert' model directory",
    }


@needs_fmnist
def test_a_source_that_is_not_weights_is_one_line_naming_it(tmp_path, source_run, capsys):
    import re

    for name, message in _bad_sources(tmp_path, source_run["run"]).items():
        out = tmp_path / f"out_{name}"
        assert main([*TINY, f"output_dir={out}", f"model.init={tmp_path / name}"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(tmp_path / name) in err and re.search(message, err), err
        assert not out.exists()


@needs_fmnist
def test_hugging_face_directories_with_pickled_or_sharded_weights(tmp_path, source_run):
    from safetensors.torch import load_file as read

    hf = source_run["root"] / "hf"
    weights = read(str(hf / "model.safetensors"))
    pickled, sharded = tmp_path / "pickled", tmp_path / "sharded"
    for d in (pickled, sharded):
        d.mkdir()
        shutil.copy(hf / "config.json", d / "config.json")
    torch.save(weights, pickled / "pytorch_model.bin")
    names = sorted(weights)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2]}
    half["model-00002-of-00002.safetensors"] = names[len(names) // 2 :]
    for file, keys in half.items():
        save_file({k: weights[k] for k in keys}, str(sharded / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in half.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    losses = []
    for src in (hf, pickled, sharded):
        out = tmp_path / f"out_{src.name}"
        assert main([*TINY, f"output_dir={out}", "train.max_steps=1", f"model.init={src}"]) == 0
        losses.append(first_loss(out))
    assert losses[0] == losses[1] == losses[2]


@pytest.fixture(scope="module")
def rgb_reference_file(tmp_path_factory):
    """Real RGB weights in the reference release's full format: a tiny MAE pretrained for a few dozen steps on
    the synthetic RGB set, saved by this test as `{'model': state_dict}`."""
    root = tmp_path_factory.mktemp("rgb")
    rgb = [
        "data.train=synthetic",
        "model.name=mae_vit_tiny_patch16",
        "model.img_size=28",
        *TINY_MODEL,
        "model.in_chans=3",
        "model.norm_pix_loss=false",
        "train.batch_size=32",
        "train.precision=fp32",
        "train.blr=5e-3",
        "train.warmup_epochs=0.01",
        "log.every_steps=10",
        "log.viz_images=0",
    ]
    assert main([*rgb, f"output_dir={root / 'run'}", "train.max_steps=40"]) == 0
    sd = load_file(str(root / "run" / "checkpoint-last" / "model.safetensors"))
    torch.save({"model": sd}, root / "mae_visualize_rgb.pth")
    return root / "mae_visualize_rgb.pth", sd


@needs_fmnist
@pytest.mark.slow
def test_rgb_reference_weights_pretrain_and_finetune_one_channel_images(tmp_path, rgb_reference_file, capsys):
    """RGB weights continue pretraining on grayscale Fashion-MNIST: the filters are summed, the decoder's
    colour rows averaged, and the first loss is well below a fresh model's; the same file fine-tunes."""
    src, sd = rgb_reference_file
    gray = [*TINY, "model.norm_pix_loss=false", "train.max_steps=1"]
    assert main([*gray, f"output_dir={tmp_path / 'init'}", f"model.init={src}"]) == 0
    log = capsys.readouterr().out
    assert (
        "channels: 3 -> 1: patch embedding adapted as timm's adapt_input_conv (the sum of its filters)" in log
    )
    assert main([*gray, f"output_dir={tmp_path / 'fresh'}"]) == 0
    assert first_loss(tmp_path / "init") < 0.8 * first_loss(tmp_path / "fresh")
    w = load_file(str(tmp_path / "init" / "checkpoint-last" / "model.safetensors"))
    assert w["patch_embed.proj.weight"].shape[1] == 1 and w["decoder_pred.weight"].shape[0] == 7 * 7
    out = tmp_path / "ft"
    ft = [
        "recipe=finetune_demo",
        "model.patch_size=7",
        "model.depth=2",
        "model.embed_dim=64",
        "model.num_heads=2",
    ]
    ft += ["train.max_steps=2", "train.batch_size=16", "data.num_workers=0", "data.val=", "log.every_steps=1"]
    assert finetune_main([*ft, f"output_dir={out}", f"model.init={src}"]) == 0
    assert "channels: 3 -> 1" in capsys.readouterr().out
