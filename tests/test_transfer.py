"""Fine-tuning and linear probing: initialisation paths, layer-wise lr decay, frozen encoder, best checkpoint."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mae.config import ConfigError
from mae.finetune import main as finetune_main
from mae.linprobe import main as linprobe_main
from mae.models import create_mae
from mae.models.probe import LinearProbe
from mae.tasks import load_config
from mae.tasks.finetune import classification_loss
from mae.train import checkpoint as ckpt
from mae.train.checkpoint import BEST, best_keeper
from mae.train.optim import vit_layer_decay_groups
from mae.weights.build import build_vit
from mae.weights.load import load_init

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2)
TINY_ARGS = [
    "model.img_size=28",
    "model.patch_size=4",
    "model.in_chans=1",
    "model.embed_dim=32",
    "model.depth=3",
    "model.num_heads=2",
    "data.train=synthetic",
    "data.val=synthetic",
    "data.synthetic_samples=64",
    "data.epoch_samples=0",
    "data.num_workers=0",
    "data.mean=[0.5]",
    "data.std=[0.25]",
    "train.batch_size=16",
    "train.precision=fp32",
    "train.warmup_epochs=0.5",
    "log.every_steps=1",
    "log.progress=false",
    "log.wandb=disabled",
]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
HEAD = {"head.weight", "head.bias"}
FC_NORM = {"fc_norm.weight", "fc_norm.bias"}


def tiny_cfg(recipe="finetune_demo", *extra, task="finetune"):
    return load_config([f"recipe={recipe}", *TINY_ARGS, *extra], task=task)


def encoder_items(sd):
    return {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token", "head", "fc_norm"))}


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(1)
    mae = create_mae(
        "mae_vit_tiny_patch16", decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **TINY
    )
    with torch.no_grad():  # move every weight off its init value, so a skipped key cannot go unnoticed
        for p in mae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return {k: v.clone() for k, v in mae.state_dict().items()}


def write_run(root: Path, sd: dict) -> Path:
    """A pretraining run directory as mae/pretrain.py leaves it: config.yaml, checkpoint-N/, checkpoint-last."""
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: pretrain\n")
    tmp = ckpt.tmp_dir(run, 7)
    tmp.mkdir()
    ckpt.write_main_files(tmp, sd, {"step": 7}, {"step": 7, "epoch": 0, "task": "pretrain"})
    ckpt.commit(tmp, keep=2)
    return run


def init_sources(root: Path, sd: dict) -> dict:
    """Each form model.init accepts, all holding the same encoder."""
    run = write_run(root, sd)
    encoder_only = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": sd}, root / "mae_visualize_tiny.pth")
    torch.save({"model": encoder_only}, root / "mae_pretrain_tiny.pth")
    timm_sd = {**encoder_only, "head.weight": torch.randn(1000, 32), "head.bias": torch.zeros(1000)}
    save_file(timm_sd, str(root / "timm_vit.safetensors"))
    torch.save(timm_sd, root / "timm_vit.pth")
    return {
        "run_dir": run,
        "checkpoint_dir": run / "checkpoint-last",
        "reference_full": root / "mae_visualize_tiny.pth",
        "reference_encoder": root / "mae_pretrain_tiny.pth",
        "timm_safetensors": root / "timm_vit.safetensors",
        "timm_pth": root / "timm_vit.pth",
    }


KINDS = ["run_dir", "checkpoint_dir", "reference_full", "reference_encoder", "timm_safetensors", "timm_pth"]


@pytest.mark.parametrize("global_pool", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_each_init_path_loads_everything_but_the_head(tmp_path, pretrained, kind, global_pool):
    source = init_sources(tmp_path, pretrained)[kind]
    vit = build_vit(tiny_cfg("finetune_demo", f"model.global_pool={str(global_pool).lower()}"), 10)
    missing, unexpected = load_init(vit, str(source), log=lambda *a: None)
    assert set(missing) == (HEAD | FC_NORM if global_pool else HEAD)
    assert unexpected == []
    loaded = vit.state_dict()
    for k, v in encoder_items(pretrained).items():
        if global_pool and k.startswith("norm."):
            continue  # the reference fine-tuning replaces the final norm by fc_norm under global pooling
        assert torch.equal(loaded[k], v), k


def test_init_from_another_image_size_resizes_the_position_table(tmp_path, pretrained):
    source = init_sources(tmp_path, pretrained)["run_dir"]
    vit = build_vit(tiny_cfg("finetune_demo", "model.img_size=32"), 10)  # 7x7 -> 8x8 patches
    missing, unexpected = load_init(vit, str(source), log=lambda *a: None)
    assert set(missing) == HEAD | FC_NORM and unexpected == []
    assert vit.pos_embed.shape == (1, 65, 32)
    assert torch.equal(vit.pos_embed[0, 0], pretrained["pos_embed"][0, 0])  # cls row kept as is
    assert torch.equal(vit.blocks[1].mlp.fc1.weight, pretrained["blocks.1.mlp.fc1.weight"])


@pytest.mark.parametrize("depth", [2, 4])
def test_init_of_another_depth_is_an_error_naming_the_blocks(tmp_path, pretrained, depth):
    source = init_sources(tmp_path, pretrained)["run_dir"]
    vit = build_vit(tiny_cfg("finetune_demo", f"model.depth={depth}"), 10)
    with pytest.raises(
        ConfigError,
        match=rf"model.init=.*: depth \(blocks\) is 3 in the source, {depth} in this model \(set model.depth",
    ):
        load_init(vit, str(source), log=lambda *a: None)


def test_empty_init_is_the_random_baseline():
    vit = build_vit(tiny_cfg(), 10)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    assert load_init(vit, "", log=lambda *a: None) == ([], [])
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_layer_decay_scales_follow_depth():
    cfg = tiny_cfg("finetune_demo", "train.layer_decay=0.5", "train.weight_decay=0.05")
    vit = build_vit(cfg, 10)
    groups = vit_layer_decay_groups(vit, cfg.train.weight_decay, cfg.train.layer_decay)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    wd = {name: g["weight_decay"] for g in groups for name in g["names"]}
    depth = 3
    assert set(scale) == {n for n, _ in vit.named_parameters()}
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert scale[name] == pytest.approx(0.5 ** (depth + 1)), name
    for i in range(depth):
        assert scale[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(0.5 ** (depth - i))
        assert scale[f"blocks.{i}.norm1.bias"] == pytest.approx(0.5 ** (depth - i))
    for name in ("head.weight", "head.bias", "fc_norm.weight"):
        assert scale[name] == 1.0
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["head.weight"] == 0.05
    assert wd["blocks.0.attn.qkv.bias"] == 0.0 and wd["pos_embed"] == 0.0 and wd["cls_token"] == 0.0


def test_loss_without_mixup_is_label_smoothed_cross_entropy():
    cfg = tiny_cfg("finetune_demo", "train.smoothing=0.1", "train.mixup=0.0", "train.cutmix=0.0")
    logits = torch.randn(6, 10)
    labels = torch.arange(6)
    loss = classification_loss(cfg, 10)(lambda x: logits, torch.zeros(6, 1, 28, 28), labels)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(loss, expected)


def test_mixup_mixes_inputs_and_targets():
    cfg = tiny_cfg("finetune_demo", "train.mixup=0.8", "train.cutmix=0.0", "train.smoothing=0.0")
    seen = {}

    def model(x):
        seen["x"] = x.clone()
        return torch.zeros(x.shape[0], 10)

    images = torch.stack([torch.full((1, 28, 28), float(i)) for i in range(5)])  # odd: the last is dropped
    original = images.clone()
    np.random.seed(0)  # timm draws lambda from numpy
    loss = classification_loss(cfg, 10)(model, images, torch.arange(5))
    assert seen["x"].shape[0] == 4
    mixed = seen["x"][:, 0, 0, 0]  # image i blended with image 3 - i: lam * i + (1 - lam) * (3 - i)
    lam = (mixed[0] - 3) / -3
    assert 0.0 < lam < 1.0
    assert torch.allclose(mixed, lam * original[:4, 0, 0, 0] + (1 - lam) * original[:4, 0, 0, 0].flip(0))
    assert loss.item() == pytest.approx(math.log(10), rel=1e-5)  # uniform logits: CE = log K for any target


def test_mixup_needs_an_even_batch():
    with pytest.raises(ConfigError, match="even train.batch_size"):
        classification_loss(tiny_cfg("finetune_demo", "train.mixup=0.8", "train.batch_size=15"), 10)


def test_best_checkpoint_keeps_the_highest_top1_across_restarts(tmp_path):
    cfg = tiny_cfg("finetune_demo", f"output_dir={tmp_path}")
    acc = SimpleNamespace(is_main_process=True)
    vit = build_vit(cfg, 10)
    quiet = lambda *a: None  # noqa: E731
    on_eval = best_keeper(cfg, acc, quiet)
    on_eval(vit, {"top1": 50.0, "top5": 90.0}, 10)
    meta = json.loads((tmp_path / BEST / "meta.json").read_text())
    assert meta["step"] == 10 and meta["top1"] == 50.0
    on_eval(vit, {"top1": 40.0, "top5": 95.0}, 20)
    assert json.loads((tmp_path / BEST / "meta.json").read_text())["step"] == 10
    on_eval = best_keeper(cfg, acc, quiet)  # a resumed run reads the best score back
    on_eval(vit, {"top1": 45.0, "top5": 95.0}, 30)
    assert json.loads((tmp_path / BEST / "meta.json").read_text())["step"] == 10
    on_eval(vit, {"top1": 60.0, "top5": 95.0}, 40)
    assert json.loads((tmp_path / BEST / "meta.json").read_text())["step"] == 40
    assert set(load_file(str(tmp_path / BEST / "model.safetensors"))) == set(vit.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST]  # no temp leftovers


def test_linear_probe_module_keeps_the_encoder_in_eval_mode():
    probe = LinearProbe(build_vit(tiny_cfg("linprobe_demo", task="linprobe"), 10), 10)
    probe.train()
    assert probe.head.training and not probe.encoder.training
    assert not any(m.training for m in probe.encoder.modules())
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    bn = probe.head[0]
    assert bn.weight is None and bn.bias is None and bn.eps == 1e-6


@pytest.mark.parametrize("main, recipe", [(finetune_main, "finetune_demo"), (linprobe_main, "linprobe_demo")])
def test_bad_init_is_a_one_line_error(tmp_path, capsys, main, recipe):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    for bad in (tmp_path / "missing.pth", tmp_path / "notes.pth", tmp_path):
        rc = main([f"recipe={recipe}", *TINY_ARGS, f"model.init={bad}", f"output_dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("error: model.init="), err
        assert not (tmp_path / "out").exists()


def test_linear_probe_trains_the_head_and_leaves_the_encoder_bit_equal(tmp_path, pretrained):
    source = init_sources(tmp_path, pretrained)["run_dir"]
    out = tmp_path / "probe"
    rc = linprobe_main(
        ["recipe=linprobe_demo", *TINY_ARGS, f"model.init={source}", f"output_dir={out}", "train.max_steps=4"]
    )
    assert rc == 0
    after = load_file(str(out / "checkpoint-last" / "model.safetensors"))
    for k, v in encoder_items(pretrained).items():
        assert torch.equal(after[f"encoder.{k}"], v), k
    assert not torch.equal(after["head.0.running_mean"], torch.zeros(32))
    assert after["head.1.weight"].abs().max() > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and 0.0 <= rows[-1]["top1"] <= 100.0
    shutil.rmtree(source)  # a resumed run takes its weights from its own checkpoint, not from model.init
    args = [
        "recipe=linprobe_demo",
        *TINY_ARGS,
        f"model.init={source}",
        f"output_dir={out}",
        "train.max_steps=6",
    ]
    assert linprobe_main(args) == 0
    after = load_file(str(out / "checkpoint-last" / "model.safetensors"))
    assert all(torch.equal(after[f"encoder.{k}"], v) for k, v in encoder_items(pretrained).items())
    assert json.loads((out / "checkpoint-last" / "meta.json").read_text())["step"] == 6


@pytest.mark.slow
def test_finetune_end_to_end_evaluates_each_epoch_and_keeps_the_best(tmp_path, pretrained):
    source = init_sources(tmp_path, pretrained)["run_dir"]
    out = tmp_path / "ft"
    args = [
        "recipe=finetune_demo",
        *TINY_ARGS,
        "model.in_chans=3",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]",
        "data.auto_augment=rand-m9-mstd0.5-inc1",
        "data.reprob=0.25",
        "train.mixup=0.8",
        "train.cutmix=1.0",
        "train.smoothing=0.1",
        "train.epochs=3",
        f"output_dir={out}",
    ]
    notes = []  # a 1-channel checkpoint into a 3-channel model: its filters repeated, scaled by 1/3
    load_init(build_vit(load_config(args, task="finetune"), 10), str(source), log=notes.append)
    assert any("channels: 1 -> 3" in n for n in notes)
    tiny3 = {**TINY, "in_chans": 3}
    torch.manual_seed(2)
    mae3 = create_mae(
        "mae_vit_tiny_patch16", decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **tiny3
    )
    torch.save({"model": mae3.state_dict()}, tmp_path / "rgb.pth")
    args.append(f"model.init={tmp_path / 'rgb.pth'}")
    assert finetune_main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "top1" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0]
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in evals)
    best = json.loads((out / BEST / "meta.json").read_text())
    assert best["top1"] == max(r["top1"] for r in evals)
    weights = load_file(str(out / BEST / "model.safetensors"))
    build_vit(load_config(args, task="finetune"), 10).load_state_dict(weights, strict=True)
    assert finetune_main(args) == 0  # the same command again: already complete, best untouched
    assert json.loads((out / BEST / "meta.json").read_text()) == best


FINETUNE_REFERENCE = {  # facebookresearch/mae FINETUNE.md: (blr, layer_decay, drop_path, epochs, published top-1)
    "finetune_vit_base": (5e-4, 0.65, 0.1, 100.0, "83.6%"),
    "finetune_vit_large": (1e-3, 0.75, 0.2, 50.0, "85.9%"),
    "finetune_vit_huge": (1e-3, 0.75, 0.3, 50.0, "86.9%"),
}


@pytest.mark.parametrize("recipe", sorted(FINETUNE_REFERENCE))
def test_finetune_recipes_carry_the_reference_values(recipe):
    c = load_config([f"recipe={recipe}"], task="finetune")
    blr, layer_decay, drop_path, epochs, top1 = FINETUNE_REFERENCE[recipe]
    assert (c.train.blr, c.train.layer_decay, c.model.drop_path, c.train.epochs) == (
        blr,
        layer_decay,
        drop_path,
        epochs,
    )
    t = c.train
    assert (t.warmup_epochs, t.weight_decay, list(t.betas), t.min_lr) == (5.0, 0.05, [0.9, 0.999], 1e-6)
    assert (t.mixup, t.cutmix, t.smoothing, t.optimizer) == (0.8, 1.0, 0.1, "adamw")
    assert (c.data.reprob, c.data.auto_augment, c.model.global_pool) == (0.25, "rand-m9-mstd0.5-inc1", True)
    assert c.data.scale_min == 0.08
    header = (RECIPES / f"{recipe}.yaml").read_text().split("\nmodel:")[0]
    assert top1 in header and f"recipe={recipe}" in header


def test_linprobe_recipe_carries_the_reference_values():
    c = load_config(["recipe=linprobe_vit_base"], task="linprobe")
    t = c.train
    assert (t.optimizer, t.blr, t.weight_decay, t.epochs, t.warmup_epochs) == ("lars", 0.1, 0.0, 90.0, 10.0)
    assert t.batch_size * 32 == 16384 and c.model.global_pool is False and c.model.drop_path == 0.0
    header = (RECIPES / "linprobe_vit_base.yaml").read_text().split("\nmodel:")[0]
    assert "68.0%" in header and "75.8%" in header and "32 x A100" in header


def reference_kept_head_keys(checkpoint_model: dict, state_dict: dict) -> set:
    """The reference fine-tuning's head filter (main_finetune.py), transcribed: a head key of the checkpoint
    is removed only when its shape differs from the model's."""
    kept = dict(checkpoint_model)
    for k in ["head.weight", "head.bias"]:
        if k in kept and kept[k].shape != state_dict[k].shape:
            del kept[k]
    return {k for k in kept if k.startswith("head.")}


