"""train.fsdp=true: sharded training that matches DDP, checkpoints that resume with or without sharding,
and evaluation that keeps a sharded model's collective forward in lockstep across uneven shares."""

import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mae.data import build_eval_loader
from mae.eval.metrics import PAD_LABEL, classifier_accuracy, in_lockstep
from mae.linprobe import main as linprobe_main
from mae.models import create_mae
from mae.runs.record import BEST
from mae.tasks import load_config
from mae.train.optim import build_optimizer, param_groups
from mae.train.state import load_optimizer_state, optimizer_state
from mae.weights.build import build_vit
from tests.conftest import TINY_MODEL, TWO_CPU_PROCESSES

ROOT = Path(__file__).resolve().parents[1]

PRETRAIN = [
    "data.train=synthetic",
    "data.synthetic_samples=64",
    *TINY_MODEL,
    "model.img_size=32",
    "model.patch_size=8",
    "model.in_chans=3",
    "data.mean=[0.5,0.5,0.5]",
    "data.std=[0.25,0.25,0.25]",
    "train.batch_size=4",
    "train.grad_accum=2",  # micro-steps without a gradient reduction
    "train.clip_grad=0.05",  # the norm of sharded gradients
    "train.lr=1e-3",
    "train.warmup_epochs=0",
    "train.precision=fp32",
    "data.num_workers=1",
    "log.every_steps=1",
    "log.viz_images=2",
    "data.val=synthetic",
    "log.knn_every_steps=2",
    "log.knn_train_samples=40",
    "log.knn_val_samples=20",
    "log.progress=false",
    "train.max_steps=6",
    "checkpoint.every_steps=2",
    "checkpoint.keep=3",
]


def launch(entry: str, *args: str) -> str:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, *TWO_CPU_PROCESSES, str(ROOT / "mae" / entry), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def pretrain(out: Path, fsdp: bool) -> str:
    return launch("pretrain.py", *PRETRAIN, f"output_dir={out}", f"train.fsdp={str(fsdp).lower()}")


def weights(out: Path, step: int) -> dict:
    return load_file(str(out / f"checkpoint-{step:08d}" / "model.safetensors"))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in rows(out)]


KEY_BIAS_ATOL = 1e-4


