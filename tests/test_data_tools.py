"""data_tools: make_shards -> verify_shards -> the training loader, bad inputs, interrupted builds."""

import gzip
import io
import json
import os
import struct
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from data_tools import make_shards, verify_shards
from mae.data import DataError, build_eval_loader, build_train_loader


def data_cfg(**kw):
    base = dict(train="", val="", fmnist_dir="", num_workers=2, shuffle_buffer=20, epoch_samples=0, resampled=False,
                synthetic_samples=0, label_fraction=1.0, mean=[0.0], std=[1.0], scale_min=0.2, hflip=True,
                crop_pct=1.0, auto_augment="", reprob=0.0)  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def make_folder(root, per_class: int = 5, classes=("astronaut", "chelsea", "coffee")) -> dict[int, int]:
    """Class folders of real photos (skimage), each image a distinct crop; files alternate JPEG / PNG.
    Returns {identity: label}, the identity painted as a uniform grey 8-pixel top strip (one JPEG block
    row, so compression keeps it to within one level; identities are multiples of 4)."""
    truth = {}
    for label, name in enumerate(classes):
        photo = getattr(skimage.data, name)()
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            ident = 4 * (10 * label + j + 1)
            crop = photo[20 * j : 20 * j + 96, 30 * j : 30 * j + 128].copy()
            crop[:8] = ident
            fmt = "png" if j % 2 else "jpg"
            Image.fromarray(crop).save(root / name / f"{j}.{fmt}", quality=98)
            truth[ident] = label
    return truth


def ident_of(x: torch.Tensor) -> int:
    """Identity from the top strip of an eval image (crop_pct 1, normalized with mean 0, std 1)."""
    return 4 * round(float(x[0, :4].median()) * 255 / 4)


def shards(tmp_path, *args) -> tuple[str, int]:
    out = str(tmp_path / "shards")
    rc = make_shards.main([str(tmp_path / "images"), out, "--workers", "2", "--no-progress", *args])
    return out, rc


def test_folder_to_shards_to_loader_every_image_once_with_label(tmp_path, capsys):
    truth = make_folder(tmp_path / "images")
    out, rc = shards(tmp_path, "--samples-per-shard", "4")
    assert rc == 0
    manifest = json.loads(open(os.path.join(out, "dataset.json")).read())
    assert manifest["total"] == 15 and manifest["classes"] == ["astronaut", "chelsea", "coffee"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 3]
    assert json.loads(open(os.path.join(out, "classes.json")).read()) == manifest["classes"]
    assert verify_shards.main([out, "--workers", "1"]) == 0
    assert "astronaut=5  chelsea=5  coffee=5" in capsys.readouterr().out

    # eval: every image once, with its own label, pixels intact
    ev = build_eval_loader(
        data_cfg(), source=out, img_size=96, in_chans=3, batch_size=4, rank=0, world_size=1
    )
    got = {ident_of(x): int(y) for xs, ys, _ in ev for x, y in zip(xs, ys)}
    assert got == truth and ev.num_samples == 15 and ev.num_classes == 3
    # training over 2 ranks x 2 workers: every image once per epoch (15 // (3 x 2) = 2 steps x 6 = 12 images)
    loaders = [build_train_loader(data_cfg(), source=out, img_size=32, in_chans=3, batch_size=3, augment="mae",
                                  seed=1, rank=r, world_size=2) for r in range(2)]  # fmt: skip
    assert loaders[0].num_samples == 15 and loaders[0].steps_per_epoch == 2
    labels = torch.cat([y for ld in loaders for _, y, _ in ld.iterate(0)])
    assert len(labels) == 12 and torch.bincount(labels).max() <= 5


