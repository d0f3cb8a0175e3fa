"""Outputs never replace inputs: the commands that write next to the user's data (mae-segment-predict, mae-embed,
mae-viz, mae-export, the data tools) refuse an output that is an input or inside one, never write two outputs
to one name, write into a used directory only over their own earlier output (replaced whole), and let one
writer at a time into a directory (the run lock of training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fmnist, run_dir
from PIL import Image

from mae.embed import main as embed_main
from mae.models import create_mae
from mae.segment_predict import main as predict_main
from mae.tasks import load_config
from mae.weights.build import build_segmenter

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_RECORD_NAME = ".mae-output.json"  # mae.runs.files.OUTPUT_RECORD
TINY_MAE = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)  # fmt: skip
MAE_KEYS = ["recipe=demo", "model.patch_size=7", "model.depth=2", "model.embed_dim=64", "model.num_heads=2",
            "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]  # fmt: skip
SEG_KEYS = ["recipe=segment_demo", "model.img_size=32", "model.patch_size=8", "model.depth=2",
            "model.embed_dim=32", "model.num_heads=2", "model.seg_channels=8", "model.num_classes=3",
            "model.in_chans=3", "data.mean=[0.5]", "data.std=[0.25]"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(a pretraining run, a segmentation run) of tiny models."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    pre = run_dir(root / "pre", create_mae("mae_vit_tiny_patch16", **TINY_MAE).state_dict(), MAE_KEYS)
    seg = build_segmenter(load_config(SEG_KEYS), 3)
    return pre, run_dir(root / "seg", seg.state_dict(), SEG_KEYS)


def _images(folder: Path, names: list[str], size=(40, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / n)
    return folder


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _one_error_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    return err[0]


# ------------------------------------------------------------------------------------------------ predictions


def test_predict_never_writes_over_its_input_nor_two_outputs_to_one_name(runs, tmp_path, capsys):
    """`mae-segment-predict RUN imgs/ imgs/` once turned every input image into a class-id mask; a.jpg and a.png
    both became a.png, and b.png's overlay replaced the mask of the input b_overlay.png."""
    _, seg = runs
    imgs = _images(tmp_path / "imgs", ["a.jpg", "a.png", "b.png", "b_overlay.png"])
    before = _snapshot(imgs)
    for out, needle in ((imgs, f"is INPUT {imgs} itself"), (imgs / "pred", "is inside INPUT")):
        assert predict_main([str(seg), str(imgs), str(out)]) == 2
        _one_error_line(capsys, needle)
    assert predict_main([str(seg), str(imgs / "a.png"), str(imgs)]) == 2  # OUT_DIR holds INPUT
    _one_error_line(capsys, "holds INPUT")

    pred = tmp_path / "pred"
    assert predict_main([str(seg), str(imgs), str(pred)]) == 2
    line = _one_error_line(capsys, "would both be written as")
    assert "a.jpg" in line and "a.png" in line and not pred.exists()
    (imgs / "a.jpg").unlink()
    assert predict_main([str(seg), str(imgs), str(pred)]) == 2
    line = _one_error_line(capsys, "b_overlay.png")
    assert "b.png" in line and not pred.exists()
    (imgs / "b_overlay.png").rename(imgs / "c.png")
    assert predict_main([str(seg), str(imgs), str(pred)]) == 0
    assert "3 image(s) segmented" in capsys.readouterr().out
    written = sorted(p.name for p in pred.iterdir() if not p.name.startswith("."))
    assert written == ["a.png", "a_overlay.png", "b.png", "b_overlay.png", "c.png", "c_overlay.png"]
    assert {k: v for k, v in _snapshot(imgs).items() if k != "c.png"} == {
        k: v for k, v in before.items() if k not in ("a.jpg", "b_overlay.png")
    }


