"""Pretraining end to end: outputs, exact resume, 2-process DDP on shards, command-line errors."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mae.pretrain import main
from tests.conftest import TINY_FMNIST, TINY_MODEL, TWO_CPU_PROCESSES, needs_fmnist, rows

ROOT = Path(__file__).resolve().parents[1]


def weights(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


@needs_fmnist
def test_run_writes_contract_outputs(tmp_path):
    out = tmp_path / "run"
    args = TINY_FMNIST + [
        f"output_dir={out}",
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "log.viz_images=4",
    ]
    assert main(args) == 0
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2, 3, 4]
    assert all({"step", "epoch", "loss", "lr"} <= set(x) for x in r)
    assert (out / "config.yaml").is_file() and "derived:" in (out / "config.yaml").read_text()
    assert (out / "checkpoint-last").resolve().name == "checkpoint-00000004"
    assert (out / "reconstruction-last.png").stat().st_size > 0
    # Re-running the finished command does nothing more and keeps the outputs.
    assert main(args) == 0
    assert [x["step"] for x in rows(out)] == [1, 2, 3, 4]


@needs_fmnist
def test_resume_after_checkpoint_matches_uninterrupted_run(tmp_path):
    """The state a stop right after the step-4 checkpoint leaves behind, re-run with the same command,
    continues without gap or repeat and ends with the uninterrupted run's weights."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = TINY_FMNIST + ["train.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep=5"]
    assert main(common + [f"output_dir={full}"]) == 0
    shutil.copytree(full, cut, symlinks=True)
    shutil.rmtree(cut / "checkpoint-00000008")
    (cut / "checkpoint-last").unlink()
    os.symlink("checkpoint-00000004", cut / "checkpoint-last")
    assert main(common + [f"output_dir={cut}"]) == 0
    assert [x["step"] for x in rows(cut)] == list(range(1, 9))
    a, b = weights(full / "checkpoint-00000008"), weights(cut / "checkpoint-00000008")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the resumed half logged the same losses as the uninterrupted run
    for x, y in zip(rows(full), rows(cut)):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)


