"""Semantic segmentation: the UPerNet / linear heads, sliding-window inference, mIoU, image / mask data with its
bad pairs, and the entry point end to end (train, evaluate, keep the best, resume, predict)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import needs_fmnist, rows
from PIL import Image
from torch import nn

from mae.config import ConfigError
from mae.data import DataError
from mae.data.segmentation import (
    BadPair,
    SegEvalLoader,
    SegTrainLoader,
    SegTransform,
    pair_source,
    reduce_zero,
    scan_num_classes,
)
from mae.eval.metrics import confusion_matrix, segmentation_scores
from mae.models.segmentation import (
    SegmentationViT,
    UPerHead,
    default_blocks,
    slide_inference,
    whole_inference,
)
from mae.segment import main as segment_main
from mae.segment_predict import main as predict_main
from mae.tasks import load_config

TINY_SEG = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=4, num_heads=2)


# ------------------------------------------------------------------------------------------------ the model


def test_default_blocks_are_the_papers():
    assert default_blocks(12) == [4, 6, 8, 12] and default_blocks(24) == [8, 12, 16, 24]
    assert default_blocks(6) == [2, 3, 4, 6]


def test_uperhead_equals_transformers_upernet_with_the_same_weights():
    """Our UPerNet decoder computes what transformers' UperNetHead (a port of mmsegmentation's UPerHead) does."""
    from transformers import UperNetConfig
    from transformers.models.upernet.modeling_upernet import UperNetHead

    torch.manual_seed(0)
    ours = UPerHead(24, 16, 5).eval()
    theirs = UperNetHead(
        UperNetConfig(hidden_size=16, num_labels=5, pool_scales=[1, 2, 3, 6]), [24] * 4
    ).eval()
    for m in (*ours.modules(), *theirs.modules()):
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    mine = {k: v for k, v in ours.state_dict().items() if not k.startswith("conv_seg")}
    other = {k: v for k, v in theirs.state_dict().items() if not k.startswith("classifier")}
    assert [v.shape for v in mine.values()] == [v.shape for v in other.values()]
    theirs.load_state_dict(
        {
            **dict(zip(other, mine.values())),
            "classifier.weight": ours.conv_seg.weight,
            "classifier.bias": ours.conv_seg.bias,
        }
    )
    feats = [torch.randn(2, 24, s, s) for s in (16, 8, 4, 2)]
    torch.testing.assert_close(ours(feats), theirs(feats), rtol=1e-5, atol=1e-5)


def test_upernet_and_linear_logits_come_at_the_input_size_and_a_frozen_encoder_stays_put():
    torch.manual_seed(0)
    up = SegmentationViT(7, head="upernet", channels=16, **TINY_SEG)
    logits, aux = up(torch.randn(2, 3, 32, 32))
    assert logits.shape == aux.shape == (2, 7, 32, 32)
    assert up.eval()(torch.randn(1, 3, 48, 40)).shape == (1, 7, 48, 40)  # another grid: table resampled
    lin = SegmentationViT(7, head="linear", freeze_encoder=True, **TINY_SEG).train()
    assert not lin.blocks.training and lin.decode_head.training
    before = {k: v.clone() for k, v in lin.state_dict().items() if k.startswith("blocks.")}
    opt = torch.optim.SGD([p for p in lin.parameters() if p.requires_grad], lr=1.0)
    lin(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(torch.equal(v, lin.state_dict()[k]) for k, v in before.items())
    assert lin.decode_head.conv_seg.weight.grad is not None


class _Pixelwise(nn.Module):
    """A translation-equivariant stand-in model: a 1x1 convolution, so every window agrees on a pixel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_slide_inference_averages_overlapping_windows_and_cuts_the_padding():
    torch.manual_seed(0)
    model, img = _Pixelwise(), torch.randn(1, 3, 50, 37)
    torch.testing.assert_close(slide_inference(model, img, crop=16, stride=10), model(img))
    small = torch.randn(1, 3, 9, 12)  # smaller than a window: padded, then cut back
    torch.testing.assert_close(slide_inference(model, small, crop=16, stride=10), model(small))
    seen = []
    counter = _Pixelwise()
    counter.forward = lambda x: (seen.append(tuple(x.shape[2:])), torch.zeros(x.shape[0], 4, *x.shape[2:]))[1]
    slide_inference(counter, img, crop=16, stride=10)
    # mmsegmentation's grid: ceil((50 - 16) / 10) + 1 = 5 rows, ceil((37 - 16) / 10) + 1 = 4 columns
    assert len(seen) == 5 * 4 and set(seen) == {(16, 16)}
    seg = SegmentationViT(3, head="linear", **TINY_SEG).eval()
    assert whole_inference(seg, torch.randn(1, 3, 30, 45)).shape == (1, 3, 30, 45)


