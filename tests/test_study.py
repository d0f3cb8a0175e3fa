"""The Fashion-MNIST study (experiments/fashion_mnist.py): its budget file is valid for the recipes it names,
and every fine-tune / probe run gets the same budget whatever its label fraction or initialisation."""

from pathlib import Path

import yaml
from conftest import needs_fmnist

from experiments.fashion_mnist import run_overrides
from mae.config import derive, load_config
from mae.data import build_train_loader

ROOT = Path(__file__).resolve().parents[1]
BUDGET = yaml.safe_load((ROOT / "experiments" / "fashion_mnist.yaml").read_text())


def _argv(recipe: str, overrides: dict, out: Path) -> list[str]:
    return [f"recipe={recipe}", f"output_dir={out}"] + [f"{k}={v}" for k, v in overrides.items()]


def test_pretraining_overrides_are_valid(tmp_path):
    cfg = load_config(_argv(BUDGET["pretrain"]["recipe"], BUDGET["pretrain"]["overrides"], tmp_path))
    assert cfg.data.train == "fashion-mnist"


@needs_fmnist
def test_every_run_processes_the_same_number_of_images(tmp_path):
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
        assert len(set(budgets.values())) == 1, budgets
        assert abs(next(iter(budgets.values())) - spec["samples_seen"]) < batch


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
