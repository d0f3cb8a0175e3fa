"""Stop signals as clusters and terminals deliver them, and one run per output directory.

SLURM, `timeout`, process supervisors and Ctrl-C signal every process of a job or process group, data workers
included; torchrun's agent forwards its signal to each rank's whole process group. Each test here delivers a
signal that way to a real run with data workers on and checks the promise: the documented exit status, a
loadable checkpoint of the step it stopped at, each metrics row once, and a re-run of the same command that
ends with the weights of the uninterrupted run. docs/reliability.md lists the delivery modes and their tests.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from _faults import (
    KILL_ARGS,
    ROOT,
    TINY_FMNIST,
    assert_matches_reference,
    assert_same_weights,
    child_env,
    ckpt,
    complete,
    kill,
    last_logged_step,
    logged_steps,
    partial,
    read_by,
    rows,
    start,
    uninterrupted,
    wait_until,
    weights,
)
from conftest import TWO_CPU_PROCESSES, needs_fmnist, run_dir
from PIL import Image

from data_tools.make_shards import main as make_shards
from mae.data import build_eval_loader, build_train_loader
from mae.tasks import load_config
from mae.train.checkpoint import load_train_state
from mae.train.runtime import STOP, StopExchange

pytestmark = pytest.mark.slow

WORKERS = ["data.num_workers=2"]  # the data workers are in the signalled group; results do not depend on them
INT_NOTICE = STOP.INT_NOTICE


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory.mktemp("reference") / "run")


def signal_group(p: subprocess.Popen, sig: signal.Signals) -> None:
    """What a cluster or terminal does: the signal to every process of the group (start() makes one per run)."""
    os.killpg(p.pid, sig)


def stop_step(log: str, sig: str) -> int:
    """The step a run says it checkpointed on `sig`."""
    found = re.findall(rf"^{sig} received: checkpointed step (\d+), exiting$", log, re.M)
    assert len(found) == 1, log[-3000:]
    return int(found[0])


def assert_stopped_at_checkpoint(out, log: str, sig: str) -> int:
    """The run checkpointed the last step it logged, completely, and said so; returns that step."""
    step = stop_step(log, sig)
    assert last_logged_step(out) == step
    assert complete(out)[-1] == step and partial(out) == []
    _, state, rng = load_train_state(ckpt(out, step), rank=0)
    assert state["step"] == step and rng is not None
    assert logged_steps(out) == list(range(1, step + 1))
    return step


# ------------------------------------------------------------------------------------------------ data workers


def _image_folder(root) -> None:
    for i in range(40):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (6 * i, 255 - 6 * i, 128)).save(root / "ab"[i % 2] / f"{i:02d}.png")


def _batches(kind: str, tmp_path):
    """The batches of one epoch of a loader of `kind`, with 2 workers."""
    cfg = load_config(TINY_FMNIST + WORKERS).data
    rgb = dict(img_size=16, in_chans=3, batch_size=4, rank=0, world_size=1)
    if kind in ("image folder", "shards"):
        _image_folder(tmp_path / "images")
        source = str(tmp_path / "images")
        if kind == "shards":
            args = [source, str(tmp_path / "shards"), "--samples-per-shard", "8", "--no-progress"]
            assert make_shards([*args, "--workers", "1"]) == 0
            source = str(tmp_path / "shards")
        return build_train_loader(cfg, source=source, augment="mae", seed=0, **rgb).iterate(0)
    grey = dict(img_size=28, in_chans=1, batch_size=16, rank=0, world_size=1)
    if kind == "built-in, evaluation (k-NN bank)":
        return iter(build_eval_loader(cfg, source="fashion-mnist", max_samples=128, **grey))
    return build_train_loader(cfg, source="fashion-mnist", augment="mae", seed=0, **grey).iterate(0)


@needs_fmnist
@pytest.mark.parametrize("kind", ["built-in", "built-in, evaluation (k-NN bank)", "image folder", "shards"])
def test_data_workers_of_every_loader_ignore_stop_signals(tmp_path, kind):
    """Every worker of every kind of loader gets SIGTERM, SIGINT and SIGUSR1 (as from a group signal) after
    the first batch: each keeps working and the epoch is delivered whole (the trainer decides when to stop)."""
    # this loader's workers: not the children earlier tests left (wandb-core, other loaders' workers, helpers)
    others = set(psutil.Process().children())
    batches = _batches(kind, tmp_path)
    seen = [next(batches)]

    def workers() -> list[psutil.Process]:  # a worker names itself when it starts: one may not have yet
        return [p for p in psutil.Process().children() if p not in others and p.name() == "pt_data_worker"]

    deadline = time.monotonic() + 30
    while len(workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = workers()
    assert len(workers) == 2
    for w in workers:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.kill(w.pid, sig)
    time.sleep(0.3)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    seen += list(batches)  # a dead worker would raise here
    assert len(seen) == (8 if kind.startswith("built-in") else 32)  # data.epoch_samples=128


def rerun_matches_reference(args: list[str], out, step: int, reference) -> None:
    """The same command again resumes from the stop step and ends as the uninterrupted run."""
    again = start(args)
    log, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"resumed from {ckpt(out, step)} at step {step}" in log
    assert_matches_reference(out, reference)


# ------------------------------------------------------------------------------------------------ one process


@needs_fmnist
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_group_signal_with_workers_checkpoints_exits_0_and_resumes(tmp_path, reference, sig):
    """`kill -TERM -- -PGID` (timeout, supervisors) reaches the workers too: they ignore it, the trainer stops."""
    out = tmp_path / "run"
    args = KILL_ARGS + WORKERS + [f"output_dir={out}"]
    p = start(args)
    wait_until("step 3", lambda: last_logged_step(out) >= 3, p)
    signal_group(p, getattr(signal, sig))
    log, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    step = assert_stopped_at_checkpoint(out, log, sig)
    print(f"\n[signals] {sig} to the process group: exit {p.returncode}, checkpoint at step {step}")
    assert 3 <= step < 24 and "DataLoader worker" not in err
    rerun_matches_reference(args, out, step, reference)


@needs_fmnist
def test_ctrl_c_stops_after_the_step_with_one_line_then_resumes(tmp_path, reference):
    """Ctrl-C signals the terminal's foreground group: one line says what happens, the step is checkpointed,
    the exit status is 130 (interrupted: `pretrain && finetune` does not go on)."""
    out = tmp_path / "run"
    args = KILL_ARGS + WORKERS + [f"output_dir={out}"]
    p = start(args)
    wait_until("step 3", lambda: last_logged_step(out) >= 3, p)
    signal_group(p, signal.SIGINT)
    log, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert log.count(INT_NOTICE) == 1 and "KeyboardInterrupt" not in err
    step = assert_stopped_at_checkpoint(out, log, "SIGINT")
    print(f"\n[signals] Ctrl-C (SIGINT to the group): exit {p.returncode}, checkpoint at step {step}")
    rerun_matches_reference(args, out, step, reference)


@needs_fmnist
def test_second_ctrl_c_aborts_at_once_inside_a_checkpoint_write(tmp_path, reference):
    """The second Ctrl-C does not wait for the (here 20 s) checkpoint write in flight: exit 130 at once; the
    half-written checkpoint is never resumed, and the re-run ends with the uninterrupted run's weights."""
    out = tmp_path / "run"
    args = KILL_ARGS + WORKERS + [f"output_dir={out}"]
    p = start(args, MAE_FAULT_CKPT_DELAY="20")
    wait_until("step 2", lambda: last_logged_step(out) >= 2, p)
    signal_group(p, signal.SIGINT)
    wait_until("the checkpoint write of the stop step", lambda: partial(out) != [], p)
    t0 = time.monotonic()
    signal_group(p, signal.SIGINT)
    p.wait(timeout=60)  # the process itself; its orphaned workers exit within 5 s (torch's parent watchdog)
    took = time.monotonic() - t0
    log, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-3000:]
    assert took < 5, f"the second Ctrl-C took {took:.1f} s"
    assert log.count(INT_NOTICE) == 1 and log.count("aborted (second Ctrl-C)") == 1
    assert partial(out) != [] and "checkpointed step" not in log
    print(f"\n[signals] Ctrl-C twice: exit {p.returncode} {took:.2f} s after the second, {partial(out)} left")
    again = start(args)
    log, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "removed incomplete checkpoint" in log
    assert_matches_reference(out, reference)


