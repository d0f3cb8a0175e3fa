"""The Fashion-MNIST study (experiments/fashion_mnist.py): its budget file is valid for the recipes it names,
and at each label fraction every fine-tune / probe run gets the same budget whatever its initialisation
or lr."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import needs_fmnist

from experiments.fashion_mnist import run_overrides, samples_seen
from mae.config import derive
from mae.data import build_train_loader
from mae.tasks import load_config

ROOT = Path(__file__).resolve().parents[1]
BUDGET = yaml.safe_load((ROOT / "experiments" / "fashion_mnist.yaml").read_text())


def _argv(recipe: str, overrides: dict, out: Path) -> list[str]:
    return [f"recipe={recipe}", f"output_dir={out}"] + [f"{k}={v}" for k, v in overrides.items()]


def test_pretraining_overrides_are_valid(tmp_path):
    cfg = load_config(_argv(BUDGET["pretrain"]["recipe"], BUDGET["pretrain"]["overrides"], tmp_path))
    assert cfg.data.train == "fashion-mnist"


@needs_fmnist
def test_at_each_label_fraction_every_run_processes_the_same_number_of_images(tmp_path):
    pre = tmp_path / "pretrain"
    for kind in ("finetune", "linprobe"):
        spec = BUDGET[kind]
        budgets = {}
        for fraction in BUDGET["label_fractions"]:
            for init, blr in [("mae", None)] + [("scratch", x) for x in spec.get("scratch_blr") or [None]]:
                o = run_overrides(spec, init, fraction, 0, pre, blr)
                cfg = load_config(_argv(spec["recipe"], o, tmp_path / "run"), task=kind)
                assert cfg.model.init == (str(pre) if init == "mae" else "")
                loader = build_train_loader(
                    cfg.data, source=cfg.data.train, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                    batch_size=cfg.train.batch_size, augment=kind, seed=0, rank=0, world_size=1,
                )  # fmt: skip
                d = derive(cfg, 1, loader.steps_per_epoch)
                if blr is not None:
                    assert cfg.train.blr == blr
                budgets[(fraction, init, blr)] = d.total_steps * d.effective_batch
                batch = d.effective_batch
                if kind == "finetune" and init == "scratch":
                    assert cfg.train.layer_decay == 1.0  # no layer-wise decay without pretrained layers
        for fraction in BUDGET["label_fractions"]:
            at = {k: v for k, v in budgets.items() if k[0] == fraction}
            assert len(at) == 1 + len(spec.get("scratch_blr") or [None])
            assert len(set(at.values())) == 1, at  # MAE and every scratch lr: the same images
            assert abs(next(iter(at.values())) - samples_seen(spec, fraction)) < batch


def test_a_finished_run_is_skipped_and_one_with_other_settings_refused(tmp_path):
    import json

    import pytest

    from experiments.fashion_mnist import finished

    out = tmp_path / "finetune-scratch-0.1-seed0"
    out.mkdir()
    (out / "config.yaml").write_text(
        yaml.safe_dump({"seed": 0, "train": {"blr": 0.004}, "derived": {"total_steps": 3}})
    )
    (out / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    assert not finished(out, {"seed": 0, "train.blr": 4e-3})  # interrupted at step 2 of 3: run it again
    (out / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 0.9, "top1": 50.0}) + "\n")
    assert finished(out, {"seed": 0, "train.blr": "4e-3"})
    with pytest.raises(SystemExit, match="train.blr=0.004 but the budget now says 0.001"):
        finished(out, {"seed": 0, "train.blr": 1e-3})
    assert not finished(tmp_path / "never-run", {"seed": 0})


def test_run_settings_reach_every_run_but_do_not_make_a_finished_run_unfinished(
    tmp_path, monkeypatch, capsys
):
    """`fashion_mnist.py budget.yaml data.num_workers=8 train.compile=false` on a GPU machine: the settings
    go on each run's command line, a run finished without them is still finished, and a key that changes
    the results is refused with exit code 2 (it belongs in the budget)."""
    import json

    import pytest

    import experiments.fashion_mnist as study

    budget_path, settings = study.parse_args(
        ["experiments/fashion_mnist.yaml", "data.num_workers=8", "train.compile=false"]
    )
    assert budget_path == Path("experiments/fashion_mnist.yaml")
    assert settings == {"data.num_workers": "8", "train.compile": "false"}
    assert study.parse_args([]) == (ROOT / "experiments" / "fashion_mnist.yaml", {})
    with pytest.raises(SystemExit) as e:
        study.parse_args(["--help"])
    assert e.value.code == 0 and "KEY=VALUE" in capsys.readouterr().out
    for bad in (["train.epochs=40"], ["x.yaml", "data.num_workers"], ["missing.yaml"]):
        with pytest.raises(SystemExit) as e:
            study.parse_args(bad)
        assert e.value.code == 2

    calls = []
    monkeypatch.setattr(study.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    out = tmp_path / "finetune-mae-0.1-seed0"
    assert study.run("finetune", "finetune_demo", out, {"seed": 0}, tmp_path / "logs", settings) is not None
    assert calls[-1][-3:] == ["seed=0", "data.num_workers=8", "train.compile=false"]
    out.mkdir()
    (out / "config.yaml").write_text(
        yaml.safe_dump({"seed": 0, "data": {"num_workers": 1}, "derived": {"total_steps": 1}})
    )
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "top1": 80.0}) + "\n")
    assert study.run("finetune", "finetune_demo", out, {"seed": 0}, tmp_path / "logs", settings) is None
    assert len(calls) == 1


def test_the_pretrained_checkpoint_is_named_relative_to_the_repository(tmp_path):
    """A study made on one machine continues on another: the fine-tunes name the pretraining run relative to
    the repository root, and a run that named it by its absolute path still counts as the same."""
    from experiments.fashion_mnist import finished

    pre = ROOT / "runs" / "study" / "pretrain"
    o = run_overrides(BUDGET["finetune"], "mae", 0.1, 0, pre)
    assert o["model.init"] == "runs/study/pretrain"
    out = tmp_path / "finetune-mae-0.1-seed0"
    out.mkdir()
    (out / "config.yaml").write_text(
        yaml.safe_dump({"model": {"init": str(pre)}, "derived": {"total_steps": 1}})
    )
    (out / "metrics.jsonl").write_text('{"step": 1, "top1": 80.0}\n')
    assert finished(out, {"model.init": "runs/study/pretrain"})
    import pytest

    with pytest.raises(SystemExit, match="model.init"):
        finished(out, {"model.init": "runs/other/pretrain"})


@needs_fmnist
def test_raw_pixel_baselines_are_real_classifiers():
    """The context rows: on the study's own 1% subset, logistic regression and k-NN on pixels score far above
    chance (10%) and near their known full-data figures (~84% / ~85%), so the table has a true floor."""
    import torch

    from experiments.pixel_baselines import knn_pixels, linear_pixels, pixels
    from mae.data.sources import label_subset

    train, test = pixels("train"), pixels("test")
    idx = torch.from_numpy(label_subset(train[1].numpy(), 0.01, 0))
    assert len(idx) == 600 and torch.bincount(train[1][idx]).tolist() == [60] * 10
    sub = (train[0][idx], train[1][idx])
    assert 70.0 < linear_pixels(sub, test, l2=1e-2, steps=100) < 90.0
    assert 65.0 < knn_pixels(sub, test) < 90.0


@needs_fmnist
def test_feature_probes_read_what_the_linear_probe_trains_on(tmp_path):
    """The block-by-block probes of a pretraining run: the hand-rolled block walk gives the model's own
    tokens (the last block's normalised cls token is exactly the linear probe's input, the mean patch token
    what the k-NN monitor pools, the grid read-out the normalised patch tokens' mean over a 3x3 grid), both
    classifiers score every block far above chance, and the random-init control is another encoder."""
    import torch

    from experiments.feature_probes import block_features, encoder, probes
    from experiments.pixel_baselines import pixels
    from mae import pretrain

    run = tmp_path / "pretrain"
    args = [
        "recipe=demo",
        f"output_dir={run}",
        "train.max_steps=2",
        "train.batch_size=32",
        "log.knn_every_steps=0",
    ]
    assert pretrain.main([*args, "data.num_workers=0", "log.viz_images=0"]) == 0
    vit = encoder(run)
    x = pixels("test")[0][:16]
    feats = block_features(vit, x, batch=5)
    assert set(feats) == {f"block{b}/{p}" for b in range(1, 7) for p in ("cls", "mean")} | {
        "final/cls",
        "final/grid",
    }
    with torch.no_grad():
        tokens = vit.forward_features(x.view(-1, 1, 28, 28))
    assert torch.allclose(feats["final/cls"], tokens[:, 0], atol=1e-5)
    fmap = tokens[:, 1:].transpose(1, 2).reshape(16, -1, 7, 7)  # (N, D, 7, 7) in patch order
    assert feats["final/grid"].shape == (16, 9 * tokens.shape[-1])
    top_left = fmap[:, :, :3, :3].mean(
        dim=(2, 3)
    )  # adaptive pooling of 7 into 3 cells: rows/cols 0-2, 2-4, 4-6
    assert torch.allclose(feats["final/grid"].view(16, -1, 9)[:, :, 0], top_left, atol=1e-5)
    with torch.no_grad():
        random_tokens = encoder(run, pretrained=False).forward_features(x.view(-1, 1, 28, 28))
    assert not torch.allclose(random_tokens, tokens, atol=1e-2)
    assert torch.allclose(vit.norm(feats["block6/cls"]), tokens[:, 0], atol=1e-5)
    assert not torch.allclose(feats["block1/mean"], feats["block6/mean"], atol=1e-2)

    r = probes(run, [0.01], test_samples=2000)
    assert set(r["linear"]) == set(feats) == set(r["knn"])
    assert set(r["random"]) == {"knn"}  # the control is read by the k-NN alone
    assert set(r["random"]["knn"]) == {"block6/mean", "final/cls", "final/grid"}
    for table in (r, r["random"]):
        for kind in set(table) & {"linear", "knn"}:
            for name, by_fraction in table[kind].items():
                assert 30.0 < by_fraction["0.01"] <= 100.0, (kind, name, by_fraction)


def test_samples_seen_is_one_number_or_one_per_label_fraction():
    import pytest

    assert samples_seen({"samples_seen": 30000}, 0.1) == 30000
    per = {"samples_seen": {0.01: 30000, "0.1": 60000, 1.0: 240000}}
    assert [samples_seen(per, f) for f in (0.01, 0.1, 1.0)] == [30000, 60000, 240000]
    with pytest.raises(SystemExit, match="no entry for label fraction 0.5"):
        samples_seen(per, 0.5)


def test_report_puts_every_number_next_to_its_baselines(tmp_path):
    """The generated report: the best scratch lr per row, MAE minus scratch, the pixel rows, MAE minus the
    pixels, and the block-by-block probe table with the best feature of each column in bold."""
    import json

    from experiments.fashion_mnist import write_report

    budget = {
        **BUDGET,
        "seeds": [0],
        "label_fractions": [0.01, 1.0],
        "pretrain": {"recipe": "demo", "overrides": {"train.epochs": 2}},
    }
    pre = tmp_path / "pretrain"
    pre.mkdir()
    (pre / "config.yaml").write_text(
        yaml.safe_dump({"log": {"knn_k": 20, "knn_train_samples": 5000, "knn_val_samples": 1000}})
    )
    (pre / "metrics.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [{"step": 1, "loss": 1.5, "knn_top1": 70.0}, {"step": 2, "loss": 0.5, "knn_top1": 84.0}]
        )
    )
    sweep = budget["finetune"]["scratch_blr"]
    results = {
        ("finetune", "mae", 0.01): {None: [80.0]},
        ("finetune", "scratch", 0.01): {sweep[0]: [60.0], sweep[1]: [70.0], sweep[2]: [65.0]},
        ("finetune", "mae", 1.0): {None: [91.0]},
        ("finetune", "scratch", 1.0): {sweep[0]: [88.0], sweep[1]: [87.0], sweep[2]: [86.0]},
        ("linprobe", "mae", 0.01): {None: [75.0]},
        ("linprobe", "scratch", 0.01): {None: [40.0]},
        ("linprobe", "mae", 1.0): {None: [82.0]},
        ("linprobe", "scratch", 1.0): {None: [41.0]},
    }
    pixels = {
        "linear": {"0.01": 78.0, "1.0": 84.5},
        "linear_l2": {"0.01": 0.01, "1.0": 0.001},
        "knn": {"0.01": 73.5, "1.0": 85.5},
        "knn_monitor": 81.0,
    }
    feats = {
        "linear": {
            "block5/mean": {"0.01": 79.0, "1.0": 86.0},
            "final/cls": {"0.01": 77.0, "1.0": 86.5},
            "final/grid": {"0.01": 76.0, "1.0": 86.0},
        },
        "linear_l2": {"block5/mean": {"0.01": 0.01, "1.0": 0.01}, "final/cls": {"0.01": 0.01, "1.0": 0.01}},
        "knn": {
            "block5/mean": {"0.01": 70.0, "1.0": 84.0},
            "final/cls": {"0.01": 72.0, "1.0": 83.0},
            "final/grid": {"0.01": 71.5, "1.0": 83.5},
        },
        "random": {
            "knn": {"final/grid": {"0.01": 80.0, "1.0": 82.0}},
        },
    }
    report = tmp_path / "results.md"
    timings = {
        "pretrain": 60.0,
        "finetune-mae-0.01-seed0": 120.0,
        "linprobe-mae-0.01-seed0": 60.0,
        "feature_probes": 30.0,
    }
    machines = {"pretrain": "GPU X (1 GPU, 16 CPU cores)", "finetune-mae-0.01-seed0": "CPU Y, 2 CPU cores, no GPU",
                "linprobe-mae-0.01-seed0": "CPU Y, 2 CPU cores, no GPU"}  # fmt: skip
    write_report(report, budget, tmp_path / "budget.yaml", results, pixels, feats, [], timings, pre, machines)
    text = report.read_text()
    assert f"| 1% (600) | 80.00 | 70.00 (blr {sweep[1]:g}) | +10.00 | 75.00 | 40.00 | +35.00 |" in text
    assert f"| 100% (60000) | 91.00 | 88.00 (blr {sweep[0]:g}) | +3.00 | 82.00 | 41.00 | +41.00 |" in text
    assert "| 100% (60000) | 84.50 (L2 0.001) | 85.50 |" in text
    assert "is +2.00 / +5.50 points" in text  # fine-tune minus the better pixel classifier
    assert "is -3.00 / -2.50 points" in text  # linear probe minus logistic regression on pixels
    assert "ends at 84.0% against the pixels' 81.0% (+3.0)" in text
    assert "| raw pixels | 78.00 | 84.50 | 73.50 | 85.50 |" in text
    assert "| block5, mean | **79.00** | 86.00 | 70.00 | **84.00** |" in text
    assert "| last block, cls after the final norm | 77.00 | **86.50** | **72.00** | 83.00 |" in text
    grid = "last block, patch tokens after the final norm on a 3x3 grid"
    assert f"| {grid} | 76.00 | 86.00 | 71.50 | 83.50 |" in text
    # the random-init control is shown, never bolded, even where it would be the column's best
    assert f"| random init: {grid} | — | — | 80.00 | 82.00 |" in text
    assert "reach 71.50 / 83.50 at 1% / 100% labels, -2.00 / -2.00 points against the pixels" in text
    assert "and -8.50 / +1.50 against the same read-out of the randomly initialised encoder" in text
    assert "One seed (0) per run." in text
    # each machine with its minutes and what ran there; a run without a record says so
    assert "- Compute time: 4.5 min in all, bf16 autocast:" in text
    assert "  - GPU X (1 GPU, 16 CPU cores): 1.0 min (pretraining)." in text
    assert "  - CPU Y, 2 CPU cores, no GPU: 3.0 min (2 fine-tune / probe runs)." in text
    assert "  - machine not recorded: 0.5 min (the feature probes)." in text
    assert "; 1.0 min on GPU X (1 GPU, 16 CPU cores)." in text


def test_digits_folders_and_report(tmp_path):
    """experiments/digits.py: 1,297 + 500 class-balanced 28 px PNGs, and the table from the runs' last rows."""
    pytest.importorskip("sklearn")
    from PIL import Image

    from experiments.digits import report, write_folders

    assert write_folders(tmp_path / "digits") == {"train": 1297, "test": 500}
    test = sorted((tmp_path / "digits" / "test").glob("*/*.png"))
    assert len(test) == 500 and {p.parent.name for p in test} == {str(c) for c in range(10)}
    assert all(len(list((tmp_path / "digits" / "test" / str(c)).glob("*.png"))) == 50 for c in range(10))
    img = Image.open(test[0])
    assert img.size == (28, 28) and img.mode == "L"
    names = {p.name for p in (tmp_path / "digits" / "train").glob("*/*.png")}
    assert not names & {p.name for p in test}  # disjoint splits
    runs = tmp_path / "runs"
    for name, rows in {
        "digits_continued": [{"step": 50, "knn_top1": 80.0}, {"step": 200, "knn_top1": 91.5}],
        "digits_finetune_continued": [{"step": 78, "top1": 93.25}],
        "digits_linprobe_scratch": [{"step": 78, "top1": 40.0}],
    }.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = report(runs).splitlines()
    assert table[2] == "| Fashion-MNIST demo, continued on digits | 91.5 | 93.2 | - |"
    assert table[3] == "| digits only, from random init | - | - | 40.0 |"
