"""Shared pieces of the fault-injection suite: tiny runs, real processes, and what a run leaves on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from conftest import TINY_MODEL
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# A 2-block ViT on 28x28 Fashion-MNIST in fp32; 8 steps per epoch, so runs cross epoch boundaries.
TINY_FMNIST = [
    "recipe=demo",
    "data.train=fashion-mnist",
    "data.val=",
    "data.epoch_samples=128",
    "data.num_workers=0",
    "model.img_size=28",
    "model.in_chans=1",
    *TINY_MODEL,
    "train.batch_size=16",
    "train.precision=fp32",
    "train.warmup_epochs=0.5",
    "log.every_steps=1",
    "log.knn_every_steps=0",
    "log.viz_images=0",
    "log.progress=false",
]


# 24 steps = 3 epochs of 8; a checkpoint every 6 steps, so resumes land mid-epoch.
KILL_ARGS = TINY_FMNIST + ["train.max_steps=24", "checkpoint.every_steps=6", "checkpoint.keep=2"]


def tiny_rgb(img_size: int = 16, patch_size: int = 8) -> list[str]:
    """The same tiny model on 3-channel images of another source (shards, folders, synthetic)."""
    swap = {"model.img_size": str(img_size), "model.patch_size": str(patch_size), "model.in_chans": "3"}
    args = [a for a in TINY_FMNIST if a.split("=")[0] not in (*swap, "data.epoch_samples", "data.train")]
    return (
        args
        + [f"{k}={v}" for k, v in swap.items()]
        + ["data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]
    )


def read_by(task: str, args: list[str]) -> list[str]:
    """`args` without the key=value pairs that `task` does not read (it refuses them): a pretraining
    command's tiny-model arguments reused for fine-tuning."""
    from mae.tasks import READS

    return [a for a in args if a.startswith("recipe=") or a.split("=")[0] in READS[task]]


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a training subprocess: one thread (as the in-process runs of the suite), not under
    SLURM, no wandb, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MAE_FAULT_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


def start(args: list[str], stdout: Path | None = None, **env: str) -> subprocess.Popen:
    """`mae/pretrain.py ARGS` as a real process (its own session, so a kill reaches only it), through
    tests/_fault_entry.py, which injects the MAE_FAULT_* faults of `env`; its output is piped, or written to
    the file `stdout` (to read while it runs)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_fault_entry.py"), *args],
        cwd=ROOT,
        env=child_env(**env),
        stdout=subprocess.PIPE if stdout is None else open(stdout, "w"),  # noqa: SIM115 (the child owns it)
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_until(what: str, cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll `cond` every 10 ms; fail (with the process's output) if it exits or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited ({proc.returncode}) before {what}\n{out}\n{err}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGKILL: no handler runs, nothing is flushed or cleaned up."""
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return out, err


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    good = []
    for line in path.read_text().splitlines():
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a row being written right now
    return good


def logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in rows(out)]


def last_logged_step(out: Path) -> int:
    steps = logged_steps(out)
    return steps[-1] if steps else 0


def complete(out: Path) -> list[int]:
    """Steps of the complete checkpoints (final name and meta.json), oldest first."""
    found = []
    for p in out.glob("checkpoint-*"):
        if p.is_dir() and not p.is_symlink() and p.name[11:].isdigit() and (p / "meta.json").is_file():
            found.append(int(p.name[11:]))
    return sorted(found)


def partial(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*.tmp"))


def ckpt(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:08d}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max |diff| {(a[k] - b[k]).abs().max().item():.3g}"


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under `d` (symlinks as their target), to show that a refused command changed nothing."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(d))] = os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(d))] = p.read_bytes()
    return out


def uninterrupted(out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The uninterrupted in-process run of KILL_ARGS (one thread, as the subprocesses): (rows, final weights)."""
    from mae.pretrain import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(KILL_ARGS + [f"output_dir={out}"]) == 0
    finally:
        torch.set_num_threads(n)
    return rows(out), weights(ckpt(out, 24))


def assert_matches_reference(out: Path, reference, total: int = 24) -> None:
    """Each step logged once, with the uninterrupted run's loss, and the uninterrupted run's final weights."""
    ref_rows, ref_weights = reference
    assert logged_steps(out) == list(range(1, total + 1))
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in ref_rows]
    assert_same_weights(weights(ckpt(out, total)), ref_weights)