@needs_fmnist
@pytest.mark.slow
def test_sigterm_checkpoints_and_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    args = TINY_FMNIST + [f"output_dir={out}", "train.max_steps=60", "checkpoint.every_steps=1000"]
    cmd = [sys.executable, str(ROOT / "mae" / "pretrain.py"), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(rows(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    stopped = int((out / "checkpoint-last").resolve().name.split("-")[1])
    assert 3 <= stopped < 60 and "SIGTERM received" in log
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {out / f'checkpoint-{stopped:08d}'}" in r.stdout
    assert [x["step"] for x in rows(out)] == list(range(1, 61))


def test_bad_commands_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        ["train.bach_size=4"],
        ["train.batch_size=four"],
        ["data.train=/no/such/dir"],
        ["data.train=synthetic", "model.img_size=30", "model.patch_size=4", "model.in_chans=3"],
        [
            "data.train=synthetic",
            "data.synthetic_samples=8",
            "train.batch_size=16",
            "model.img_size=32",
            "model.patch_size=8",
            "model.in_chans=3",
        ],
    ]
    for extra in cases:
        assert main([f"output_dir={out}", "data.num_workers=0", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (extra, err)
        assert not out.exists(), extra


@needs_fmnist
def test_output_dir_of_another_model_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY_FMNIST + [f"output_dir={out}", "train.max_steps=1"]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(TINY_FMNIST + [f"output_dir={out}", "train.max_steps=1", "model.patch_size=4"]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


DUMP_WEIGHTS = """
import sys, torch
from mae import pretrain
from mae.train import engine
run = engine.Trainer.run
def run_and_dump(self):
    rc = run(self)
    torch.save(self.raw_model.state_dict(), f"{self.out}/final-rank{self.acc.process_index}.pt")
    return rc
engine.Trainer.run = run_and_dump
sys.exit(pretrain.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_process_ddp_on_shards_ends_with_identical_weights(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(32):
            arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(folder / f"class{c}" / f"{i}.png")
    shards = tmp_path / "shards"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools.make_shards",
            str(folder),
            str(shards),
            "--samples-per-shard",
            "16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    script = tmp_path / "run_and_dump.py"
    script.write_text(DUMP_WEIGHTS)
    out = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        *TWO_CPU_PROCESSES,
        str(script),
        f"data.train={shards}",
        f"output_dir={out}",
        *TINY_MODEL,
        "model.img_size=32",
        "model.patch_size=8",  # after TINY_MODEL: the later key wins
        "model.in_chans=3",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.precision=fp32",
        "data.num_workers=1",
        "log.every_steps=2",
        "log.viz_images=0",
        "checkpoint.every_steps=3",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    w0 = torch.load(out / "final-rank0.pt", weights_only=True)
    w1 = torch.load(out / "final-rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    ck = weights(out / "checkpoint-00000006")
    assert all(torch.equal(ck[k], w0[k]) for k in ck)
    assert [x["step"] for x in rows(out)] == [2, 4, 6]


@needs_fmnist
def test_wandb_offline_run_is_continued_on_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = TINY_FMNIST + [f"output_dir={out}", "log.wandb=offline", "checkpoint.every_steps=2"]
    assert main(args + ["train.max_steps=2"]) == 0
    assert main(args + ["train.max_steps=4"]) == 0
    run_id = (out / "wandb_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)


def test_masking_noise_never_repeats_across_micro_steps_for_any_grad_accum():
    """grad_accum 130 (vit_huge on one GPU needs 128): every (rank, step, micro) draws its own masks, and the
    same tuple always draws the same ones (what exact resume relies on)."""
    from mae.tasks.pretrain import masking_noise

    images = torch.zeros(2, 3, 8, 8)
    draws = {
        (rank, step, micro): masking_noise(images, 16, 0, rank, step, micro)
        for rank in range(2)
        for step in range(3)
        for micro in range(130)
    }
    rows = {tuple(row.tolist()) for noise in draws.values() for row in noise}
    assert len(rows) == 2 * len(draws)
    assert torch.equal(masking_noise(images, 16, 0, 1, 2, 64), draws[(1, 2, 64)])
    assert not torch.equal(masking_noise(images, 16, 1, 1, 2, 64), draws[(1, 2, 64)])  # the run seed counts


PRETRAIN_REFERENCE = {  # published ImageNet-1k top-1 after fine-tuning: (800 epochs or None, 1600 epochs)
    "vit_base": (None, "83.6%"),  # paper Table 3 (1600); no 800-epoch figure is published
    "vit_large": ("85.5%", "85.9%"),  # the reference's PRETRAIN.md (800), paper Table 3 (1600)
    "vit_huge": (None, "86.9%"),
}


@pytest.mark.parametrize("recipe", sorted(PRETRAIN_REFERENCE))
def test_pretraining_recipes_quote_the_figures_of_their_own_schedule(recipe):
    """The recipes run the reference's 800 epochs; a 1600-epoch figure is quoted only as such, with the
    override that gets it, and fp16 is named as the reference's numerics."""
    from mae.tasks import load_config

    cfg = load_config([f"recipe={recipe}"], task="pretrain")
    assert (cfg.train.epochs, cfg.train.warmup_epochs) == (800, 40)
    header = (ROOT / "recipes" / f"{recipe}.yaml").read_text().split("\nmodel:")[0]
    paragraphs = header.replace("\n#   ", " ").splitlines()  # a comment's continuation lines are indented
    at_800 = next(p for p in paragraphs if p.startswith("# 800 epochs (this recipe)"))
    at_1600 = next(p for p in paragraphs if p.startswith("# 1600 epochs (train.epochs=1600"))
    published_800, published_1600 = PRETRAIN_REFERENCE[recipe]
    assert published_1600 in at_1600 and published_1600 not in at_800
    assert (published_800 or "no figure is published") in at_800
    assert "train.precision=fp16 reproduces the reference's numerics" in header.replace("\n#   ", " ")