def test_bad_inputs_are_reported_skipped_and_counted(tmp_path, capsys):
    make_folder(tmp_path / "images", per_class=2)
    (tmp_path / "images" / "coffee" / "empty.jpg").write_bytes(b"")
    (tmp_path / "images" / "coffee" / "notes.png").write_bytes(b"these are notes, not pixels")
    good = (tmp_path / "images" / "chelsea" / "0.jpg").read_bytes()
    (tmp_path / "images" / "chelsea" / "cut.jpg").write_bytes(good[: len(good) // 2])
    out, rc = shards(tmp_path)
    assert rc == 0
    err = capsys.readouterr().err
    for name in ("coffee/empty.jpg", "coffee/notes.png", "chelsea/cut.jpg"):
        assert name in err
    manifest = json.loads(open(os.path.join(out, "dataset.json")).read())
    assert manifest["total"] == 6 and manifest["skipped"] == 3
    assert {s["path"] for s in manifest["skipped_inputs"]} == {
        "coffee/empty.jpg",
        "coffee/notes.png",
        "chelsea/cut.jpg",
    }
    assert verify_shards.main([out]) == 0


def test_interrupted_build_leaves_no_whole_looking_shard_and_rerun_finishes(tmp_path, monkeypatch):
    truth = make_folder(tmp_path / "images")
    real_finish, calls = make_shards.ShardWriter.finish, []

    def crash_on_third(self, next_pos):
        calls.append(next_pos)
        if len(calls) == 3:  # the third shard is on disk, half written, when the process dies
            self.tar.close()
            raise KeyboardInterrupt
        real_finish(self, next_pos)

    monkeypatch.setattr(make_shards.ShardWriter, "finish", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        shards(tmp_path, "--samples-per-shard", "4", "--workers", "1")
    out = str(tmp_path / "shards")
    names = sorted(os.listdir(out))
    assert [n for n in names if n.endswith(".tar")] == ["train-000000.tar", "train-000001.tar"]
    assert "train-000002.tar.partial" in names and "dataset.json" not in names
    assert verify_shards.main([out]) == 1  # unfinished: no manifest, a partial shard

    monkeypatch.setattr(make_shards.ShardWriter, "finish", real_finish)
    before = os.path.getmtime(os.path.join(out, "train-000000.tar"))
    out, rc = shards(tmp_path, "--samples-per-shard", "4", "--workers", "1")
    assert rc == 0
    assert os.path.getmtime(os.path.join(out, "train-000000.tar")) == before  # kept, not rewritten
    assert not any(n.endswith(".partial") for n in os.listdir(out))
    assert verify_shards.main([out]) == 0
    ev = build_eval_loader(
        data_cfg(), source=out, img_size=96, in_chans=3, batch_size=8, rank=0, world_size=1
    )
    assert {ident_of(x): int(y) for xs, ys, _ in ev for x, y in zip(xs, ys)} == truth


def test_rerun_same_command_is_a_no_op_and_other_options_refuse(tmp_path, capsys):
    make_folder(tmp_path / "images", per_class=2)
    out, rc = shards(tmp_path)
    assert rc == 0
    assert shards(tmp_path)[1] == 0
    assert "already complete" in capsys.readouterr().out
    assert shards(tmp_path, "--samples-per-shard", "2")[1] == 2
    err = capsys.readouterr().err
    assert "samples_per_shard" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert shards(tmp_path, "--samples-per-shard", "2", "--overwrite")[1] == 0
    assert len([n for n in os.listdir(out) if n.endswith(".tar")]) == 3


def test_verify_fails_on_truncated_member_and_names_it(tmp_path, capsys):
    make_folder(tmp_path / "images", per_class=2)
    out, _ = shards(tmp_path, "--no-shuffle")
    path = os.path.join(out, "train-000000.tar")
    with tarfile.open(path) as tf:
        member = [m for m in tf.getmembers() if m.name.endswith((".jpg", ".png"))][3]
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)
    capsys.readouterr()
    assert verify_shards.main([out, "--workers", "1"]) == 1
    report = capsys.readouterr().out
    key = member.name.split(".")[0]
    assert f"{key}: truncated member {member.name}" in report
    assert "manifest says 6" in report


def test_verify_fails_on_corrupt_image_bytes_inside_intact_tar(tmp_path, capsys):
    make_folder(tmp_path / "images", per_class=2)
    out, _ = shards(tmp_path)
    path = os.path.join(out, "train-000000.tar")
    with tarfile.open(path) as tf:
        member = [m for m in tf.getmembers() if m.name.endswith(".png")][0]
    with open(path, "r+b") as f:  # overwrite the middle of a PNG's compressed data
        f.seek(member.offset_data + member.size // 2)
        f.write(b"\x00" * 64)
    assert verify_shards.main([out]) == 1
    assert member.name.split(".")[0] in capsys.readouterr().out


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    assert make_shards.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    (tmp_path / "empty").mkdir()
    assert make_shards.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "no image files" in err[1]
    assert verify_shards.main([str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as e:
        make_shards.main(["only-one-arg"])
    assert e.value.code == 2


def test_list_file_resize_reencode_and_string_labels(tmp_path):
    make_folder(tmp_path / "images", per_class=2)
    rows = ["path,label"] + [
        f"images/{c}/{j}.{'png' if j % 2 else 'jpg'},{c}" for c in ("coffee", "chelsea") for j in range(2)
    ]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    assert (
        make_shards.main(
            [str(tmp_path / "list.csv"), out, "--resize", "48", "--format", "jpg", "--no-progress"]
        )
        == 0
    )
    manifest = json.loads(open(os.path.join(out, "dataset.json")).read())
    assert manifest["classes"] == ["chelsea", "coffee"] and manifest["total"] == 4
    with tarfile.open(os.path.join(out, "train-000000.tar")) as tf:
        imgs = {
            m.name: Image.open(io.BytesIO(tf.extractfile(m).read())) for m in tf if m.name.endswith(".jpg")
        }
        labels = sorted(int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls"))
    assert len(imgs) == 4 and all(min(im.size) == 48 and im.format == "JPEG" for im in imgs.values())
    assert labels == [0, 0, 1, 1]


def test_fashion_mnist_source_and_unlabelled_folder(tmp_path):
    rng = np.random.default_rng(0)
    for stem, arr, magic in (("train-images-idx3-ubyte", rng.integers(0, 256, (7, 28, 28)), 2051),
                             ("train-labels-idx1-ubyte", np.arange(7) % 10, 2049)):  # fmt: skip
        raw = struct.pack(f">{1 + arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(raw)
    out = str(tmp_path / "fm")
    assert (
        make_shards.main(
            ["fashion-mnist", out, "--fmnist-dir", str(tmp_path), "--no-shuffle", "--no-progress"]
        )
        == 0
    )
    ev = build_eval_loader(data_cfg(num_workers=0), source=out, img_size=28, in_chans=1, batch_size=7, rank=0,
                           world_size=1, max_samples=0)  # fmt: skip
    (x, y, n_bad), = list(ev)  # fmt: skip
    assert y.tolist() == list(range(7)) and n_bad == 0 and ev.num_classes == 10
    pixels = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(pixels))  # lossless PNG

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(flat / f"{i}.png")
    assert make_shards.main([str(flat), str(tmp_path / "flat_shards"), "--no-progress"]) == 0
    manifest = json.loads(open(tmp_path / "flat_shards" / "dataset.json").read())
    assert manifest["classes"] is None and manifest["num_classes"] == 0 and manifest["total"] == 3
    with tarfile.open(tmp_path / "flat_shards" / "train-000000.tar") as tf:
        assert not any(n.endswith(".cls") for n in tf.getnames())


@pytest.mark.slow
def test_pretrain_from_built_shards(tmp_path):
    from mae import pretrain

    make_folder(tmp_path / "images", per_class=4)
    out, rc = shards(tmp_path, "--samples-per-shard", "3")
    assert rc == 0 and verify_shards.main([out]) == 0
    run = tmp_path / "run"
    argv = ["recipe=demo", f"data.train={out}", "data.val=", f"output_dir={run}", "model.in_chans=3", "model.img_size=32",
            "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.num_workers=2", "train.batch_size=4", "train.max_steps=3",
            "log.knn_every_steps=0", "log.every_steps=1", "log.viz_images=2", "log.wandb=disabled"]  # fmt: skip
    assert pretrain.main(argv) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps[-1] == 3 and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


WORKER_SIGNALS = """
import signal
from data_tools import make_shards

signal.signal(signal.SIGTERM, lambda *a: None)  # the parent's own handler, one that returns


def handlers(_):
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN


with make_shards._pool(2) as imap:
    print(sorted(set(imap(handlers, range(16)))))
try:
    with make_shards._pool(2) as imap:  # an error mid-build: the pool is terminated, and ends
        next(iter(imap(handlers, range(1000))))
        raise RuntimeError
except RuntimeError:
    print("ended")
"""


def test_shard_workers_take_the_default_sigterm_so_the_pool_always_ends():
    """make_shards' forked workers do not keep a parent's Python SIGTERM handler (a training entry point's, a
    notebook's): Pool.terminate stops them with SIGTERM, and a worker whose inherited handler returns would wait
    forever on the pool's queue lock (seen as a hung test suite). They ignore SIGINT: Ctrl-C reaches the whole
    process group, and the parent ends the pool."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", WORKER_SIGNALS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[(True,", "True)]", "ended"]


@pytest.mark.slow
def test_an_interrupted_build_is_refused_as_training_data_until_finished(tmp_path, capsys):
    """A build killed mid-way (5 shards and a .partial) once trained silently on the shards it had written."""
    import signal
    import subprocess
    import sys
    import time

    from mae import pretrain

    if not os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
        pytest.skip("Fashion-MNIST not installed (scripts/setup.sh)")
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "data_tools.make_shards", "fashion-mnist", str(out), "--samples-per-shard", "500",
           "--workers", "1", "--no-progress"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.tar"))) < 3:
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    tars = sorted(t.name for t in out.glob("*.tar"))
    assert not (out / "dataset.json").exists() and verify_shards.main([str(out)]) == 1
    capsys.readouterr()

    run = tmp_path / "run"
    argv = ["recipe=demo", "data.val=", f"output_dir={run}", "model.depth=1", "train.max_steps=1",
            "log.knn_every_steps=0", "log.viz_images=0", "data.num_workers=0", "train.batch_size=8"]  # fmt: skip
    assert pretrain.main(argv + [f"data.train={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "unfinished make_shards build" in err[0]
        and "re-running the same make_shards" in err[0]
    )
    pattern = f"{out}/train-{{000000..{len(tars) - 1:06d}}}.tar"
    assert pattern in err[0] and not run.exists()
    assert pretrain.main(argv + [f"data.train={pattern}"]) == 0  # the shards named: the user's choice

    assert make_shards.main(["fashion-mnist", str(out), "--samples-per-shard", "500", "--workers", "1",
                             "--no-progress"]) == 0  # fmt: skip
    loader = build_train_loader(data_cfg(num_workers=0), source=str(out), img_size=28, in_chans=1,
                                batch_size=500, augment="mae", seed=0, rank=0, world_size=1)  # fmt: skip
    assert loader.num_samples == 60000
    (out / "extra.tar").write_bytes((out / "train-000000.tar").read_bytes())  # not in the manifest
    with pytest.raises(DataError, match="does not match its manifest"):
        build_train_loader(data_cfg(num_workers=0), source=str(out), img_size=28, in_chans=1,
                           batch_size=500, augment="mae", seed=0, rank=0, world_size=1)  # fmt: skip


def test_make_shards_never_writes_into_its_source_nor_a_used_directory(tmp_path, capsys):
    make_folder(tmp_path / "images", per_class=2)
    before = sorted(p.name for p in (tmp_path / "images").rglob("*"))
    for out, needle in (
        (tmp_path / "images", "is SOURCE"),
        (tmp_path / "images" / "shards", "inside SOURCE"),
    ):
        assert make_shards.main([str(tmp_path / "images"), str(out), "--no-progress", "--workers", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert sorted(p.name for p in (tmp_path / "images").rglob("*")) == before
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    assert make_shards.main([str(tmp_path / "images"), str(tmp_path / "used"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt" in err[0]
    assert sorted(os.listdir(tmp_path / "used")) == ["notes.txt"]