# ------------------------------------------------------------------------------------------------ two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(args: list[str], **env: str) -> subprocess.Popen:
    """`accelerate launch` of 2 gloo processes, in its own process group, as a terminal or `timeout` runs it."""
    cmd = [sys.executable, *TWO_CPU_PROCESSES, "--main_process_port", str(free_port()), "-m", "mae.pretrain"]
    return subprocess.Popen(
        cmd + args,
        cwd=ROOT,
        env=child_env(ACCELERATE_USE_CPU="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


TWO_PROC = TINY_FMNIST + WORKERS + ["train.batch_size=8", "train.max_steps=48", "checkpoint.every_steps=100"]


def test_stop_exchange_cadence_follows_the_step_time():
    """Ranks compare stop flags about every `every_s` seconds, whatever the step time: rarely for fast steps,
    every step for slow ones, so the stop latency stays near `every_s` plus one step."""
    ex = StopExchange(every_s=1.0)
    assert ex.due(0) and ex.proposal(1, now=100.0) == 1  # the first step: nothing timed yet
    ex.agreed(1, 100.0, 1)
    assert not ex.due(1) and ex.due(2)
    assert ex.proposal(11, now=100.3) == 33  # 30 ms steps: every 33 steps (~1 s)
    assert ex.proposal(3, now=106.0) == 1  # 3 s steps: every step
    assert ex.proposal(1001, now=100.001) == StopExchange.MAX_STEPS
    ex.agreed(11, 100.3, 33)
    assert [s for s in range(12, 80) if ex.due(s)][0] == 44 and ex.count == 2


@needs_fmnist
def test_two_process_group_sigterm_stops_every_rank_at_one_step_and_resumes(tmp_path):
    """SIGTERM to the group of `accelerate launch` (2 ranks, 2 workers each): the agent forwards it to each
    rank's group; both ranks stop at the same step after a few stop-flag exchanges (not one per step), write
    one complete checkpoint, and the same command ends with the uninterrupted 2-process run's weights."""
    ref = tmp_path / "reference"
    r = launch_two(TWO_PROC + [f"output_dir={ref}"])
    log, err = r.communicate(timeout=600)
    assert r.returncode == 0, err[-3000:]

    # The ranks compare flags about every stop_check_s seconds: on a fast machine the default 1 s is more than
    # the whole run, which then ends before the next exchange. A cadence of ~4 steps of the reference's pace
    # keeps the stop inside the run on any machine and still exchanges less often than every step.
    step_s = statistics.median(2 * 8 / r["img_per_s"] for r in rows(ref)[2:])
    args = TWO_PROC + [f"checkpoint.stop_check_s={4 * step_s:.4f}"]
    out = tmp_path / "run"
    p = launch_two(args + [f"output_dir={out}"])
    wait_until("step 4", lambda: last_logged_step(out) >= 4, p, timeout=300)
    signal_group(p, signal.SIGTERM)
    log, err = p.communicate(timeout=120)
    # The ranks exit 0; the launcher (torch elastic) reports the signal it got as an error and exits 1.
    assert p.returncode == 1 and "got signal: 15" in err, err[-3000:]
    step = assert_stopped_at_checkpoint(out, log, "SIGTERM")
    assert step < 48
    assert {f.name for f in ckpt(out, step).iterdir()} >= {"rng-rank0.pt", "rng-rank1.pt", "state.pt"}
    exchanges, steps = map(int, re.search(r"stop flags compared (\d+) times in (\d+) steps", log).groups())
    assert steps == step and 1 <= exchanges < steps, (exchanges, steps)
    print(
        f"\n[signals] 2-process group SIGTERM: launcher exit {p.returncode}, checkpoint at step {step}, "
        f"stop flags compared {exchanges} times in {steps} steps"
    )

    again = launch_two(args + [f"output_dir={out}"])
    log, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"resumed from {ckpt(out, step)} at step {step}" in log
    assert logged_steps(out) == list(range(1, 49))
    assert_same_weights(weights(ckpt(out, 48)), weights(ckpt(ref, 48)))


# ------------------------------------------------------------------------------------------------ the lock


BUSY = re.compile(
    r"^error: output_dir (\S+) is in use by another run \(host (\S+), pid (\d+), since ([^)]+)\)"
)


@needs_fmnist
def test_second_launch_into_a_busy_output_dir_exits_2_naming_the_holder(tmp_path):
    """A second copy of a running command (one process, then 2 ranks) waits checkpoint.lock_wait_s, then
    exits 2 with one line naming host, pid and start time of the holder; the running run is untouched."""
    out = tmp_path / "run"
    args = (
        TINY_FMNIST + WORKERS + [f"output_dir={out}", "train.max_steps=100000", "checkpoint.every_steps=1000"]
    )
    holder = start(args)
    wait_until("step 2", lambda: last_logged_step(out) >= 2, holder)

    t0 = time.monotonic()
    second = start(args + ["checkpoint.lock_wait_s=2"])
    log, err = second.communicate(timeout=120)
    assert second.returncode == 2, err[-3000:]
    assert time.monotonic() - t0 >= 2
    line = err.strip().splitlines()
    assert len(line) == 1 and (m := BUSY.match(line[0])), err
    assert m.group(2) == socket.gethostname() and int(m.group(3)) == holder.pid
    assert "waiting up to 2 s" in log
    print(f"\n[lock] a second launch prints: {line[0]}")

    # All ranks of a 2-process launch exit 2 (rank 0 alone prints the line); none waits forever.
    two = launch_two(args + ["checkpoint.lock_wait_s=1"])
    log, err = two.communicate(timeout=300)
    assert two.returncode != 0 and err.count("is in use by another run") == 1, err[-3000:]
    assert re.search(r"exitcode\s*:\s*2", err), err[-3000:]

    assert holder.poll() is None, "the running run was disturbed"
    signal_group(holder, signal.SIGTERM)
    log, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err[-3000:]
    assert_stopped_at_checkpoint(out, log, "SIGTERM")


@needs_fmnist
def test_waiting_run_takes_over_when_the_holder_stops(tmp_path):
    """A requeued job that starts while the previous one still runs: it waits, and when the previous one
    has checkpointed and exited it takes the directory over and resumes from that checkpoint."""
    out, second_log = tmp_path / "run", tmp_path / "second.log"
    args = (
        TINY_FMNIST + WORKERS + [f"output_dir={out}", "train.max_steps=100000", "checkpoint.every_steps=1000"]
    )
    first = start(args, MAE_FAULT_CKPT_DELAY="2")  # a slow last checkpoint, as on a busy filesystem
    wait_until("step 2", lambda: last_logged_step(out) >= 2, first)
    second = start(args + ["checkpoint.lock_wait_s=120"], stdout=second_log)
    wait_until("the second run to wait", lambda: "waiting up to 120 s" in second_log.read_text(), second)
    signal_group(first, signal.SIGTERM)
    log, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    step = stop_step(log, "SIGTERM")  # the second run may be logging already
    assert step in complete(out)
    wait_until("the second run's own steps", lambda: last_logged_step(out) >= step + 2, second)
    signal_group(second, signal.SIGTERM)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-3000:]
    assert f"resumed from {ckpt(out, step)} at step {step}" in second_log.read_text()
    assert_stopped_at_checkpoint(out, second_log.read_text(), "SIGTERM")  # each step logged once


@needs_fmnist
def test_relaunch_right_after_sigkill_is_not_locked_out(tmp_path, reference):
    """The kernel drops a killed run's lock at once, even while its data workers (which never held it) are
    still alive: the same command, with no wait allowed, resumes and finishes."""
    out = tmp_path / "run"
    args = KILL_ARGS + WORKERS + [f"output_dir={out}"]
    p = start(args)
    wait_until("the step-6 checkpoint", lambda: 6 in complete(out), p)
    kill(p)
    again = start(args + ["checkpoint.lock_wait_s=0"])
    log, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "in use" not in log + err and "resumed from" in log
    assert_matches_reference(out, reference)


# ------------------------------------------------------------------------------------------------ exact resume


def _task_args(task: str) -> list[str]:
    """A tiny run of `task` with its demo recipe's augmentation and regularisation (fine-tuning: also the ImageNet
    recipe's Mixup / CutMix / RandAugment), 10 steps per epoch, 2 data workers, no evaluation."""
    run = ["train.max_steps=14", "checkpoint.every_steps=100", "data.val=", *WORKERS]
    if task == "segment":
        tiny = ["recipe=segment_demo", "model.img_size=56", "model.patch_size=8", "model.depth=2",
                "model.embed_dim=32", "model.num_heads=2", "model.seg_channels=8", "data.epoch_samples=80",
                "train.batch_size=8", "train.precision=fp32", "log.every_steps=1", "log.progress=false"]  # fmt: skip
        return tiny + run
    if task == "detect":  # large-scale jitter, drop path, and the RPN's and RoI heads' sampling of proposals
        tiny = ["recipe=detect_demo", "model.patch_size=8", "model.depth=2", "model.embed_dim=32",
                "model.num_heads=2", "model.window_size=4", "model.fpn_channels=8", "model.drop_path=0.1",
                "data.epoch_samples=40", "train.batch_size=4", "train.precision=fp32", "log.every_steps=1",
                "log.progress=false"]  # fmt: skip
        return tiny + run
    recipe = {"pretrain": "demo", "finetune": "finetune_demo", "linprobe": "linprobe_demo"}[task]
    args = read_by(task, TINY_FMNIST) + [f"recipe={recipe}", "data.epoch_samples=160"]
    if task == "finetune":
        args += ["train.mixup=0.8", "train.cutmix=1.0", "data.auto_augment=rand-m9-mstd0.5-inc1"]
    return args + run


@needs_fmnist
@pytest.mark.parametrize("task", ["pretrain", "finetune", "linprobe", "segment", "detect"])
def test_every_task_stopped_mid_epoch_by_a_group_sigterm_resumes_to_the_uninterrupted_weights(tmp_path, task):
    """Drop path, Mixup / CutMix, RandAugment, random erasing, the segmentation augmentation, large-scale jitter and
    the detector's proposal sampling draw from random generators that the checkpoint restores; nothing else may
    draw from them after the restore (a segmentation run once diverged from step 7: its loader drew from torch's
    global generator on resume)."""
    args, env = _task_args(task), {"MAE_FAULT_TASK": task}
    ref = tmp_path / "reference"
    r = start(args + [f"output_dir={ref}"], **env)
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err[-3000:]

    out = tmp_path / "run"
    p = start(args + [f"output_dir={out}"], **env)
    wait_until("step 2", lambda: last_logged_step(out) >= 2, p)
    signal_group(p, signal.SIGTERM)
    log, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    step = assert_stopped_at_checkpoint(out, log, "SIGTERM")
    assert step % 10, f"stopped at the epoch boundary {step}"
    again = start(args + [f"output_dir={out}"], **env)
    log, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"resumed from {ckpt(out, step)} at step {step}" in log
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(ref)]
    assert_same_weights(weights(ckpt(out, 14)), weights(ckpt(ref, 14)))