@pytest.mark.parametrize("classes", [10, 1000])
def test_finetune_from_a_classifier_keeps_its_head_when_the_shape_matches(tmp_path, pretrained, classes):
    encoder = {k: v for k, v in pretrained.items() if not k.startswith(("decoder", "mask_token"))}
    head = {"head.weight": torch.randn(classes, 32), "head.bias": torch.randn(classes)}
    torch.save({"model": {**encoder, **head}}, tmp_path / "classifier.pth")
    vit = build_vit(tiny_cfg(), 10)
    lines = []
    missing, _ = load_init(vit, str(tmp_path / "classifier.pth"), log=lines.append)
    kept = reference_kept_head_keys(head, vit.state_dict())
    assert HEAD - set(missing) == kept == (HEAD if classes == 10 else set())
    assert all(torch.equal(vit.state_dict()[k], head[k]) for k in kept)
    assert any("classifier head kept" in line for line in lines) == bool(kept)
    probe_vit = build_vit(tiny_cfg("linprobe_demo", task="linprobe"), 10)
    assert HEAD <= set(
        load_init(probe_vit, str(tmp_path / "classifier.pth"), lambda *a: None, keep_head=False)[0]
    )


def reference_eval_resize(input_size: int) -> int:
    """The reference's eval resize (util/datasets.py build_transform), transcribed: crop_pct 224/256 up to
    224 px, 1.0 above."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return int(input_size / crop_pct)


@pytest.mark.parametrize("img_size", [112, 224, 384, 448])
def test_eval_resize_follows_the_reference_above_224_px(img_size):
    from torchvision.transforms import CenterCrop, Resize

    from mae.data import build_transform

    cfg = tiny_cfg("finetune_vit_base", task="finetune").data
    assert cfg.crop_pct == 0  # the recipes leave it to the reference's rule
    steps = build_transform(cfg, "none", img_size, 3).transforms
    resize, crop = (next(t for t in steps if isinstance(t, kind)) for kind in (Resize, CenterCrop))
    assert (resize.size, crop.size) == (reference_eval_resize(img_size), (img_size, img_size))


def _groups(out: Path) -> list[dict]:
    return torch.load(out / "checkpoint-last" / "state.pt", weights_only=True)["optimizer"]["param_groups"]


def test_resume_applies_changed_optimizer_settings_and_says_so(tmp_path, capsys):
    """Re-running with another weight decay, betas or layer decay (even switching layer decay off, which
    regroups the parameters) resumes the moments and uses the new values, as config.yaml then records."""
    out = tmp_path / "ft"
    args = ["recipe=finetune_demo", *TINY_ARGS, f"output_dir={out}", "data.val=", "checkpoint.every_steps=2"]
    assert finetune_main([*args, "train.max_steps=2"]) == 0
    before = _groups(out)
    assert {g["lr_scale"] for g in before} > {1.0} and {g["weight_decay"] for g in before} == {0.0, 0.05}
    moments = torch.load(out / "checkpoint-last" / "state.pt", weights_only=True)["optimizer"]["state"]
    changed = [
        "train.max_steps=4",
        "train.layer_decay=1.0",
        "train.weight_decay=0.1",
        "train.betas=[0.8,0.99]",
    ]
    assert finetune_main([*args, *changed, "checkpoint.every_steps=100", "train.lr=1e-30"]) == 0
    log = capsys.readouterr().out
    for key in ("train.weight_decay", "train.betas", "train.layer_decay"):
        assert f"{key} changed since the checkpoint" in log, key
    after = _groups(out)
    assert {g["lr_scale"] for g in after} == {1.0} and {g["weight_decay"] for g in after} == {0.0, 0.1}
    assert {tuple(g["betas"]) for g in after} == {(0.8, 0.99)}
    state = torch.load(out / "checkpoint-last" / "state.pt", weights_only=True)["optimizer"]["state"]
    assert all(state[n]["step"] == moments[n]["step"] + 2 for n in moments)  # the moments carried on
    recorded = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (recorded["layer_decay"], recorded["weight_decay"], recorded["betas"]) == (1.0, 0.1, [0.8, 0.99])


def test_resume_with_another_optimizer_is_refused(tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["recipe=finetune_demo", *TINY_ARGS, f"output_dir={out}", "data.val="]
    assert finetune_main([*args, "train.max_steps=2"]) == 0
    capsys.readouterr()
    assert finetune_main([*args, "train.max_steps=4", "train.optimizer=lars", "train.betas=[0.9,0.999]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.betas is not read with train.optimizer=lars" in err
    assert finetune_main([*args, "train.max_steps=4", "train.optimizer=lars"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the checkpoint holds adamw's state" in err


# ---- every classifier initialises every task -------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_sources(tmp_path_factory, pretrained):
    """The classifiers users bring, each as the command or library writes it: this toolkit's fine-tune and
    linear-probe runs (2 steps from `pretrained`), the reference's mae_finetuned_vit_*.pth layout (fc_norm and
    head, no final norm) and a timm fine-tuned export (timm's save_for_hf: fc_norm and head)."""
    import timm
    from timm.models._hub import save_for_hf

    root = tmp_path_factory.mktemp("classifiers")
    start = init_sources(root, pretrained)["run_dir"]
    for name, main, recipe in (
        ("finetune", finetune_main, "finetune_demo"),
        ("linprobe", linprobe_main, "linprobe_demo"),
    ):
        args = [f"recipe={recipe}", *TINY_ARGS, f"model.init={start}", f"output_dir={root / name}"]
        assert main([*args, "train.max_steps=2", "data.val="]) == 0
    vit = build_vit(tiny_cfg(), 10)
    load_init(vit, str(start), log=lambda *a: None)
    torch.save({"model": vit.state_dict(), "epoch": 99}, root / "mae_finetuned_vit_tiny.pth")
    model_args = dict(TINY, global_pool="avg", fc_norm=True)
    tv = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **model_args)
    tv.load_state_dict(vit.state_dict())
    save_for_hf(tv, str(root / "timm_finetuned"), safe_serialization=True)
    return {
        "finetune run": (root / "finetune", {"fc_norm", "head"}),
        "linprobe run": (root / "linprobe", {"norm", "head"}),
        "reference mae_finetuned .pth": (root / "mae_finetuned_vit_tiny.pth", {"fc_norm", "head"}),
        "timm fine-tuned export": (root / "timm_finetuned", {"fc_norm", "head"}),
    }