def test_predict_replaces_its_own_earlier_output_whole_and_refuses_other_files(runs, tmp_path, capsys):
    _, seg = runs
    imgs = _images(tmp_path / "imgs", ["a.png", "b.png"])
    pred = tmp_path / "pred"
    assert predict_main([str(seg), str(imgs), str(pred)]) == 0
    (imgs / "b.png").unlink()
    assert predict_main([str(seg), str(imgs), str(pred)]) == 0  # b's masks are stale: gone
    assert sorted(p.name for p in pred.glob("*.png")) == ["a.png", "a_overlay.png"]
    (pred / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert predict_main([str(seg), str(imgs), str(pred)]) == 2
    _one_error_line(capsys, "notes.txt")
    assert predict_main([str(seg), str(imgs), str(pred), "--overwrite"]) == 0
    assert (pred / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ embeddings


def _embed_cmd(source, data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "mae.embed", str(source), str(data), str(out), "--workers", "0", *extra]


@needs_fmnist
@pytest.mark.slow
def test_two_embed_runs_into_one_directory_the_second_refused_the_first_whole(runs, tmp_path):
    """Both once wrote one temporary file: one said float32 over a float16 file with a hole, the other failed."""
    pre, _ = runs
    out = tmp_path / "emb"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_embed_cmd(pre, "fashion-mnist", out, "--no-progress"), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    loading = [first.stdout.readline()]  # the model's load notes, then its first line of its own
    while loading[-1] and not loading[-1].startswith("mae-embed: "):
        loading.append(first.stdout.readline())
    assert loading[-1].startswith("mae-embed: "), loading  # the model is loaded: it is embedding
    second = subprocess.run(_embed_cmd(pre, "fashion-mnist:test", out, "--dtype", "float16"), cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert second.returncode == 2
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and f"OUT_DIR {out} is in use by another run (host " in err[0], second.stderr
    log, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    vectors = np.load(out / "embeddings.npy")
    assert vectors.shape == (60000, 64) and vectors.dtype == np.float32 and np.isfinite(vectors).all()


def test_embed_into_a_used_directory_or_inside_data_is_refused_and_its_own_output_replaced_whole(
    runs, tmp_path, capsys
):
    """A re-run once left the previous run's neighbours.png beside the new files, and an OUT_DIR inside DATA was
    embedded by the next run as a class of its own."""
    pre, _ = runs
    data = tmp_path / "data"
    for cls in ("x", "y"):
        _images(data / cls, [f"{i}.png" for i in range(3)], size=(28, 28))
    before = _snapshot(data)
    assert embed_main([str(pre), str(data), str(data / "emb"), "--workers", "0"]) == 2
    _one_error_line(capsys, "is inside DATA")
    assert _snapshot(data) == before

    out = tmp_path / "emb"
    assert embed_main([str(pre), str(data), str(out), "--workers", "0", "--neighbours", "2"]) == 0
    assert (out / "neighbours.png").is_file()
    assert embed_main([str(pre), str(data), str(out), "--workers", "0"]) == 0
    assert not (out / "neighbours.png").exists()
    assert json.loads((out / OUTPUT_RECORD_NAME).read_text())["files"] == ["embeddings.npy", "index.csv"]

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert embed_main([str(pre), str(data), str(used), "--workers", "0"]) == 2
    _one_error_line(capsys, "keep.txt")
    assert sorted(p.name for p in used.iterdir()) == ["keep.txt"]


# ------------------------------------------------------------------------------------------------ the writer


def test_output_dir_commits_together_and_a_failure_leaves_nothing_half_written(tmp_path):
    from mae.runs.files import OUTPUT_RECORD, OutputDir, OutputError

    out = tmp_path / "out"
    with OutputDir(out, "cmd", {}) as w:
        w.file("a.txt").write_text("new a")
        w.file("sub/b.txt").write_text("new b")
        assert not (out / "a.txt").exists()
        w.commit()
    assert (out / "a.txt").read_text() == "new a" and (out / "sub" / "b.txt").read_text() == "new b"
    with pytest.raises(RuntimeError), OutputDir(out, "cmd", {}) as w:
        w.file("c.txt").write_text("c")
        raise RuntimeError("interrupted")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(
        [OUTPUT_RECORD, "a.txt", "sub", "sub/b.txt"]
    )
    with pytest.raises(OutputError, match="holds the output of cmd"), OutputDir(out, "other", {}):
        pass
    with OutputDir(out, "cmd", {}) as w, pytest.raises(OutputError, match="x.png and y.png would both"):
        w.file("a.png", source="x.png")
        w.file("a.png", source="y.png")


# ------------------------------------------------------------------------------------------------ export, figures, tools


def test_export_never_writes_into_its_source_and_replaces_its_own_output_whole(runs, tmp_path, capsys):
    from mae.export import main as export_main

    pre, _ = runs
    before = _snapshot(pre)
    for out, needle in ((pre, "is SOURCE"), (pre / "timm", "is inside SOURCE")):
        assert export_main([str(pre), str(out), "--to", "timm"]) == 2
        _one_error_line(capsys, needle)
    assert _snapshot(pre) == before
    out = tmp_path / "out"
    assert export_main([str(pre), str(out), "--to", "hf"]) == 0
    hf_files = {p.name for p in out.iterdir()}
    assert export_main([str(pre), str(out), "--to", "timm"]) == 0  # the HF files are the earlier output: gone
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", OUTPUT_RECORD_NAME}
    assert "architecture" in json.loads((out / "config.json").read_text()) and len(hf_files) >= 3
    assert export_main([str(out), str(tmp_path / "back"), "--to", "mae"]) == 2  # timm: no decoder
    capsys.readouterr()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("mine")
    assert export_main([str(pre), str(tmp_path / "used"), "--to", "timm"]) == 2
    _one_error_line(capsys, "x.txt")


def test_viz_and_the_json_reports_never_replace_an_input(runs, tmp_path, capsys):
    from data_tools import stats
    from mae.viz import main as viz_main

    pre, _ = runs
    imgs = _images(tmp_path / "imgs", ["a.png", "b.png"], size=(28, 28))
    before = _snapshot(imgs)
    assert viz_main([str(pre), str(imgs / "a.png"), str(imgs / "b.png"), "--out", str(imgs / "b.png")]) == 2
    _one_error_line(capsys, "is IMAGE")
    assert viz_main([str(pre), str(imgs / "a.png"), "--out", str(tmp_path / "recon.png")]) == 0
    assert stats.main([str(imgs), "--json", str(imgs / "stats.json"), "--workers", "1", "--no-progress"]) == 2
    _one_error_line(capsys, "--json")
    assert _snapshot(imgs) == before