# ------------------------------------------------------------------------------------------------ evaluations


def _scenes(root, n: int) -> str:
    """n test scenes of fashion-mnist-scenes as an images/ + masks/ folder."""
    from mae.data.segmentation import pair_source

    src = pair_source("fashion-mnist-scenes:test", train=False, reduce_zero_label=False)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        canvas, mask = src.draw(i)
        Image.fromarray(canvas).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return str(root)


@needs_fmnist
@pytest.mark.parametrize("what", ["evaluation", "k-NN monitor", "detection evaluation"])
def test_a_stop_signal_during_a_long_evaluation_checkpoints_within_seconds_and_the_resume_redoes_it(
    tmp_path, what
):
    """Once the segmentation demo's SIGTERM waited 235 s for its evaluation of 2,000 scenes: SLURM's grace period
    is 30 s. Here the evaluation takes two minutes (6 batches, each 20 s slower): the group SIGTERM lands in it,
    the run abandons it at the next batch, checkpoints the step and exits 0 long before the evaluation could have
    ended; the re-run (at full speed) runs it first, writes the step's row with its figures once, and goes on."""
    mark = tmp_path / "evaluating"
    if what == "evaluation":
        args = _task_args("segment") + [f"data.val={_scenes(tmp_path / 'val', 48)}", "data.epoch_samples=32",
                                        "train.max_steps=6", "train.eval_every=1"]  # fmt: skip
        env, key = {"MAE_FAULT_TASK": "segment"}, "miou"
    elif what == "detection evaluation":
        from experiments.detect_demo import write_scenes

        write_scenes(tmp_path / "val", 24, "test")
        args = _task_args("detect") + [f"data.val={tmp_path / 'val'}", "data.epoch_samples=16",
                                       "train.max_steps=6", "train.eval_every=1"]  # fmt: skip
        env, key = {"MAE_FAULT_TASK": "detect"}, "box_ap"
    else:
        args = TINY_FMNIST + WORKERS + ["data.val=fashion-mnist:test", "log.knn_every_steps=4",
                                        "log.knn_train_samples=1280", "log.knn_val_samples=256",
                                        "train.max_steps=6", "checkpoint.every_steps=100"]  # fmt: skip
        env, key = {}, "knn_top1"
    out = tmp_path / "run"
    args += [f"output_dir={out}"]
    p = start(args, MAE_FAULT_EVAL_DELAY="20", MAE_FAULT_EVAL_MARK=str(mark), **env)
    try:
        wait_until("an evaluation under way", mark.exists, p, timeout=600)
        signal_group(p, signal.SIGTERM)
        log, err = p.communicate(timeout=60)  # the evaluation alone takes two minutes
    finally:
        if p.poll() is None:
            kill(p)
    assert p.returncode == 0, err[-3000:]
    assert f"stop signal during the {what.removeprefix('detection ')} at step 4: abandoned" in log
    assert complete(out) == [4] and partial(out) == [] and stop_step(log, "SIGTERM") == 4
    assert logged_steps(out) == [1, 2, 3]  # step 4's row waits for its evaluation

    again = start(args, **env)
    log, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resumed from" in log and "running the evaluations a stop signal interrupted" in log
    assert logged_steps(out) == list(range(1, 7))
    assert [r["step"] for r in rows(out) if key in r] == ([4] if what == "k-NN monitor" else [4, 6])