def _encoder_of(source) -> dict:
    from mae.weights.formats import load_state_dict_any

    return {k: v for k, v in load_state_dict_any(source).items() if k.startswith(("blocks.", "patch_embed."))}


def _dropped(lines: list[str]) -> set[str]:
    """The modules named by the one `dropped from the source` line among `lines`."""
    found = [line for line in lines if "dropped from the source" in line]
    assert len(found) == 1, lines
    return {item.split(" (")[0] for item in found[0].split("): ", 1)[1].split(", ")}


@pytest.mark.parametrize(
    "kind", ["finetune run", "linprobe run", "reference mae_finetuned .pth", "timm fine-tuned export"]
)
def test_every_classifier_initialises_segmentation_detection_embeddings_pretraining_and_another_classifier(
    classifier_sources, kind
):
    """What the target has no place for (a classifier's head and norms, a probe's head, the class token of a
    detection backbone) is dropped and named in one line, whatever the target; the encoder's blocks load exactly,
    into another image size too."""
    from mae.embed import Embedder
    from mae.weights.build import build_detector, build_segmenter

    source, parts = classifier_sources[kind]
    encoder_args = [a for a in TINY_ARGS if not a.startswith(("data.", "model.img_size"))]
    seg_cfg = load_config(
        ["recipe=segment_demo", *encoder_args, "model.img_size=56", "model.seg_channels=8"], task="segment"
    )
    det_cfg = load_config(
        ["recipe=detect_demo", *encoder_args, "model.img_size=56", "model.fpn_channels=8"], task="detect"
    )
    targets = {  # the model, the source's parts it has a place for, and what it drops besides the source's
        "segmentation at 56 px": (build_segmenter(seg_cfg, 11), set(), set()),
        "detection at 56 px": (build_detector(det_cfg, 3), set(), {"cls_token"}),
        "pretraining": (
            create_mae(
                "mae_vit_tiny_patch16", decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **TINY
            ),
            {"norm"},
            set(),
        ),
        "a classifier of 7 classes": (build_vit(tiny_cfg(), 7), {"fc_norm"}, set()),
    }
    encoder = _encoder_of(source)
    for what, (model, uses, besides) in targets.items():
        lines = []
        load_init(model, str(source), log=lines.append)
        assert _dropped(lines) == (parts - uses) | besides, what
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in encoder.items()), what
    notes = []
    embedder = Embedder.from_pretrained(source, num_heads=2, log=notes.append)
    assert _dropped(notes) == {"head"}
    assert all(torch.equal(embedder.model.state_dict()[k], v) for k, v in encoder.items())


