"""TensorBoard through Accelerate's trackers: the curves and the reconstruction figure, continued on resume."""

import os
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mae.pretrain import main
from tests.conftest import TINY_MODEL, needs_fmnist


def events(run_dir) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


@needs_fmnist
def test_tensorboard_has_loss_lr_speed_and_pictures_and_a_resumed_run_continues_them(tmp_path):
    out = tmp_path / "run"
    args = [
        "recipe=demo",
        *TINY_MODEL,
        "train.batch_size=16",
        "train.precision=fp32",
        "train.warmup_epochs=0.0001",
        "data.num_workers=0",
        "log.every_steps=1",
        "log.knn_every_steps=0",
        "log.viz_images=2",
        "log.tensorboard=true",
        f"output_dir={out}",
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "checkpoint.keep=5",
    ]
    assert main(args) == 0
    ea = events(out)
    assert {"loss", "lr", "img_per_s"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3, 4]
    assert ea.Scalars("lr")[-1].value > 0
    assert [e.step for e in ea.Images("reconstruction")] == [2, 4]
    first_losses = [e.value for e in ea.Scalars("loss")]

    # killed after the step-2 checkpoint: the same command resumes, and the curves have each step once
    shutil.rmtree(out / "checkpoint-00000004")
    (out / "checkpoint-last").unlink()
    os.symlink("checkpoint-00000002", out / "checkpoint-last")
    assert main(args) == 0
    ea = events(out)
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in ea.Scalars("loss")] == pytest.approx(first_losses, abs=1e-5)
    assert [e.step for e in ea.Images("reconstruction")] == [2, 4]

    # an attempt killed before its first checkpoint: the run starts over, its curves too
    for ckpt in out.glob("checkpoint-*"):
        ckpt.unlink() if ckpt.is_symlink() else shutil.rmtree(ckpt)
    assert main(args) == 0
    assert [e.step for e in events(out).Scalars("loss")] == [1, 2, 3, 4]


def test_tensorboard_is_off_by_default_and_writes_nothing(tmp_path):
    from mae.tasks import load_config
    from mae.train.trackers import log_with

    assert load_config([]).log.tensorboard is False
    assert log_with(load_config([f"output_dir={tmp_path}"])) is None
    trackers = log_with(load_config([f"output_dir={tmp_path}", "log.tensorboard=true"]))
    assert [t.name for t in trackers] == ["tensorboard"]
    assert not any(tmp_path.iterdir())