# ------------------------------------------------------------------------------------------------ every command


def _tool_runs(root):
    """(a pretraining run, a segmentation run that predicts by sliding 32 px windows 4 px apart) of tiny models,
    as the training loop leaves them, and a 1024 px image."""
    from mae.models import create_mae
    from mae.tasks import load_config
    from mae.weights.build import build_segmenter

    keys = read_by("pretrain", TINY_FMNIST)
    model = create_mae("mae_vit_tiny_patch16", img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=2,
                       num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    pre = run_dir(root / "pre", model.state_dict(), keys)
    seg_keys = ["recipe=segment_demo", "model.img_size=32", "model.patch_size=8", "model.depth=2",
                "model.embed_dim=32", "model.num_heads=2", "model.seg_channels=8", "model.num_classes=3",
                "train.eval_mode=slide", "train.eval_stride=4"]  # fmt: skip
    seg = run_dir(root / "seg", build_segmenter(load_config(seg_keys), 3).state_dict(), seg_keys)
    (root / "big").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)).save(
        root / "big" / "a.png"
    )
    return pre, seg


def _command(name: str, root, pre, seg) -> tuple[list[str], str]:
    """(argv after `python -m`, the output it must not leave half-made) of a command busy for many seconds."""
    out = str(root / f"out-{name}")
    return {
        "mae-embed": (["mae.embed", str(pre), "fashion-mnist", out, "--workers", "1"], out),
        "mae-segment-predict": (["mae.segment_predict", str(seg), str(root / "big"), out], out),
        "mae-export": (["mae.export", str(pre), out, "--to", "hf"], out),
        "mae-viz": (["mae.viz", str(pre), str(root / "big" / "a.png"), "--out", out + ".png"], out + ".png"),
        "mae-bench": (
            [
                "mae.bench",
                "--model",
                "mae_vit_tiny_patch16",
                "--img-size",
                "32",
                "--batch",
                "2",
                "--steps",
                "100000",
                "--device",
                "cpu",
            ],
            out,
        ),  # fmt: skip
        "make_shards": (
            ["data_tools.make_shards", "fashion-mnist", out, "--workers", "1", "--no-progress"],
            out,
        ),
        "mae-data-stats": (["data_tools.stats", "fashion-mnist", "--samples", "0", "--workers", "1"], out),
    }[name]