# ---- the position table for a new patch grid --------------------------------------------------------------


def reference_interpolate_pos_embed(table: torch.Tensor, grid: int) -> torch.Tensor:
    """facebookresearch/mae util/pos_embed.py interpolate_pos_embed, transcribed: the cls row kept, the patch
    rows bicubically resized (align_corners=False) to grid x grid."""
    cls, rows = table[:, :1], table[:, 1:]
    old = int(rows.shape[1] ** 0.5)
    rows = rows.reshape(-1, old, old, rows.shape[-1]).permute(0, 3, 1, 2)
    rows = torch.nn.functional.interpolate(rows, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, rows.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("mode", ["recompute", "resample"])
def test_pos_embed_adapt_recomputes_or_resamples_a_sincos_table_for_a_new_grid(tmp_path, mode):
    """An MAE encoder pretrained at 28 px (7x7 patches, the fixed sin-cos table) segmenting at 56 px (14x14):
    `recompute` evaluates the sin-cos table on the 14x14 grid, `resample` resizes the 7x7 table bicubically as
    the reference's interpolate_pos_embed; the cls row is kept either way, and the log says which."""
    from mae.models import sincos_pos_embed_2d
    from mae.weights.build import build_segmenter
    from mae.weights.load import init_from_config

    torch.manual_seed(0)
    mae = create_mae(
        "mae_vit_tiny_patch16", decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **TINY
    )
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pth")
    args = ["recipe=segment_demo", *[a for a in TINY_ARGS if not a.startswith(("data.", "model.img_size"))]]
    args += ["model.img_size=56", f"model.init={tmp_path / 'mae.pth'}", f"model.pos_embed_adapt={mode}"]
    cfg = load_config([*args, f"output_dir={tmp_path / 'run'}"], task="segment")
    seg, lines = build_segmenter(cfg, 11), []
    init_from_config(seg, cfg, lines.append)  # what every task's init_weights does on a fresh start
    table = seg.pos_embed.detach()
    source = mae.pos_embed.detach()
    assert torch.equal(table[:, 0], source[:, 0])
    if mode == "recompute":
        torch.testing.assert_close(table[0, 1:], sincos_pos_embed_2d(32, (14, 14), cls_token=False))
        assert any("pos_embed 7x7 -> 14x14 patches, recomputed (the fixed sin-cos table)" in x for x in lines)
    else:
        torch.testing.assert_close(table, reference_interpolate_pos_embed(source, 14), rtol=0, atol=1e-5)
        assert any(
            "pos_embed 7x7 -> 14x14 patches, resampled (bicubic, as the reference's interpolate_pos_embed)"
            in x
            for x in lines
        )


@pytest.mark.parametrize("task", ["pretrain", "finetune", "linprobe", "segment", "detect"])
def test_pos_embed_adapt_is_read_by_every_task_that_loads_model_init(task):
    from mae.tasks import READS

    assert {"model.init", "model.pos_embed_adapt"} <= READS[task]


def test_pos_embed_adapt_is_a_choice_read_only_with_model_init():
    with pytest.raises(
        ConfigError, match=r"model.pos_embed_adapt='bilinear' is not one of recompute, resample"
    ):
        tiny_cfg("finetune_demo", "model.init=runs/x", "model.pos_embed_adapt=bilinear")
    with pytest.raises(ConfigError, match=r"model.pos_embed_adapt is not read with model.init empty"):
        tiny_cfg("finetune_demo", "model.pos_embed_adapt=resample")
    assert tiny_cfg("finetune_demo", "model.init=runs/x").model.pos_embed_adapt == "recompute"
