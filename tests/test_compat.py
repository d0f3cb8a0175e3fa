"""Runs written by earlier versions of the toolkit keep working: tests/fixtures/run_v1 is a pretraining run
(a tiny MAE on the synthetic set, fp32) written by the code before the package was grouped into folders, stopped
after its step-2 checkpoint of 4 steps."""

import shutil
from pathlib import Path

import torch
from conftest import rows
from safetensors.torch import load_file

from mae.pretrain import main
from mae.train.checkpoint import load_train_state

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"
ARGS = ["recipe=demo", "model.patch_size=7", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
        "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2", "data.train=synthetic",
        "data.val=", "data.synthetic_samples=64", "model.img_size=28", "model.in_chans=3", "train.batch_size=8",
        "train.precision=fp32", "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=0",
        "log.every_steps=1", "log.knn_every_steps=0", "log.viz_images=0", "log.progress=false"]  # fmt: skip


def test_a_run_of_the_earlier_layout_resumes_where_it_stopped(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run, symlinks=True)
    before = load_file(str(FIXTURE / "checkpoint-00000002" / "model.safetensors"))
    assert main([*ARGS, f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoint-00000002'} at step 2" in out
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    model_state, train_state, rng = load_train_state(run / "checkpoint-00000004", rank=0)
    assert train_state["step"] == 4 and rng is not None
    moved = [k for k in before if not torch.equal(before[k], model_state[k])]
    assert moved and set(model_state) == set(before)  # the same model, trained on from the old weights


def test_a_run_of_the_earlier_layout_initialises_a_classifier(tmp_path, capsys):
    from mae.finetune import main as finetune

    args = ["recipe=finetune_demo", "model.patch_size=7", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
            "data.train=synthetic", "data.val=", "data.synthetic_samples=32", "model.img_size=28", "model.in_chans=3",
            "train.batch_size=8", "train.precision=fp32", "train.max_steps=1", "log.progress=false",
            f"model.init={FIXTURE}", f"output_dir={tmp_path / 'ft'}"]  # fmt: skip
    assert finetune(args) == 0
    assert f"initialised from {FIXTURE}" in capsys.readouterr().out