def _torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in open(f"/proc/{pid}/maps").read()
    except OSError:
        return False


@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    return (root, *_tool_runs(root))


@needs_fmnist
@pytest.mark.parametrize(
    "name,sig",
    [(n, signal.SIGINT) for n in ("mae-embed", "mae-segment-predict", "mae-export", "mae-viz", "mae-bench",
                                  "make_shards", "mae-data-stats")]
    + [("mae-embed", signal.SIGTERM), ("mae-segment-predict", signal.SIGTERM)],
)  # fmt: skip
def test_ctrl_c_or_sigterm_ends_every_command_with_one_line_and_nothing_half_written(tool_runs, name, sig):
    """Ctrl-C on mae-embed once printed a 56-line traceback. Every command, stopped while it loads or works, says
    so in one line and exits 130 (Ctrl-C) or 143 (SIGTERM); an output directory it was filling is not left."""
    root, pre, seg = tool_runs
    argv, out = _command(name, root, pre, seg)
    p = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    wait_until("torch loaded", lambda: _torch_loaded(p.pid), p, timeout=120)
    signal_group(p, sig)
    log, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, (p.returncode, log[-2000:], err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: interrupted ("), err[-3000:]
    assert "Traceback" not in log + err
    if name != "make_shards":  # shards written so far are kept for the build to resume
        assert not os.path.exists(out)