# ------------------------------------------------------------------------------------------------ metrics


def test_miou_macc_aacc_follow_mmsegmentation():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [3, 2, 0, 3]])
    conf = confusion_matrix(pred, target, 4)
    assert conf.sum() == 6  # the ignored pixels are out
    s = segmentation_scores(conf)
    # IoU: class 0 1/2, class 1 2/3, class 2 1/2, class 3 (only predicted) 0; acc: 1/2, 1, 1/2, none
    assert s["iou"] == [50.0, pytest.approx(66.6667, abs=1e-3), 50.0, 0.0]
    assert s["miou"] == pytest.approx(100 * (0.5 + 2 / 3 + 0.5 + 0) / 4)
    assert s["acc"][3] is None and s["macc"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    assert s["aacc"] == pytest.approx(100 * 4 / 6)
    absent = segmentation_scores(confusion_matrix(pred[:1], target[:1], 5))
    assert absent["iou"][4] is None  # never in the truth nor predicted: out of the mean
    assert absent["miou"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)


# ------------------------------------------------------------------------------------------------ data


def write_pairs(root, sizes, num_classes=4, ext="png", masks_dir="masks", images_dir="images", seed=0):
    """Images (RGB) and masks (class ids, some 255) named 000, 001, ... of the given (w, h) sizes."""
    rng = np.random.default_rng(seed)
    (root / images_dir).mkdir(parents=True, exist_ok=True)
    (root / masks_dir).mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        mask = np.zeros((h, w), np.uint8)
        for c in range(num_classes):  # vertical bands of classes, so crops see several
            mask[:, c * w // num_classes :] = c
        mask[: h // 8] = 255
        img = np.stack([mask * 40, 255 - mask * 40, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        Image.fromarray(img).save(root / images_dir / f"{i:03d}.{ext}")
        Image.fromarray(mask).save(root / masks_dir / f"{i:03d}.png")


def test_a_folder_pairs_by_stem_and_names_images_without_a_mask(tmp_path):
    write_pairs(tmp_path, [(20, 16)] * 3)
    Image.new("RGB", (20, 16)).save(tmp_path / "images" / "lonely.png")
    notes = []
    src = pair_source(str(tmp_path), train=True, reduce_zero_label=False, log_fn=notes.append)
    assert (
        len(src) == 3
        and len(notes) == 1
        and "lonely.png" in notes[0]
        and "1 image(s) without a mask" in notes[0]
    )
    img, mask = src.load(0, 3)
    assert img.shape == (3, 16, 20) and mask.shape == (16, 20) and img.max() <= 1
    assert scan_num_classes(src, log_fn=notes.append) == 4


def test_the_ade20k_release_reads_training_for_train_and_validation_for_val(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_pairs(root, [(24, 20)] * 2, images_dir="images/training", masks_dir="annotations/training")
    write_pairs(root, [(30, 20)] * 3, images_dir="images/validation", masks_dir="annotations/validation")
    assert len(pair_source(str(root), train=True, reduce_zero_label=True)) == 2
    val = pair_source(str(root), train=False, reduce_zero_label=True)
    assert len(val) == 3 and val.layout == "ADE20K validation"
    assert len(pair_source(str(root / "images" / "training"), train=False, reduce_zero_label=True)) == 2
    _, mask = val.load(0, 3)
    raw = np.asarray(Image.open(root / "annotations" / "validation" / "000.png"))
    assert np.array_equal(mask, reduce_zero(raw))
    assert reduce_zero(np.array([0, 1, 150, 255], np.uint8)).tolist() == [255, 0, 149, 255]


def test_bad_pairs_are_named_skipped_and_counted_never_zeros(tmp_path, caplog):
    write_pairs(tmp_path, [(32, 32)] * 6)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "masks" / "001.png")  # another size
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(tmp_path / "masks" / "002.png")  # class 9 >= 4
    Image.new("RGB", (32, 32)).save(tmp_path / "masks" / "003.png")  # not single-channel
    (tmp_path / "images" / "004.png").write_bytes(b"not an image")
    src = pair_source(str(tmp_path), train=True, reduce_zero_label=False)
    t = SegTransform(crop=32, mean=[0.5] * 3, std=[0.25] * 3)
    loader = SegTrainLoader(
        src, t, in_chans=3, num_classes=4, batch_size=6, seed=0, rank=0, world_size=1, workers=0
    )
    images, masks, n_bad = next(loader.iterate(0))
    assert n_bad == 4 and images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    log = caplog.text
    assert "001.png: mask is 10x10, its image" in log and "class id 9 >= model.num_classes=4" in log
    assert "single-channel PNG" in log and "004.png" in log
    with pytest.raises(BadPair, match="mask is 10x10"):
        src.load(1, 3)


@needs_fmnist
def test_fashion_mnist_scenes_are_deterministic_with_garment_classes_and_ambiguous_edges():
    src = pair_source("fashion-mnist-scenes", train=True, reduce_zero_label=False)
    assert (
        len(src) == 20000
        and len(pair_source("fashion-mnist-scenes:test", train=True, reduce_zero_label=False)) == 2000
    )
    (c1, m1), (c2, m2) = src.draw(7), src.draw(7)
    assert np.array_equal(c1, c2) and np.array_equal(m1, m2) and c1.shape == (56, 56)
    ids = set(np.unique(m1).tolist())
    assert 0 in ids and 255 in ids and ids - {0, 255} and max(ids - {255}) <= 10
    assert (c1[m1 == 0] == 0).all() and (c1[(m1 > 0) & (m1 < 255)] >= 64).all()
    img, mask = src.load(7, 3)
    assert img.shape == (3, 56, 56) and torch.equal(img[0], img[2])
    assert src.classes[0] == "background" and len(src.classes) == 11


@needs_fmnist
def test_a_range_of_scenes_is_those_scenes_alone_for_held_out_and_labelled_subsets():
    """`fashion-mnist-scenes:train[a:b]` holds scenes a .. b-1 of the split, each the very scene the whole split
    draws, so a held-out part and a labelled subset never share a scene; a bad range is one line. The detection
    instances read their scenes the same way."""
    from mae.data.detection import det_source

    whole = pair_source("fashion-mnist-scenes", train=True, reduce_zero_label=False)
    held_out = pair_source("fashion-mnist-scenes:train[19000:20000]", train=False, reduce_zero_label=False)
    labelled = pair_source("fashion-mnist-scenes:train[:200]", train=True, reduce_zero_label=False)
    assert (len(held_out), len(labelled)) == (1000, 200) and held_out.classes == whole.classes
    assert held_out.name(0) == whole.name(19000) and labelled.name(199) == whole.name(199)
    for part, offset in ((held_out, 19000), (labelled, 0)):
        for i in (0, len(part) - 1):
            assert all(np.array_equal(a, b) for a, b in zip(part.draw(i), whole.draw(offset + i)))
    t = SegTransform(crop=56, mean=[0.3], std=[0.3])
    loader = SegTrainLoader(labelled, t, in_chans=1, num_classes=11, batch_size=8, seed=0, rank=0, world_size=1,
                            workers=0, epoch_samples=400)  # fmt: skip
    assert len(loader) == 50  # 400 samples per epoch from 200 scenes: each scene twice
    for bad in ("train[5:5]", "train[0:20001]", "train[a:b]", "train[3]", "val[0:10]"):
        with pytest.raises(DataError, match=r"fashion-mnist-scenes"):
            pair_source(f"fashion-mnist-scenes:{bad}", train=True, reduce_zero_label=False)
    instances = det_source("fashion-mnist-instances:train[19000:19010]", train=False, log_fn=lambda *a: None)
    everything = det_source("fashion-mnist-instances", train=True, log_fn=lambda *a: None)
    assert len(instances) == 10 and instances.name(3) == everything.name(19003)
    assert np.array_equal(instances.draw(3)[0], everything.draw(19003)[0])


def test_joint_transforms_keep_image_and_mask_aligned():
    """An image that encodes its mask: after crop, flip, pad (and a 2x resize) the two still agree."""
    mask = np.repeat(np.repeat(np.arange(12, dtype=np.uint8).reshape(3, 4), 10, 0), 10, 1)  # 30x40 blocks
    img = torch.from_numpy(mask).float().div(255)[None]
    t = SegTransform(crop=24, mean=[0.0], std=[1.0], hflip=True, train=True)
    for seed in range(20):
        x, m = t(img, mask, seed)
        assert x.shape == (1, 24, 24) and m.shape == (24, 24)
        assert torch.equal((x[0] * 255).round().long(), m)
    big = SegTransform(crop=64, mean=[0.0], std=[1.0], ratio_range=(2.0, 2.0), hflip=True, train=True)
    for seed in range(5):
        x, m = big(img, mask, seed)
        labelled = m != 255
        agree = ((x[0] * 255).round().long() == m) & labelled
        assert agree.sum() >= 0.8 * labelled.sum()  # bilinear image vs nearest mask: all but block edges
        assert (m[~labelled] == 255).all() and (x[0][~labelled] == 0).all()  # the pad: ignore / the mean


def test_crops_avoid_a_class_filling_more_than_cat_max_ratio():
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 48:] = 1  # class 0 fills 3/4 of the image
    img = torch.zeros(1, 64, 64)
    strict = SegTransform(crop=32, mean=[0.0], std=[1.0], cat_max_ratio=0.75, train=True)
    loose = SegTransform(crop=32, mean=[0.0], std=[1.0], cat_max_ratio=1.0, train=True)
    mixed = [len(torch.unique(strict(img, mask, s)[1])) > 1 for s in range(40)]
    plain = [len(torch.unique(loose(img, mask, s)[1])) > 1 for s in range(40)]
    assert sum(mixed) > sum(plain) and sum(mixed) >= 36


def test_evaluation_ranks_share_the_pairs_without_counting_one_twice(tmp_path):
    write_pairs(tmp_path, [(16, 16)] * 7)
    src = pair_source(str(tmp_path), train=False, reduce_zero_label=False)
    t = SegTransform(crop=16, mean=[0.5] * 3, std=[0.25] * 3, train=False)
    names = []
    for rank in range(3):
        loader = SegEvalLoader(
            src, t, in_chans=3, num_classes=4, batch_size=2, rank=rank, world_size=3, workers=0
        )
        names += [name for items, _ in loader for _, _, name in items]
    assert sorted(names) == sorted(src.name(i) for i in range(7))


# ------------------------------------------------------------------------------------------------ config


def test_segment_refuses_keys_it_does_not_read_and_upernet_keys_under_the_linear_head():
    with pytest.raises(ConfigError, match=r"model.mask_ratio is not read by segment"):
        load_config(["recipe=segment_demo", "model.mask_ratio=0.5"], task="segment")
    with pytest.raises(ConfigError, match=r"data.scale_min is not read by segment"):
        load_config(["recipe=segment_demo", "data.scale_min=0.5"], task="segment")
    with pytest.raises(ConfigError, match=r"model.seg_channels is not read with model.seg_head=linear"):
        load_config(["recipe=segment_demo", "model.seg_head=linear", "model.seg_channels=64"], task="segment")
    with pytest.raises(ConfigError, match=r"train.eval_stride is not read with train.eval_mode=whole"):
        load_config(["recipe=segment_demo", "train.eval_stride=20"], task="segment")
    notes = []
    load_config(["recipe=segment_demo", "model.seg_head=linear"], task="segment", log=notes.append)
    assert len(notes) == 1 and "model.seg_channels (recipe segment_demo.yaml) is UPerNet's" in notes[0]


def test_poly_schedule_decays_linearly_after_the_warmup():
    from mae.train.optim import lr_at

    assert lr_at(5, 110, 10, 1.0, schedule="poly") == 0.5
    assert lr_at(10, 110, 10, 1.0, schedule="poly") == 1.0
    assert lr_at(60, 110, 10, 1.0, schedule="poly") == pytest.approx(0.5)
    assert lr_at(110, 110, 10, 1.0, 0.1, schedule="poly") == pytest.approx(0.1)


@pytest.mark.parametrize("recipe", ["segment_ade20k_vit_base", "segment_ade20k_vit_large"])
def test_ade20k_recipes_carry_the_reproduced_settings(recipe):
    cfg = load_config([f"recipe={recipe}"], task="segment")
    t, m, d = cfg.train, cfg.model, cfg.data
    assert (t.max_steps, t.warmup_steps, t.schedule, t.min_lr, t.weight_decay, list(t.betas)) == (
        160000, 1500, "poly", 0.0, 0.05, [0.9, 0.999],
    )  # fmt: skip
    assert t.blr * 16 / 256 == pytest.approx(1e-4) and t.batch_size == 2  # lr 1e-4 at 8 GPUs x 2
    assert (t.eval_mode, t.eval_stride, m.img_size, m.aux_weight, m.num_classes) == (
        "slide",
        341,
        512,
        0.4,
        150,
    )
    assert (list(d.resize), list(d.ratio_range), d.cat_max_ratio, d.reduce_zero_label) == (
        [2048, 512],
        [0.5, 2.0],
        0.75,
        True,
    )
    base = recipe.endswith("base")
    assert (t.layer_decay, m.drop_path, m.seg_channels) == ((0.65, 0.1, 768) if base else (0.75, 0.2, 1024))
    assert m.pos_embed_adapt == "resample"  # mmsegmentation's MAE backbone resizes the 224 px table, bicubic


# ------------------------------------------------------------------------------------------------ end to end


def tiny_seg_args(out, **extra) -> list[str]:
    args = {
        "recipe": "segment_demo",
        "output_dir": str(out),
        "model.img_size": "56",
        "model.patch_size": "8",
        "model.depth": "2",
        "model.embed_dim": "32",
        "model.num_heads": "2",
        "model.seg_channels": "8",
        "data.epoch_samples": "32",
        "data.num_workers": "0",
        "train.batch_size": "8",
        "train.precision": "fp32",
        "log.every_steps": "1",
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def test_a_source_with_no_good_pair_is_one_line_exit_2(tmp_path, capsys):
    write_pairs(tmp_path / "data", [(32, 32)] * 3)
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "data" / "masks" / f"{i:03d}.png")
    args = tiny_seg_args(
        tmp_path / "run", **{"data.train": str(tmp_path / "data"), "data.val": "", "model.in_chans": "3"}
    )
    assert segment_main(args + ["data.mean=[0.5]", "data.std=[0.25]", "model.num_classes=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "none of its first pairs is usable" in err[0] and "000.png: mask is 8x8" in err[0]
    )
    assert not (tmp_path / "run" / "checkpoint-last").exists()


@needs_fmnist
@pytest.mark.slow
def test_segment_demo_trains_evaluates_keeps_the_best_resumes_and_predicts(tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_seg_args(out, **{"data.val": "fashion-mnist-scenes:test", "train.max_steps": "4"})
    assert segment_main(args) == 0
    evals = [r for r in rows(out) if "miou" in r]
    assert len(evals) == 1 and all(0 <= evals[0][k] <= 100 for k in ("miou", "macc", "aacc"))
    report = json.loads((out / "eval.json").read_text())
    assert report["pairs"] == 2000 and report["miou"] == evals[0]["miou"]
    assert list(report["per_class"]) == ["background", "T-shirt/top", *list(report["per_class"])[2:]]
    meta = json.loads((out / "checkpoint-best" / "meta.json").read_text())
    assert meta["miou"] == evals[0]["miou"] and meta["task"] == "segment"

    longer = tiny_seg_args(out, **{"data.val": "fashion-mnist-scenes:test", "train.max_steps": "6"})
    assert segment_main(longer) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in rows(out) if "loss" in r][-1] == 6

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    src = pair_source("fashion-mnist-scenes:test", train=False, reduce_zero_label=False)
    for i in range(2):
        Image.fromarray(src.draw(i)[0]).save(scenes / f"s{i}.png")
    Image.fromarray(np.zeros((70, 45), np.uint8)).save(scenes / "other_size.png")
    (scenes / "broken.png").write_bytes(b"oops")
    assert predict_main([str(out), str(scenes), str(tmp_path / "pred")]) == 0
    captured = capsys.readouterr()
    assert (
        "3 image(s) segmented" in captured.out
        and "1 unreadable" in captured.out
        and "broken.png" in captured.err
    )
    pred = Image.open(tmp_path / "pred" / "other_size.png")
    assert pred.mode == "L" and pred.size == (45, 70) and np.asarray(pred).max() < 11
    assert Image.open(tmp_path / "pred" / "s0_overlay.png").mode == "RGB"
    assert predict_main([str(tmp_path / "nowhere"), str(scenes), str(tmp_path / "p2")]) == 2


@needs_fmnist
@pytest.mark.slow
def test_model_init_from_a_pretraining_run_adapts_the_image_size_and_loads_the_encoder(tmp_path, capsys):
    from conftest import TINY_FMNIST
    from safetensors.torch import load_file

    from mae.pretrain import main as pretrain_main

    pre = tmp_path / "pre"
    assert pretrain_main(TINY_FMNIST + [f"output_dir={pre}", "train.max_steps=2", "data.val="]) == 0
    out = tmp_path / "seg"
    args = tiny_seg_args(out, **{"data.val": "", "train.max_steps": "1", "model.init": str(pre),
                                 "model.patch_size": "7", "model.embed_dim": "64", "model.img_size": "56",
                                 "train.layer_decay": "1.0", "train.warmup_epochs": "0"})  # fmt: skip
    assert segment_main(args + ["train.lr=1e-12"]) == 0
    log = capsys.readouterr().out
    assert "image size: pos_embed 4x4 -> 8x8 patches, recomputed (the fixed sin-cos table)" in log
    src, seg = (
        load_file(str(pre / "checkpoint-last" / "model.safetensors")),
        load_file(str(out / "checkpoint-last" / "model.safetensors")),
    )
    torch.testing.assert_close(
        seg["blocks.1.mlp.fc2.weight"], src["blocks.1.mlp.fc2.weight"], atol=1e-6, rtol=0
    )


@pytest.mark.slow
def test_ade20k_layout_with_large_non_square_images_trains_and_evaluates_by_sliding_window(tmp_path):
    """The ADE20K recipe's code path on a tiny ADE-layout folder: reduce_zero_label, a [long, short] resize,
    images larger than the crop and not square, sliding-window evaluation."""
    root = tmp_path / "ADEChallengeData2016"
    write_pairs(root, [(90, 60), (60, 80), (100, 70)] * 3, num_classes=5, ext="jpg",
                images_dir="images/training", masks_dir="annotations/training")  # fmt: skip
    write_pairs(root, [(75, 50), (50, 66)], num_classes=5, ext="jpg",
                images_dir="images/validation", masks_dir="annotations/validation")  # fmt: skip
    out = tmp_path / "run"
    args = tiny_seg_args(out, **{
        "recipe": "segment_ade20k_vit_base", "data.train": str(root), "data.val": str(root), "model.name": "vit_tiny_patch16",
        "model.img_size": "32", "model.num_classes": "4", "model.seg_channels": "8", "data.resize": "[96,48]",
        "train.eval_stride": "21", "train.max_steps": "2", "train.warmup_steps": "1", "data.epoch_samples": "0",
        "train.batch_size": "4", "checkpoint.every_steps": "2",
    })  # fmt: skip
    args = [a for a in args if not a.startswith(("data.mean", "data.std"))]
    assert segment_main(args) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["eval_mode"] == "slide" and report["pairs"] == 2 and not math.isnan(report["miou"])
    assert len(report["per_class"]) == 4


@pytest.mark.slow
def test_segment_help_lists_its_keys_and_recipes():
    r = subprocess.run(
        [sys.executable, "mae/segment.py", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "segment_demo" in r.stdout and "model.seg_head" in r.stdout
    assert "segment_ade20k_vit_base" in r.stdout and "model.mask_ratio" not in r.stdout


def test_unknown_segmentation_data_is_one_line(tmp_path, capsys):
    assert segment_main(tiny_seg_args(tmp_path / "r", **{"data.train": str(tmp_path / "none")})) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(DataError, match="expected a directory with images/ and masks/"):
        pair_source(str(tmp_path), train=True, reduce_zero_label=False)


@pytest.mark.slow
def test_two_processes_score_every_validation_pair_once(tmp_path):
    """2 gloo processes train and evaluate on an odd number of pairs of several sizes; the logged mIoU / mAcc /
    aAcc equal one process evaluating the same final weights (the confusion matrices summed, nothing twice)."""
    import os

    from accelerate import Accelerator
    from conftest import TWO_CPU_PROCESSES
    from safetensors.torch import load_file

    from mae.tasks.segment import seg_evaluator
    from mae.weights.build import build_segmenter

    write_pairs(tmp_path / "train", [(40, 40)] * 8)
    write_pairs(tmp_path / "val", [(40, 32), (36, 48), (40, 40), (33, 41), (48, 40)], seed=1)
    out = tmp_path / "run"
    args = tiny_seg_args(out, **{
        "data.train": str(tmp_path / "train"), "data.val": str(tmp_path / "val"), "model.in_chans": "3",
        "model.img_size": "32", "model.num_classes": "4", "train.max_steps": "2", "train.batch_size": "2",
        "data.epoch_samples": "0", "data.mean": "[0.5]", "data.std": "[0.25]",
    })  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, *TWO_CPU_PROCESSES, "mae/segment.py", *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    logged = [x for x in rows(out) if "miou" in x][-1]
    cfg = load_config(args, task="segment")
    model = build_segmenter(cfg, 4)
    model.load_state_dict(load_file(str(out / "checkpoint-last" / "model.safetensors")))
    single = seg_evaluator(cfg, Accelerator(cpu=True), 4, log=lambda *a: None)(model, 2)
    for k in ("miou", "macc", "aacc"):
        assert single[k] == pytest.approx(logged[k], abs=1e-4), k
    assert json.loads((out / "eval.json").read_text())["pairs"] == 5


def test_the_token_probe_labels_each_patch_by_its_commonest_class_and_separates_what_is_separable():
    """experiments/segment_demo.py tokens: a patch takes the class most of its pixels have, ignore (255) left
    out (-1 when a patch is all ignore); the probe finds a linear rule where one exists and is at chance on
    labels that do not depend on the features."""
    from experiments.segment_demo import linear_probe, token_labels

    m = np.zeros((1, 4, 12), np.uint8)
    m[0, :3, :4] = 3  # 12 of 16 pixels
    m[0, :, 4:8] = 255
    m[0, 0, 4] = 7  # one labelled pixel among ignore
    m[0, :, 8:] = 255
    assert token_labels(m, 4).tolist() == [[3, 7, -1]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    assert linear_probe(x[:400], y[:400], x[400:], y[400:]) > 90
    shuffled = y[torch.randperm(600, generator=g)]
    assert linear_probe(x[:400], shuffled[:400], x[400:], shuffled[400:]) < 45


def test_a_shallow_encoder_reads_a_block_twice_for_the_pyramid():
    """default_blocks(2) is [1, 1, 1, 2]: UPerNet gets four maps, block 1's three times."""
    torch.manual_seed(0)
    model = SegmentationViT(3, **{**TINY_SEG, "depth": 2}, channels=8).eval()
    assert model.out_blocks == [1, 1, 1, 2]
    maps = model.token_maps(torch.randn(1, 3, 32, 32))
    assert len(maps) == 4 and torch.equal(maps[0], maps[2]) and not torch.equal(maps[0], maps[3])
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ collapse


def test_collapse_names_one_class_chance_accuracy_and_no_prediction():
    """A model that learnt nothing is named: all pixels on one class (the majority: mAcc 1 / classes), an mAcc
    within a point of chance, or (a detector) no prediction above the threshold; a model that separates the
    classes is not."""
    from mae.eval.metrics import collapse

    target = torch.tensor([[0, 0, 0, 1], [2, 2, 0, 255]])
    everything_background = confusion_matrix(torch.zeros_like(target), target, 3)
    s = segmentation_scores(everything_background)
    why = collapse(everything_background.sum(0), ["background", "a", "b"], s["macc"], 3)
    assert "every prediction is class 0 (background)" in why and "mAcc 33.33% is chance" in why
    right = confusion_matrix(target.clamp(max=2), target, 3)
    assert collapse(right.sum(0), None, segmentation_scores(right)["macc"], 3) is None
    assert collapse([40, 60, 0], None, 100 / 3 + 0.5, 3).startswith("mAcc 33.83% is chance")
    assert collapse([0, 0, 0]) == "no prediction at all"  # a detector: nothing above the score threshold
    assert collapse([0, 5, 0]) == "every prediction is class 1 (1)"


def test_a_collapsed_segmentation_model_is_named_in_the_log_and_eval_json(tmp_path):
    """The segmentation task's evaluator on a model that paints every pixel one class: one log line and
    eval.json's `collapsed` say so; a model that reads its input is not flagged."""
    from accelerate import Accelerator

    from mae.tasks.segment import seg_evaluator

    write_pairs(tmp_path / "val", [(32, 32)] * 3)
    args = tiny_seg_args(tmp_path / "run", **{"data.train": str(tmp_path / "val"), "data.val": str(tmp_path / "val"),
                                              "model.in_chans": "3", "model.img_size": "32"})  # fmt: skip
    cfg = load_config([*args, "data.mean=[0.5]", "data.std=[0.25]"], task="segment")
    (tmp_path / "run").mkdir()

    class Constant(nn.Module):
        patch_embed = SimpleNamespace(patch_size=(8, 8))  # what whole-image inference pads to

        def forward(self, x):
            return torch.zeros(x.shape[0], 4, *x.shape[2:]).index_fill_(1, torch.tensor([2]), 1.0)

    lines = []
    evaluate = seg_evaluator(cfg, Accelerator(cpu=True), 4, log=lines.append)
    evaluate(Constant(), 7)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert (
        "every prediction is class 2" in report["collapsed"]
        and "mAcc 25.00% is chance" in report["collapsed"]
    )
    flagged = [line for line in lines if "collapsed" in line]
    assert len(flagged) == 1 and "step 7" in flagged[0] and report["collapsed"] in flagged[0]

    class ReadsTheImage(Constant):  # write_pairs' red channel is 40 x class id
        def forward(self, x):
            red = x[:, :1] * 0.25 + 0.5
            ids = (red * 255 / 40).round().clamp(0, 3).long()
            return torch.nn.functional.one_hot(ids[:, 0], 4).permute(0, 3, 1, 2).float()

    lines.clear()
    evaluate(ReadsTheImage(), 8)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["collapsed"] is None
    assert not any("collapsed" in line for line in lines)
