"""Fault injection: kill the trainer, signal it, corrupt its data, feed it nonsense, fill its disk.

Each test does the bad thing for real (SIGKILL of a real process, bytes cut out of a real shard, a real
write failure) and asserts the promise a user relies on; docs/reliability.md is the table of scenarios.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from _faults import (
    KILL_ARGS,
    ROOT,
    TINY_FMNIST,
    assert_matches_reference,
    child_env,
    ckpt,
    complete,
    kill,
    last_logged_step,
    logged_steps,
    partial,
    read_by,
    rows,
    snapshot,
    start,
    tiny_rgb,
    uninterrupted,
    wait_until,
    weights,
)
from conftest import needs_fmnist
from PIL import Image

import mae.pretrain
import mae.tasks.pretrain
from mae.data import build_eval_loader, build_train_loader
from mae.pretrain import main
from mae.tasks import load_config
from mae.train.checkpoint import load_train_state

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread, as the subprocesses do: fp32 results then agree bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory.mktemp("reference") / "run")


# ------------------------------------------------------------------------------------------------ kills


@needs_fmnist
def test_sigkill_at_three_moments_resumes_to_the_uninterrupted_result(tmp_path, reference, capsys):
    """SIGKILL (1) inside the first checkpoint write, (2) between checkpoints, (3) inside a later checkpoint
    write; the same command each time. MAE_FAULT_CKPT_DELAY holds a write open long enough to land in it."""
    out = tmp_path / "run"
    args = KILL_ARGS + [f"output_dir={out}"]

    # (1) No checkpoint is complete yet: the next start must begin from scratch.
    p = start(args, MAE_FAULT_CKPT_DELAY="2")
    wait_until("the step-6 checkpoint write", lambda: (out / "checkpoint-00000006.tmp").is_dir(), p)
    kill(p)
    assert complete(out) == [] and partial(out) == ["checkpoint-00000006.tmp"]
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]

    # (2) Between checkpoints 6 and 12.
    p = start(args)
    wait_until("step 8", lambda: 6 in complete(out) and last_logged_step(out) >= 8, p)
    log, _ = kill(p)
    assert "removed incomplete checkpoint checkpoint-00000006.tmp" in log
    assert "resumed from" not in log  # the partial checkpoint was never used
    assert "dropped 6 metrics rows of an earlier attempt" in log
    reached = last_logged_step(out)
    assert complete(out) == [6] and partial(out) == [] and 8 <= reached < 12
    assert logged_steps(out) == list(range(1, reached + 1)), "rows of the first, lost attempt must go"

    # (3) Inside the step-12 checkpoint write of the resumed run.
    p = start(args, MAE_FAULT_CKPT_DELAY="2")
    wait_until("the step-12 checkpoint write", lambda: (out / "checkpoint-00000012.tmp").is_dir(), p)
    log, _ = kill(p)
    assert f"resumed from {ckpt(out, 6)} at step 6" in log
    assert f"dropped {reached - 6} metrics rows" in log
    assert complete(out) == [6] and partial(out) == ["checkpoint-00000012.tmp"]

    # The same command once more, to the end.
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "removed incomplete checkpoint checkpoint-00000012.tmp" in log
    assert f"resumed from {ckpt(out, 6)} at step 6" in log and "dropped 6 metrics rows" in log
    assert complete(out) == [18, 24] and partial(out) == []
    assert (out / "checkpoint-last").resolve() == ckpt(out, 24)
    assert_matches_reference(out, reference)


# ------------------------------------------------------------------------------------------------ signals


@needs_fmnist
@pytest.mark.parametrize(
    "sig,moment", [("SIGTERM", "mid-run"), ("SIGUSR1", "mid-run"), ("SIGTERM", "inside a checkpoint write")]
)
def test_signal_checkpoints_the_current_step_and_exits_0(tmp_path, sig, moment):
    """SLURM preemption: the signal lands at any moment; the trainer finishes the step, checkpoints it,
    and exits 0 within seconds (with 100,000 steps to go, ignoring it would time the test out)."""
    out = tmp_path / "run"
    args = TINY_FMNIST + [f"output_dir={out}", "train.max_steps=100000"]
    if moment == "mid-run":
        p = start(args + ["checkpoint.every_steps=1000"])
        wait_until("step 3", lambda: last_logged_step(out) >= 3, p)
    else:
        p = start(args + ["checkpoint.every_steps=5"], MAE_FAULT_CKPT_DELAY="3")
        wait_until("the step-5 checkpoint write", lambda: (out / "checkpoint-00000005.tmp").is_dir(), p)
    t0 = time.monotonic()
    p.send_signal(getattr(signal, sig))
    log, err = p.communicate(timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 0, err
    assert took < 30, f"exited {took:.1f} s after {sig}"
    step = last_logged_step(out)
    assert f"{sig} received: checkpointed step {step}, exiting" in log
    assert complete(out)[-1] == step and partial(out) == []
    if moment != "mid-run":
        assert complete(out) == [5, 6]  # the write in flight completed, then the next step was saved
    _, state, rng = load_train_state(ckpt(out, step), rank=0)
    assert state["step"] == step and rng is not None
    if sig == "SIGUSR1":
        assert "not under SLURM: no requeue" in log


# ------------------------------------------------------------------------------------------------ bad data


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def odd_mode_images() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """Files in unusual modes -> (bytes, the RGB colour they must become)."""
    g16 = Image.fromarray(np.full((20, 20), 32896, np.uint16))  # mid grey in 16 bits
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal_t = Image.new("P", (20, 20), 0)
    pal_t.putpalette([9, 9, 9] + [0] * 765)
    pal_t.info["transparency"] = 0
    half = 128 / 255  # 50% alpha over white
    return {
        "cmyk.jpg": (_jpg(Image.new("CMYK", (20, 20), (0, 255, 255, 0))), (255, 0, 0)),
        "gray16.png": (_png(g16), (128, 128, 128)),
        "palette.png": (_png(pal), (200, 100, 50)),
        "palette_transparent.png": (_png(pal_t), (255, 255, 255)),
        "rgba.png": (
            _png(Image.new("RGBA", (20, 20), (40, 80, 120, 128))),
            tuple(round(c * half + 255 * (1 - half)) for c in (40, 80, 120)),
        ),
        "gray_alpha.png": (_png(Image.new("LA", (20, 20), (90, 255))), (90, 90, 90)),
    }


def good_colours(n: int) -> list[tuple[int, int, int]]:
    return [(30 + 13 * i, 200 - 9 * i, 60 + 5 * i) for i in range(n)]


def make_image_folder(root: Path, n_good: int) -> dict[str, tuple[int, int, int]]:
    """Class folders a/ and b/ of uniform good images plus the odd modes; returns {path: expected RGB}."""
    expected = {}
    for i, rgb in enumerate(good_colours(n_good)):
        cls = "ab"[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        name = f"{cls}/good{i:02d}.png"
        (root / name).write_bytes(_png(Image.new("RGB", (20, 20), rgb)))
        expected[name] = rgb
    for name, (data, rgb) in odd_mode_images().items():
        (root / "a" / name).write_bytes(data)
        expected[f"a/{name}"] = rgb
    return expected


def mean_colours(images: torch.Tensor) -> list[tuple[float, float, float]]:
    """Un-normalize (mean 0.5, std 0.25) and average each image to one RGB colour in 0..255."""
    x = (images * 0.25 + 0.5) * 255
    return [tuple(c) for c in x.mean((2, 3)).tolist()]


def assert_colours(seen: list, expected: list, tol: float = 6.0) -> None:
    """Each expected colour seen once (JPEG allows a few levels of error), nothing else."""
    left = list(seen)
    for rgb in expected:
        d = [max(abs(a - b) for a, b in zip(s, rgb)) for s in left]
        assert d and min(d) <= tol, f"colour {rgb} missing; seen {sorted(left)}"
        left.pop(int(np.argmin(d)))
    assert not left, f"unexpected images {left}"


def _members(tar_path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar_path) as tf:
        return {m.name: m for m in tf.getmembers()}


def _sources(tars: list[Path]) -> dict[str, tuple[Path, str]]:
    """{source path: (shard, sample key)} from the json member make_shards writes with each sample."""
    found = {}
    for tar in tars:
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    found[json.loads(tf.extractfile(m).read())["src"]] = (tar, m.name[: -len(".json")])
    return found


def damaged_shards(tmp_path: Path) -> tuple[Path, dict]:
    """Shards built by make_shards from a folder (which holds a corrupt JPEG and a zero-byte file), then
    damaged on disk: one JPEG member overwritten with garbage, the last shard cut inside a member, and an
    extra shard with a zero-byte image, a sample without a label and a sample without an image.
    Returns (shard dir, what a full pass must yield: colours, bad sample names)."""
    from data_tools.make_shards import main as make_shards

    src, shards = tmp_path / "images", tmp_path / "shards"
    expected = make_image_folder(src, n_good=14)
    (src / "b" / "rotted.jpg").write_bytes(_jpg(Image.new("RGB", (20, 20), (70, 140, 210))))
    (src / "b" / "corrupt.jpg").write_bytes(_jpg(Image.new("RGB", (20, 20), (1, 2, 3)))[:100])
    (src / "b" / "empty.jpg").write_bytes(b"")
    rc = make_shards([str(src), str(shards), "--samples-per-shard", "8", "--no-shuffle", "--workers", "1",
                      "--no-progress"])  # fmt: skip
    assert rc == 0
    manifest = json.loads((shards / "dataset.json").read_text())
    tars = [shards / s["name"] for s in manifest["shards"]]
    assert sum(s["samples"] for s in manifest["shards"]) == len(expected) + 1  # corrupt and empty: skipped
    where = _sources(tars)

    # Bit rot inside a JPEG: same length, so the tar stays well formed.
    tar, key = where["b/rotted.jpg"]
    m = _members(tar)[f"{key}.jpg"]
    data = bytearray(tar.read_bytes())
    data[m.offset_data + 20 : m.offset_data + m.size] = os.urandom(m.size - 20)
    tar.write_bytes(bytes(data))
    bad = [f"{tar}:{key}"]

    # A copy cut short: the last shard ends inside the data of its last image.
    last = tars[-1]
    cut = [m for m in _members(last).values() if m.name.endswith((".png", ".jpg"))][-1]
    lost = next(s for s, (t, k) in where.items() if t == last and cut.name.startswith(k + "."))
    last.write_bytes(last.read_bytes()[: cut.offset_data + cut.size // 2])

    # A shard written by some other tool.
    unlabelled = (250, 240, 20)
    with wds.TarWriter(str(shards / "train-extra.tar")) as w:
        w.write({"__key__": "zero", "jpg": b"", "cls": b"0"})
        w.write({"__key__": "nolabel", "png": _png(Image.new("RGB", (20, 20), unlabelled))})
        w.write({"__key__": "noimage", "cls": b"1"})
    manifest["shards"].append({"name": "train-extra.tar", "samples": 3})
    (shards / "dataset.json").write_text(json.dumps(manifest))
    bad += [f"{shards / 'train-extra.tar'}:zero", f"{shards / 'train-extra.tar'}:noimage"]

    colours = [rgb for name, rgb in expected.items() if name != lost] + [unlabelled]
    return shards, {"colours": colours, "bad": bad, "cut": str(last)}


def skipped_names(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "mae.data")


def test_damaged_shards_skip_count_and_convert_never_zero_images(tmp_path, caplog):
    """A full pass yields every readable sample (odd modes converted to the right colours, the unlabelled
    one with label -1), counts and names every bad one, and turns none into a blank image."""
    shards, facts = damaged_shards(tmp_path)
    cfg = load_config(tiny_rgb() + [f"data.train={shards}"]).data
    ev = build_eval_loader(
        cfg, source=str(shards), img_size=16, in_chans=3, batch_size=5, rank=0, world_size=1
    )
    with caplog.at_level("WARNING", logger="mae.data"):
        batches = list(ev)
    images = torch.cat([x for x, _, _ in batches])
    labels = torch.cat([y for _, y, _ in batches])
    assert_colours(mean_colours(images), facts["colours"])
    assert (labels == -1).sum() == 1 and set(labels.tolist()) <= {-1, 0, 1}
    logged = skipped_names(caplog)
    for name in facts["bad"]:
        assert f"skipping bad sample {name}:" in logged
    assert "unexpected end of data" in logged and facts["cut"] in logged
    # 3 bad samples + the cut shard (webdataset reports its read error twice, and the cut sample's members
    # before the cut arrive as an image-less sample: 1 to 3 counts for the one lost sample).
    n_bad = sum(n for _, _, n in batches)
    assert 3 + 1 <= n_bad <= 3 + 3, n_bad


def test_pretraining_on_damaged_shards_runs_and_reports_the_count(tmp_path, capsys, caplog):
    shards, facts = damaged_shards(tmp_path)
    out = tmp_path / "run"
    args = tiny_rgb() + [f"data.train={shards}", f"output_dir={out}", "train.batch_size=4", "train.max_steps=12",
                         "checkpoint.every_steps=100"]  # fmt: skip
    with caplog.at_level("WARNING", logger="mae.data"):
        assert main(args) == 0
    final = rows(out)[-1]
    assert final["step"] == 12 and np.isfinite(final["loss"])
    # The run's count is exactly what its loader skipped over the same 12 steps (2 passes and a half).
    cfg = load_config(args)
    loader = build_train_loader(cfg.data, source=str(shards), img_size=16, in_chans=3, batch_size=4,
                                augment="mae", seed=cfg.seed, rank=0, world_size=1)  # fmt: skip
    spe = loader.steps_per_epoch
    counted = sum(n for e in range(-(-12 // spe)) for _, _, n in list(loader.iterate(e))[: 12 - e * spe])
    assert counted >= 2 * len(facts["bad"]) and final["bad_samples"] == counted
    assert f"skipped {counted} bad samples" in capsys.readouterr().out
    assert all(name in skipped_names(caplog) for name in facts["bad"])


def test_pretraining_on_an_image_folder_with_bad_files_counts_each_skip(tmp_path, capsys):
    """Map-style path: 16 good files + 4 bad ones, 5 steps of 4 per epoch, so every file is drawn once per
    epoch and exactly 4 skips per epoch must be counted."""
    src = tmp_path / "images"
    make_image_folder(src, n_good=10)  # 10 good + 6 odd modes
    (src / "a" / "corrupt.jpg").write_bytes(_jpg(Image.new("RGB", (20, 20), (1, 2, 3)))[:100])
    (src / "a" / "empty.png").write_bytes(b"")
    (src / "b" / "text.png").write_bytes(b"not an image at all")
    (src / "b" / "truncated.png").write_bytes(_png(Image.new("RGB", (20, 20), (5, 6, 7)))[:-30])
    out = tmp_path / "run"
    args = tiny_rgb() + [f"data.train={src}", f"output_dir={out}", "train.batch_size=4", "train.max_steps=10"]
    assert main(args) == 0
    assert rows(out)[-1]["bad_samples"] == 8
    assert "skipped 8 bad samples" in capsys.readouterr().out


def test_a_batch_of_only_bad_samples_costs_one_batch_not_the_run(tmp_path):
    """2 good and 2 bad files, batches of 2: some epochs draw a batch with no good sample at all."""
    src = tmp_path / "images"
    src.mkdir()
    for i, rgb in enumerate(good_colours(2)):
        (src / f"good{i}.png").write_bytes(_png(Image.new("RGB", (20, 20), rgb)))
    (src / "bad0.png").write_bytes(b"")
    (src / "bad1.png").write_bytes(b"garbage")
    out = tmp_path / "run"
    args = tiny_rgb() + [f"data.train={src}", f"output_dir={out}", "train.batch_size=2", "train.max_steps=12"]
    cfg = load_config(args)
    loader = build_train_loader(cfg.data, source=str(src), img_size=16, in_chans=3, batch_size=2, augment="mae",
                                seed=cfg.seed, rank=0, world_size=1)  # fmt: skip
    sizes = [len(x) for e in range(6) for x, _, _ in loader.iterate(e)]
    assert 0 in sizes, "the scenario needs an all-bad batch"
    assert main(args) == 0
    r = rows(out)
    assert r[-1]["step"] == 12 and r[-1]["bad_samples"] == 12
    assert all(np.isfinite(x["loss"]) for x in r)


def test_fine_tuning_survives_a_batch_of_only_bad_samples(tmp_path):
    """The same for the classification loss of fine-tuning (the shared loop, another loss)."""
    import mae.finetune

    src = tmp_path / "images"
    for i, rgb in enumerate(good_colours(2)):
        (src / f"c{i}").mkdir(parents=True)
        (src / f"c{i}" / "good.png").write_bytes(_png(Image.new("RGB", (20, 20), rgb)))
        (src / f"c{i}" / "bad.png").write_bytes(b"")
    out = tmp_path / "run"
    args = [a for a in read_by("finetune", tiny_rgb()) if not a.startswith("recipe=")] + [
        "recipe=finetune_demo", "model.name=vit_tiny_patch16", f"data.train={src}", f"output_dir={out}",
        "train.batch_size=2", "train.max_steps=12", "data.val=",
    ]  # fmt: skip
    cfg = load_config(args, task="finetune")
    loader = build_train_loader(cfg.data, source=str(src), img_size=16, in_chans=3, batch_size=2,
                                augment="finetune", seed=cfg.seed, rank=0, world_size=1)  # fmt: skip
    assert 0 in [len(x) for e in range(6) for x, _, _ in loader.iterate(e)], (
        "the scenario needs an all-bad batch"
    )
    assert mae.finetune.main(args) == 0
    r = rows(out)
    assert r[-1]["step"] == 12 and r[-1]["bad_samples"] == 12
    assert all(np.isfinite(x["loss"]) for x in r)


# ------------------------------------------------------------------------------------------------ bad commands


def _fmnist(*extra: str) -> list[str]:
    return TINY_FMNIST + ["train.max_steps=2", *extra]


BAD_COMMANDS = {
    "unknown key": (_fmnist("train.bach_size=4"), "train.bach_size"),
    "wrong type": (_fmnist("train.batch_size=four"), "train.batch_size"),
    "missing data path": (_fmnist("data.train=/no/such/images"), "/no/such/images"),
    "image size not divisible by the patch size": (_fmnist("model.img_size=30"), "model.img_size=30"),
    "batch larger than the dataset": (
        tiny_rgb() + ["data.train=synthetic", "data.synthetic_samples=12", "train.batch_size=16"],
        "12 samples",
    ),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_bad_command_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    args, names = BAD_COMMANDS[case]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    t0 = time.monotonic()
    assert main(args + [f"output_dir={out}"]) == 2
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and names in err[0], err
    assert list(tmp_path.iterdir()) == [], "a refused command must write nothing"
    assert took < 20, f"took {took:.1f} s to refuse"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_fmnist(f"output_dir={out}")) == 0
    return out


@needs_fmnist
@pytest.mark.parametrize(
    "change", ["model.depth=3", "model.embed_dim=32", "model.num_heads=4", "model.patch_size=4"]
)
def test_output_dir_of_another_model_is_refused_untouched(tmp_path, finished_run, capsys, change):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    before = snapshot(out)
    assert main(_fmnist(f"output_dir={out}", "train.max_steps=4", change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    key = change.split("=")[0]
    assert len(err) == 1 and err[0].startswith("error:") and key in err[0], err
    assert snapshot(out) == before


def test_cli_bad_command_exit_status_is_2_with_one_line_on_stderr(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "mae.pretrain", "recipe=demo", "train.bach_size=4", f"output_dir={out}"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error:")
    assert "train.bach_size" in r.stderr and "train.batch_size" in r.stderr  # names it, suggests the fix
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ numerics


def _bad_loss_at(step: int, value: float):
    """Wrap build_task so that the loss of optimizer step `step` (1-based) becomes `value` (nan, inf)."""
    build = mae.tasks.pretrain.build_task

    def build_task(cfg, acc):
        task = build(cfg, acc)
        loss_fn = task.loss_fn
        task.loss_fn = lambda m, x, y, s, micro: (
            loss_fn(m, x, y, s, micro) * (value if s + 1 == step else 1.0)
        )
        return task

    return build_task


@needs_fmnist
@pytest.mark.parametrize(
    "kind,bad_step,log_every",
    [("nan", 6, 1), ("inf", 7, 100)],  # caught at the step's log row; caught at the step-8 checkpoint
)
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys, kind, bad_step, log_every
):
    out = tmp_path / "run"
    args = TINY_FMNIST + [f"output_dir={out}", "train.max_steps=12", "checkpoint.every_steps=4",
                          f"log.every_steps={log_every}"]  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(mae.tasks.pretrain, "build_task", _bad_loss_at(bad_step, float(kind)))
        assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: non-finite loss at step {bad_step}"), err
    assert complete(out) == [4] and partial(out) == []
    assert all(np.isfinite(r["loss"]) for r in rows(out)) and last_logged_step(out) < bad_step
    model_state, state, _ = load_train_state(ckpt(out, 4), rank=0)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in model_state.values())
    # The same command without the fault resumes from the kept checkpoint and finishes.
    assert main(args) == 0
    assert f"resumed from {ckpt(out, 4)} at step 4" in capsys.readouterr().out
    assert logged_steps(out)[-1] == 12 and all(np.isfinite(r["loss"]) for r in rows(out))


# ------------------------------------------------------------------------------------------------ untrusted files


class _Payload:
    """Unpickling this runs code (writes the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@needs_fmnist
@pytest.mark.parametrize("victim", ["state.pt", "rng-rank0.pt"])
def test_checkpoint_crafted_to_run_code_is_refused_unexecuted(tmp_path, finished_run, capsys, victim):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    marker = tmp_path / "pwned"
    target = ckpt(out, 2) / victim
    torch.save({"step": 2, "optimizer": _Payload(marker)}, target)
    # The file is live: an unsafe loader would run it.
    torch.load(target, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()

    assert main(_fmnist(f"output_dir={out}", "train.max_steps=4")) != 0
    assert not marker.exists(), "loading a checkpoint executed code from it"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "checkpoint-00000002" in err[0], err
    assert complete(out) == [2]


@needs_fmnist
def test_reference_format_weights_crafted_to_run_code_are_refused_unexecuted(tmp_path, finished_run, capsys):
    """model.init of fine-tuning: a `.pth` in the reference release's layout ({'model': state_dict, 'args':
    ...}) whose 'args' runs code when unpickled."""
    import mae.finetune

    marker = tmp_path / "pwned"
    bad = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": weights(ckpt(finished_run, 2)), "args": _Payload(marker)}, bad)
    torch.load(bad, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()

    out = tmp_path / "finetune"
    args = [a for a in read_by("finetune", _fmnist()) if a != "recipe=demo"] + [
        "recipe=finetune_demo",
        "model.name=vit_tiny_patch16",
    ]
    assert mae.finetune.main(args + [f"model.init={bad}", f"output_dir={out}"]) == 2
    assert not marker.exists(), "loading model.init executed code from it"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(bad) in err[0], err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ disk


@needs_fmnist
def test_failed_checkpoint_write_keeps_the_previous_one_and_reports(tmp_path, reference, capsys):
    """A real write failure: after the step-6 checkpoint, the process's file-size limit drops to 64 KiB
    (what a full quota does), so writing the step-12 weights fails inside the checkpoint write."""
    out = tmp_path / "run"
    args = KILL_ARGS + [f"output_dir={out}"]
    p = start(args, MAE_FAULT_CKPT_DELAY="1")
    wait_until("the step-6 checkpoint", lambda: complete(out) == [6], p)
    resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    log, err = p.communicate(timeout=180)
    assert p.returncode == 1, log + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint write at step 12 failed"), lines
    assert "File too large" in lines[0] and "previous checkpoint is intact" in lines[0]
    assert complete(out) == [6] and (out / "checkpoint-last").resolve() == ckpt(out, 6)
    _, state, _ = load_train_state(ckpt(out, 6), rank=0)
    assert state["step"] == 6
    # With room again, the same command resumes from it and ends where the uninterrupted run ends.
    assert main(args) == 0
    assert f"resumed from {ckpt(out, 6)} at step 6" in capsys.readouterr().out
    assert_matches_reference(out, reference)
