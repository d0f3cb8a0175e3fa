"""The record tells the truth: config.yaml is written once a run is known to start or resume; a finished run
re-run with other settings writes nothing and says what was not applied; a resume applies what it may and keeps
a history of what changed from which step, and refuses what would change what the weights mean; the tools read
the settings the weights were trained with; a class count taken from the data is recorded and checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from _faults import snapshot
from conftest import TINY_FMNIST, needs_fmnist
from PIL import Image

from mae.embed import Embedder
from mae.pretrain import main as pretrain_main
from mae.segment import main as segment_main
from mae.segment_predict import main as predict_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _pairs(root, n: int = 16, top: int = 2, size: int = 32) -> str:
    """A folder of image / mask pairs whose masks use classes 0..top."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.png"
        )
        mask = rng.integers(0, top + 1, (size, size), dtype=np.uint8)
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return str(root)


def _seg_args(out, data: str, **extra) -> list[str]:
    args = {"recipe": "segment_demo", "output_dir": str(out), "data.train": data, "data.val": "",
            "model.img_size": "32", "model.patch_size": "8", "model.depth": "2", "model.embed_dim": "32",
            "model.num_heads": "2", "model.seg_channels": "8", "model.in_chans": "3", "model.num_classes": "0",
            "data.mean": "[0.5]", "data.std": "[0.25]", "data.num_workers": "0", "train.batch_size": "4",
            "train.precision": "fp32", "log.every_steps": "1", "checkpoint.every_steps": "2", **extra}  # fmt: skip
    return [f"{k}={v}" for k, v in args.items()]


# ------------------------------------------------------------------------------------------------ a finished run


@needs_fmnist
def test_a_finished_run_rerun_with_other_statistics_writes_nothing_and_says_so(tmp_path, capsys):
    """Once: it resumed at the last step, trained nothing, exited 0 and config.yaml recorded the new statistics,
    which mae-embed then normalised with (embeddings of the same weights differed by up to 3.35)."""
    out = tmp_path / "run"
    args = TINY_FMNIST + [f"output_dir={out}", "data.val=", "train.max_steps=2", "checkpoint.every_steps=2"]
    assert pretrain_main(args) == 0
    before = snapshot(out)
    images = torch.rand(4, 1, 28, 28)
    embedded = Embedder.from_pretrained(out)(images)
    capsys.readouterr()
    assert pretrain_main(args + ["data.mean=[0.9]", "data.std=[0.1]", "train.blr=1e-2"]) == 0
    log = capsys.readouterr().out
    assert "already complete at step 2" in log
    line = next(ln for ln in log.splitlines() if ln.startswith("not applied"))
    assert "data.mean [0.286] -> [0.9]" in line and "data.std" in line and "train.blr" in line
    assert snapshot(out) == before
    assert torch.equal(Embedder.from_pretrained(out)(images), embedded)


@needs_fmnist
def test_a_finished_segmentation_run_rerun_with_other_statistics_predicts_as_before(tmp_path, capsys):
    """Once: mae-segment-predict changed half the pixels after such a re-run."""
    out, data = tmp_path / "run", _pairs(tmp_path / "data")
    args = _seg_args(out, data, **{"train.max_steps": "2"})
    assert segment_main(args) == 0
    (tmp_path / "in").mkdir()
    Image.open(tmp_path / "data" / "images" / "0.png").save(tmp_path / "in" / "0.png")
    assert predict_main([str(out), str(tmp_path / "in"), str(tmp_path / "p1"), "--checkpoint", "last"]) == 0
    before = snapshot(out)
    assert segment_main(args + ["data.mean=[0.9]", "data.std=[0.1]"]) == 0
    assert snapshot(out) == before
    assert predict_main([str(out), str(tmp_path / "in"), str(tmp_path / "p2"), "--checkpoint", "last"]) == 0
    assert (tmp_path / "p1" / "0.png").read_bytes() == (tmp_path / "p2" / "0.png").read_bytes()


# ------------------------------------------------------------------------------------------------ a resumed run


@needs_fmnist
def test_a_resume_applies_a_new_lr_with_history_and_refuses_new_statistics(tmp_path, capsys):
    """Once: a resumed segmentation run with a new train.blr said nothing, and config.yaml claimed the new lr
    and warm-up for the whole run."""
    out, data = tmp_path / "run", _pairs(tmp_path / "data")
    assert segment_main(_seg_args(out, data, **{"train.max_steps": "2"})) == 0
    first = yaml.safe_load((out / "config.yaml").read_text())
    before = snapshot(out)
    capsys.readouterr()

    assert segment_main(_seg_args(out, data, **{"train.max_steps": "4", "data.mean": "[0.9]"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with data.mean=[0.5]" in err[0], err
    assert snapshot(out) == before

    assert segment_main(_seg_args(out, data, **{"train.max_steps": "4", "train.blr": "1e-3"})) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("resuming at step 2 with"))
    assert "train.max_steps 2 -> 4" in line and "train.blr 0.064 -> 0.001" in line and "history" in line
    (row,) = [json.loads(line) for line in (out / "config-history.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and row["changed"]["train.blr"] == [first["train"]["blr"], 0.001]
    assert row["changed"]["train.max_steps"] == [2, 4] and "derived.lr" in row["changed"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["blr"] == 0.001
    assert yaml.safe_load((out / "checkpoint-00000002" / "config.yaml").read_text()) == first
    assert yaml.safe_load((out / "checkpoint-00000004" / "config.yaml").read_text())["train"]["blr"] == 0.001


def test_a_class_count_found_in_the_masks_is_recorded_and_checked_on_resume(tmp_path, capsys):
    """Once: model.num_classes=0 recorded 0; resuming on masks with a higher class id was a 28-line size-mismatch
    traceback (exit 1), after config.yaml had been rewritten."""
    out, data = tmp_path / "run", _pairs(tmp_path / "data", top=2)
    assert segment_main(_seg_args(out, data, **{"train.max_steps": "2"})) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["num_classes"] == 3
    _pairs(tmp_path / "data", top=3)  # the same files, now with class 3
    before = snapshot(out)
    capsys.readouterr()
    assert segment_main(_seg_args(out, data, **{"train.max_steps": "4"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.num_classes=3, now 4 (found in the data)" in err[0], err
    assert snapshot(out) == before