def assert_same_weights(a: dict, b: dict) -> None:
    """Equal to 1e-6, except the key bias (the middle third of each qkv bias): softmax ignores a shift shared by
    all keys, so its true gradient is zero and AdamW turns the rounding noise of another reduction order into
    steps of up to ~lr x noise / eps (seen: 2e-6 after 6 steps on an AVX2-only CPU, where all else is within 6e-8)."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            n = x.numel() // 3
            torch.testing.assert_close(x[n : 2 * n], y[n : 2 * n], rtol=0, atol=KEY_BIAS_ATOL, msg=k)
            x, y = torch.cat([x[:n], x[2 * n :]]), torch.cat([y[:n], y[2 * n :]])
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=k)


def cut_back(run: Path, copy: Path, step: int) -> Path:
    """`copy` = `run` as a stop right after its checkpoint of `step` would have left it."""
    shutil.copytree(run, copy, symlinks=True)
    for ckpt in copy.glob("checkpoint-0*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (copy / "checkpoint-last").unlink()
    os.symlink(f"checkpoint-{step:08d}", copy / "checkpoint-last")
    return copy


@pytest.mark.slow
def test_sharded_training_matches_ddp_and_resumes_in_either_mode(tmp_path):
    ddp, sharded = tmp_path / "ddp", tmp_path / "fsdp"
    assert "FSDP" not in pretrain(ddp, fsdp=False)
    assert "FSDP: parameters, gradients and optimizer state sharded" in pretrain(sharded, fsdp=True)

    # the same optimisation as DDP, step for step
    torch.testing.assert_close(losses(sharded), losses(ddp), rtol=1e-5, atol=0)
    for step in (2, 4, 6):
        assert_same_weights(weights(sharded, step), weights(ddp, step))
    knn = {run: [r["knn_top1"] for r in rows(run) if "knn_top1" in r] for run in (ddp, sharded)}
    assert len(knn[ddp]) == 3 and knn[sharded] == knn[ddp]  # the monitor ran on the sharded model
    moved = max((weights(ddp, 4)[k] - weights(ddp, 2)[k]).abs().max().item() for k in weights(ddp, 4))
    assert moved > 500 * 1e-6  # two steps move the weights far more than the tolerance

    # checkpoints hold whole tensors: the weights load into the unsharded model as they are
    cfg = load_config(PRETRAIN, task="pretrain")
    model = create_mae(
        "mae_vit_tiny_patch16",
        **{k: cfg.model[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")},
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    model.load_state_dict(weights(sharded, 6), strict=True)
    optim = torch.load(sharded / "checkpoint-00000006" / "state.pt", weights_only=True)["optimizer"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(optim["state"]) == set(trainable)
    assert all(optim["state"][n]["exp_avg"].shape == p.shape for n, p in trainable.items())
    assert (sharded / "reconstruction-last.png").stat().st_size > 0  # drawn from the sharded model

    # a sharded run's checkpoint resumes under DDP, a DDP one resumes sharded, and both end where the
    # uninterrupted runs did
    pretrain(cut_back(sharded, tmp_path / "fsdp-then-ddp", 2), fsdp=False)
    pretrain(cut_back(ddp, tmp_path / "ddp-then-fsdp", 4), fsdp=True)
    for run in ("fsdp-then-ddp", "ddp-then-fsdp"):
        assert_same_weights(weights(tmp_path / run, 6), weights(ddp, 6))
        torch.testing.assert_close(losses(tmp_path / run), losses(ddp), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_sharded_finetuning_scores_every_validation_image_once(tmp_path):
    out = tmp_path / "ft"
    args = [
        "recipe=finetune_demo",
        "model.img_size=28",
        "model.patch_size=7",
        "model.in_chans=1",
        "model.embed_dim=32",
        "model.depth=2",
        "model.num_heads=2",
        "model.init=",
        "data.train=synthetic",
        "data.val=synthetic",
        "data.synthetic_samples=5",  # 5 validation images: 2 + 3 per rank, 1 and 2 batches of 2
        "data.epoch_samples=0",
        "data.num_workers=0",
        "data.mean=[0.5]",
        "data.std=[0.25]",
        "train.batch_size=2",
        "train.mixup=0",
        "train.cutmix=0",
        "train.max_steps=2",
        "train.warmup_epochs=0",
        "train.precision=fp32",
        "train.fsdp=true",
        "log.every_steps=1",
        "log.progress=false",
        f"output_dir={out}",
    ]
    stdout = launch("finetune.py", *args)
    assert "FSDP" in stdout
    evals = [r for r in rows(out) if "top1" in r]
    assert [r["step"] for r in evals] == [1, 2]
    best = json.loads((out / BEST / "meta.json").read_text())

    # the best weights, evaluated in one process on all 5 images, give the scores the sharded run logged
    cfg = load_config(args, task="finetune")
    model = build_vit(cfg, 10)
    model.load_state_dict(load_file(str(out / BEST / "model.safetensors")), strict=True)
    loader = build_eval_loader(
        cfg.data, source="synthetic", img_size=28, in_chans=1, batch_size=2, rank=0, world_size=1
    )
    whole = classifier_accuracy(model, loader, torch.device("cpu"), nullcontext, lambda t: t)
    assert whole["top1"] == pytest.approx(best["top1"])
    assert whole["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_lockstep_pads_a_short_share_with_fillers_that_are_not_scored():
    batches = [(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), 0)]
    others_left = iter([True, True, True, False])  # another rank has three batches

    def any_rank(mine: bool) -> bool:
        return next(others_left) or mine

    got = list(in_lockstep(batches, any_rank, (1, 4, 4)))
    assert len(got) == 3
    assert got[0] is batches[0]
    for images, labels, n_bad in got[1:]:
        assert images.shape == (1, 1, 4, 4) and labels.tolist() == [PAD_LABEL] and n_bad == 0

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with_fillers = classifier_accuracy(model, got, torch.device("cpu"), nullcontext, lambda t: t)
    alone = classifier_accuracy(model, batches, torch.device("cpu"), nullcontext, lambda t: t)
    assert with_fillers == alone


def test_optimizer_state_is_keyed_by_name_and_loads_back():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = param_groups(model, 0.05)
    opt = build_optimizer(groups, "adamw", 1e-2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    saved = optimizer_state(model, opt, groups)
    assert set(saved["state"]) == {n for n, _ in model.named_parameters()}
    assert [g["params"] for g in saved["param_groups"]] == [g["names"] for g in groups]

    fresh = build_optimizer(groups, "adamw", 1e-2)
    load_optimizer_state(model, fresh, groups, saved)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    legacy = build_optimizer(groups, "adamw", 1e-2)  # checkpoints written before names: keyed by index
    load_optimizer_state(model, legacy, groups, opt.state_dict())
    assert legacy.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_linear_probing_refuses_fsdp(tmp_path, capsys):
    rc = linprobe_main(["recipe=linprobe_demo", "train.fsdp=true", f"output_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: command line: train.fsdp is not read by linprobe") and "\n" not in err
