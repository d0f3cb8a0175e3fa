"""Detection: the ViTDet backbone (windows, relative position bias, pyramid), Mask R-CNN on it, model.init from
every source kind, COCO data (layouts, masks, crowd, bad input), large-scale jitter, exact resume, COCO AP, the
prediction command and the entry point end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fmnist, rows
from PIL import Image

from mae.config import ConfigError
from mae.data import DataError
from mae.data.detection import (
    CocoSource,
    DetEvalLoader,
    DetTrainLoader,
    DetTransform,
    Instances,
    det_source,
    encode_masks,
)
from mae.detect import main as detect_main
from mae.detect_predict import main as predict_main
from mae.eval.coco import coco_ap, to_results
from mae.models import create_mae, create_vit
from mae.models.detection import MaskRCNNViT, ViTDetBlock, global_blocks
from mae.models.segmentation import SegmentationViT
from mae.models.vit import Block
from mae.tasks import load_config

TINY = dict(img_size=64, patch_size=8, in_chans=3, embed_dim=32, depth=4, num_heads=2)
SMALL_HEADS = dict(channels=16, proposals=(64, 32), roi_samples=32, detections=10)


def tiny_detector(num_classes=3, **kw) -> MaskRCNNViT:
    torch.manual_seed(0)
    return MaskRCNNViT(num_classes, **{**TINY, **SMALL_HEADS, "window_size": 4, **kw})


# ------------------------------------------------------------------------------------------------ the backbone


def test_global_blocks_are_vitdets():
    assert global_blocks(12) == [2, 5, 8, 11] and global_blocks(24) == [5, 11, 17, 23]
    assert tiny_detector().global_blocks == [0, 1, 2, 3][:4] == global_blocks(4)
    assert MaskRCNNViT(2, **{**TINY, "depth": 8}, window_size=4).global_blocks == [1, 3, 5, 7]
    assert MaskRCNNViT(2, **{**TINY, "depth": 8}, window_size=0).global_blocks == list(range(8))


def _block(window: int, grid: int) -> ViTDetBlock:
    torch.manual_seed(0)
    blk = ViTDetBlock(32, 2, window, (window, window) if window else (grid, grid)).eval()
    for p in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
        torch.nn.init.normal_(p, std=0.5)  # a bias that matters
    return blk


def test_a_window_that_covers_the_grid_is_global_attention():
    x = torch.randn(2, 7, 7, 32)
    windowed, global_ = _block(7, 7), _block(0, 7)
    global_.load_state_dict(windowed.state_dict())
    torch.testing.assert_close(windowed(x), global_(x))
    assert not torch.allclose(_block(4, 7)(x), global_(x), atol=1e-3)  # smaller windows see less


def test_windows_are_padded_and_see_only_their_own_tokens():
    blk, x = _block(4, 10), torch.randn(1, 10, 10, 32)
    out = blk(x)
    assert out.shape == x.shape  # 10 = 2 whole windows + padding, cut off again
    y = x.clone()
    y[0, 9, 9] += 5.0  # the last (padded) window
    changed = (blk(y) - out).abs().amax(-1)[0] > 1e-5
    assert changed[8:, 8:].any() and not changed[:8].any() and not changed[:, :8].any()


def test_zero_relative_position_tables_leave_a_pretrained_encoders_blocks_unchanged():
    """Loaded into the detector, a classifier's blocks compute on the patch tokens what they computed before (the
    relative position bias starts at zero); a non-zero bias changes them."""
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16", num_classes=0, img_size=64, patch_size=8, in_chans=3, embed_dim=32,
                     depth=4, num_heads=2).eval()  # fmt: skip
    det = tiny_detector(window_size=0).eval()
    det.load_state_dict({k: v for k, v in vit.state_dict().items() if k in det.state_dict()}, strict=False)
    img = torch.randn(2, 3, 64, 64)
    x = vit.patch_embed(img) + vit.pos_embed[:, 1:]
    expected = []
    for blk in vit.blocks:
        x = blk(x)
        expected.append(x.transpose(1, 2).reshape(2, 32, 8, 8))
    got = det.forward_intermediates(img, intermediates_only=True)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    torch.nn.init.normal_(det.blocks[0].attn.rel_pos_h, std=0.5)
    assert not torch.allclose(
        det.forward_intermediates(img, [0], intermediates_only=True)[0], expected[0], atol=1e-3
    )
    assert isinstance(det.blocks[0], Block)  # the same block, parameter names and all


def test_forward_intermediates_follows_timms_signature_and_the_pyramid_strides():
    det = tiny_detector().eval()
    img = torch.randn(2, 3, 64, 64)
    final, maps = det.forward_intermediates(img, indices=2)
    assert final.shape == (2, 64, 32) and [m.shape for m in maps] == [(2, 32, 8, 8)] * 2
    tokens = det.forward_intermediates(img, [1], output_fmt="NLC", intermediates_only=True)[0]
    assert tokens.shape == (2, 64, 32)
    with pytest.raises(ValueError, match="no prefix"):
        det.forward_intermediates(img, return_prefix_tokens=True)
    feats = det.features(img)
    # patch 8: x4, x2, x1, x0.5 of the patch stride, then the RPN's pooled level (strides 2, 4, 8, 16, 32)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "0": (16, 32, 32), "1": (16, 16, 16), "2": (16, 8, 8), "3": (16, 4, 4), "pool": (16, 2, 2)
    }  # fmt: skip
    assert det.features(torch.randn(1, 3, 96, 64))["2"].shape[2:] == (12, 8)  # another grid: table resampled


# ------------------------------------------------------------------------------------------------ Mask R-CNN


def _targets(n: int, size: int = 64) -> list[dict]:
    out = []
    for i in range(n):
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 8:30, 10:40], masks[1, 35:60, 5:25] = 1, 1
        boxes = torch.tensor([[10.0, 8, 40, 30], [5.0, 35, 25, 60]])
        out.append({"boxes": boxes, "labels": torch.tensor([1, 2 + i % 2]), "masks": masks})
    return out


def test_a_train_step_lowers_the_loss_and_evaluation_gives_boxes_and_masks_at_the_original_size():
    det = tiny_detector().train()
    img, targets = torch.randn(2, 3, 64, 64), _targets(2)
    losses = det(img, targets)
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    opt = torch.optim.AdamW(det.parameters(), lr=1e-3)
    first = None
    for _ in range(5):
        loss = sum(det(img, targets).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first and all(p.grad is not None for p in det.parameters() if p.requires_grad)
    det.eval()
    with torch.no_grad():
        (out,) = det(img[:1], image_sizes=[(64, 48)], original_sizes=[(128, 96)])
    k = len(out["boxes"])
    assert out["masks"].shape == (k, 1, 128, 96) and out["labels"].shape == out["scores"].shape == (k,)
    assert k <= 10 and (out["boxes"][:, 2] <= 96).all() and (out["boxes"][:, 3] <= 128).all()


def test_box_regression_is_decoded_in_float32_under_bf16_autocast():
    det = tiny_detector().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = det.features(torch.randn(1, 3, 64, 64))
        deltas = det.rpn.head([feats["0"]])[1][0]
        (out,) = det(torch.randn(1, 3, 64, 64))
    assert feats["0"].dtype == deltas.dtype == out["boxes"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------ model.init


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny MAE's weights in every form model.init takes, and classifier, segmentation and detection models'."""
    from safetensors.torch import save_file

    from mae.export import main as export_main

    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(1)
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=4,
                     num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    sd = mae.state_dict()
    torch.save({"model": sd}, root / "full.pth")
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}},
               root / "encoder.pth")  # fmt: skip
    heads = [
        "--num-heads",
        "2",
        "--decoder-num-heads",
        "2",
    ]  # a bare file of unusual width does not tell them
    assert export_main([str(root / "full.pth"), str(root / "timm"), "--to", "timm", *heads]) == 0
    assert export_main([str(root / "full.pth"), str(root / "hf"), "--to", "hf", *heads]) == 0
    for pool in (True, False):  # fine-tuned (fc_norm + head) and cls-token classifiers (norm + head)
        vit = create_vit("vit_tiny_patch16", num_classes=5, global_pool=pool, img_size=32, patch_size=8,
                         embed_dim=32, depth=4, num_heads=2)  # fmt: skip
        vit.load_state_dict({k: v for k, v in sd.items() if k in vit.state_dict()}, strict=False)
        save_file(vit.state_dict(), str(root / f"classifier_{pool}.safetensors"))
    seg = SegmentationViT(4, channels=8, img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    seg.load_state_dict({k: v for k, v in sd.items() if k in seg.state_dict()}, strict=False)
    save_file(seg.state_dict(), str(root / "segmenter.safetensors"))
    det = tiny_detector()
    save_file(det.state_dict(), str(root / "detector.safetensors"))
    return root, sd, det.state_dict()


@pytest.mark.parametrize(
    "kind",
    [
        "full.pth",
        "encoder.pth",
        "timm",
        "hf",
        "classifier_True.safetensors",
        "classifier_False.safetensors",
        "segmenter.safetensors",
    ],  # fmt: skip
)
def test_every_model_init_source_loads_the_encoder_and_resamples_its_table(sources, kind, capsys):
    """model.pos_embed_adapt=resample, as the detection recipes: the 4x4 table resampled to the 8x8 grid as ViTDet's
    get_abs_pos (bicubic, no antialiasing), the class token's row left out with the class token."""
    from mae.weights.load import load_init

    root, sd, _ = sources
    det = tiny_detector()
    missing, unexpected = load_init(det, str(root / kind), pos_embed="resample")
    own = det.state_dict()
    assert not unexpected and all(k.startswith(det.new_prefixes) for k in missing)
    assert "roi_heads.box_predictor.cls_score.weight" in missing  # the heads start fresh
    for k in ("blocks.3.mlp.fc2.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):
        torch.testing.assert_close(own[k], sd[k], rtol=1e-6, atol=1e-6)
    rows = sd["pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    # detectron2's get_abs_pos
    vitdet = torch.nn.functional.interpolate(rows, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(own["pos_embed"][:, 1:], vitdet.permute(0, 2, 3, 1).reshape(1, 64, -1))
    out = capsys.readouterr().out
    assert "pos_embed 4x4 -> 8x8 patches, resampled (bicubic, as the reference's interpolate_pos_embed" in out
    assert "dropped from the source (this model does not use them): " in out and "cls_token (1 tensor)" in out
    assert torch.equal(own["blocks.0.attn.rel_pos_h"], torch.zeros_like(own["blocks.0.attn.rel_pos_h"]))


def test_pos_embed_adapt_recompute_gives_the_detection_backbone_the_sincos_table_of_its_grid(sources, capsys):
    """The detection backbone follows model.pos_embed_adapt as every task's model does: `recompute` evaluates an
    MAE's fixed sin-cos table on its 8x8 grid (no model overrides the key)."""
    from mae.models import sincos_pos_embed_2d
    from mae.weights.load import load_init

    root, _, _ = sources
    det = tiny_detector()
    load_init(det, str(root / "full.pth"), pos_embed="recompute")
    table = det.state_dict()["pos_embed"][0, 1:]
    torch.testing.assert_close(table, sincos_pos_embed_2d(32, (8, 8), cls_token=False), rtol=0, atol=1e-6)
    assert "pos_embed 4x4 -> 8x8 patches, recomputed (the fixed sin-cos table)" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["detect_demo", "detect_coco_vit_base", "detect_coco_vit_large"])
def test_detection_recipes_resample_the_position_table_as_vitdet(recipe):
    cfg = load_config([f"recipe={recipe}", "model.init=runs/x"], task="detect")
    assert cfg.model.pos_embed_adapt == "resample"  # detectron2's ViTDet interpolates the pretrained table


def test_a_detection_source_of_the_same_categories_brings_its_heads(sources):
    from mae.weights.load import load_init

    root, _, det_sd = sources
    det = MaskRCNNViT(3, **{**TINY, **SMALL_HEADS, "window_size": 4})
    missing, _ = load_init(det, str(root / "detector.safetensors"))
    assert missing == [] and all(torch.equal(det.state_dict()[k], v) for k, v in det_sd.items())
    other = MaskRCNNViT(7, **{**TINY, **SMALL_HEADS, "window_size": 4})  # other categories: heads start fresh
    missing, _ = load_init(other, str(root / "detector.safetensors"))
    assert "rpn.head.cls_logits.weight" in missing and "blocks.0.attn.rel_pos_h" not in missing


# ------------------------------------------------------------------------------------------------ COCO data


def _poly(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_coco(root: Path, layout: str = "dir", clean: bool = False) -> Path:
    """Four 40x48 images (one missing on disk) with polygon and RLE (compressed and not) annotations and an image
    without any; unless `clean`, also a crowd region, a box partly outside its image and a zero-area box. Returns
    the source path."""
    images_dir = {"dir": root / "images", "json": root, "release": root / "val2017"}[layout]
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):  # image 4 is missing
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images_dir / f"{i + 1}.png")
    square = np.zeros((40, 48), np.uint8)
    square[10:20, 5:25] = 1
    compressed = encode_masks(torch.from_numpy(square)[None])[0]
    raw = {"size": [40, 48], "counts": _uncompressed(square)}
    anns = [
        dict(image_id=1, category_id=7, bbox=[4, 4, 20, 10], segmentation=_poly(4, 4, 24, 14)),
        dict(image_id=1, category_id=3, bbox=[5, 10, 20, 10], segmentation=compressed),
        dict(image_id=2, category_id=3, bbox=[5, 10, 20, 10], segmentation=raw),
    ]
    if not clean:
        anns += [
            dict(
                image_id=2, category_id=7, bbox=[30, 30, 30, 20], segmentation=_poly(30, 30, 48, 40)
            ),  # clipped
            dict(image_id=2, category_id=7, bbox=[1, 1, 0, 5], segmentation=_poly(1, 1, 1, 6)),  # zero area
            dict(image_id=2, category_id=3, bbox=[0, 0, 48, 40], segmentation=raw, iscrowd=1),
        ]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 48, "height": 40} for i in (1, 2, 3, 4)],
        "annotations": [dict(a, id=j + 1, iscrowd=a.get("iscrowd", 0)) for j, a in enumerate(anns)],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    ann_file = {"dir": root / "annotations.json", "json": root / "instances.json",
                "release": root / "annotations" / "instances_val2017.json"}[layout]  # fmt: skip
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(data))
    return {"dir": root, "json": ann_file, "release": root}[layout]


def _uncompressed(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat, counts, value, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    return counts + [run]


@pytest.mark.parametrize("layout", ["dir", "json", "release"])
def test_coco_layouts_masks_crowd_boxes_and_missing_images(tmp_path, layout):
    lines = []
    src = CocoSource(str(write_coco(tmp_path, layout)), train=False, log_fn=lines.append)
    assert len(src) == 3 and list(src.image_ids) == [1, 2, 3] and src.missing == 1
    assert "1 image file(s) missing" in lines[0] and "4.png" in lines[0]
    assert [c["id"] for c in src.categories] == [3, 7]  # sorted by id: label 1 is category 3
    assert (src.counts.clipped, src.counts.dropped, src.counts.crowd) == (1, 1, 1)
    img, inst = src.load(0, 3)
    assert img.shape == (3, 40, 48) and inst.labels.tolist() == [2, 1]
    assert _box(inst.masks[0].numpy()) == [4, 4, 24, 14]  # the polygon, rasterised
    square = torch.zeros(40, 48, dtype=torch.uint8)
    square[10:20, 5:25] = 1
    assert torch.equal(inst.masks[1], square)  # compressed RLE
    _, inst2 = src.load(1, 3)
    assert torch.equal(inst2.masks[0], square)  # uncompressed RLE, the crowd region left out
    assert inst2.boxes[1].tolist() == [30.0, 30.0, 48.0, 40.0]  # clipped to the image
    _, negative = src.load(2, 3)
    assert negative.boxes.shape == (0, 4) and negative.masks.shape == (0, 40, 48)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("categories"), r"instances.json: not COCO instances: no 'categories' list"),
        (lambda d: d["annotations"][1].update(category_id=99),
         r"instances.json: annotations\[1\] \(id 2\): category_id 99 is not in categories"),
        (lambda d: d["annotations"][2].update(image_id=42),
         r"instances.json: annotations\[2\] \(id 3\): image_id 42 is not in images"),
        (lambda d: d["images"][0].pop("file_name"), r"instances.json: images\[0\] \(id 1\) has no 'file_name'"),
    ],
)  # fmt: skip
def test_a_file_that_is_not_coco_instances_is_one_line_naming_file_and_record(
    tmp_path, change, message, capsys
):
    path = write_coco(tmp_path, "json")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        CocoSource(str(path), train=True)
    out = tmp_path / "run"
    assert detect_main(tiny_args(out, **{"data.train": str(path), "data.val": ""})) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and not out.exists()


def test_a_validation_set_without_objects_is_one_line_exit_2(tmp_path, capsys):
    train = write_coco(tmp_path / "train", "dir", clean=True)
    val = write_coco(tmp_path / "val", "dir", clean=True)
    data = json.loads((val / "annotations.json").read_text())
    (val / "annotations.json").write_text(json.dumps({**data, "annotations": []}))
    args = tiny_args(tmp_path / "run", **{"data.train": str(train), "data.val": str(val), "model.in_chans": "3",
                                          "data.mean": "[0.5]", "data.std": "[0.25]", "model.img_size": "64"})  # fmt: skip
    assert detect_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no annotated object to score" in err and str(val) in err


def test_unreadable_images_are_skipped_and_counted_and_no_usable_image_is_an_error(tmp_path):
    path = write_coco(tmp_path, "dir")
    (tmp_path / "images" / "2.png").write_bytes(b"not a png")
    src = CocoSource(str(path), train=True)
    loader = DetEvalLoader(src, DetTransform(32, [0.5] * 3, [0.25] * 3, train=False), in_chans=3, batch_size=4,
                           rank=0, world_size=1, workers=0)  # fmt: skip
    ((items, bad),) = list(loader)
    assert bad == 1 and [it[4] for it in items] == [0, 2]
    for f in (tmp_path / "images").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="none of its 4 images is in"):
        CocoSource(str(path), train=True)


# ------------------------------------------------------------------------------------------------ transforms


def test_large_scale_jitter_keeps_boxes_and_masks_together():
    """Rectangles: after flip, resize, crop and padding, each box is its mask's box (to the resize's rounding);
    objects the crop leaves out go, with their labels."""
    h, w = 60, 90
    masks = torch.zeros(4, h, w, dtype=torch.uint8)
    boxes = [(5, 5, 30, 25), (40, 10, 85, 50), (10, 35, 30, 58), (60, 2, 70, 12)]
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = 1
    inst = Instances(torch.tensor(boxes, dtype=torch.float32), torch.tensor([1, 2, 3, 4]), masks)
    tf = DetTransform(64, [0.5], [0.25], scale_range=(0.3, 2.0), hflip=True)
    from torchvision.ops import masks_to_boxes

    sizes, dropped = set(), 0
    for seed in range(40):
        img, target, part = tf(torch.rand(1, h, w), inst, seed)
        assert img.shape == (1, 64, 64) and target["masks"].shape[1:] == (64, 64)
        n = len(target["labels"])
        assert target["boxes"].shape == (n, 4) and target["masks"].shape[0] == n
        dropped += n < 4
        if n:
            torch.testing.assert_close(target["boxes"], masks_to_boxes(target["masks"]) + torch.tensor([0, 0, 1, 1]),
                                       atol=1.5, rtol=0)  # fmt: skip
        assert (img[:, part[0] :, :] == 0).all() and (
            img[:, :, part[1] :] == 0
        ).all()  # the mean, once normalised
        sizes.add(part)
    assert len(sizes) > 5 and dropped > 0
    a, b = tf(torch.rand(1, h, w), inst, 7), tf(torch.rand(1, h, w), inst, 7)
    assert torch.equal(a[1]["boxes"], b[1]["boxes"])  # a function of the seed


@needs_fmnist
def test_the_loader_resumes_exactly_and_its_order_is_a_function_of_seed_epoch_and_step():
    src = det_source("fashion-mnist-instances", train=True)
    tf = DetTransform(56, [0.286], [0.353], scale_range=(0.5, 1.5))
    loader = DetTrainLoader(src, tf, in_chans=1, batch_size=4, seed=3, rank=0, world_size=1, workers=0,
                            epoch_samples=24)  # fmt: skip
    whole = list(loader.iterate(1))
    tail = list(loader.iterate(1, start_step=4))
    assert len(whole) == 6 and len(tail) == 2
    for (xa, ta, _), (xb, tb, _) in zip(whole[4:], tail):
        assert torch.equal(xa, xb) and ta.image_sizes == tb.image_sizes
        assert all(
            torch.equal(p["masks"], q["masks"]) and torch.equal(p["boxes"], q["boxes"])
            for p, q in zip(ta, tb)
        )
    other = list(loader.iterate(2))
    assert not torch.equal(whole[0][0], other[0][0])


@needs_fmnist
def test_fashion_mnist_instances_are_the_segmentation_scenes_garments():
    from mae.data.segmentation import IGNORE

    inst_src = det_source("fashion-mnist-instances:test", train=False)
    from mae.data.segmentation import pair_source

    seg = pair_source("fashion-mnist-scenes:test", train=False, reduce_zero_label=False)
    for i in range(20):
        canvas, inst = inst_src.draw(i)
        seg_canvas, mask = seg.draw(i)
        assert np.array_equal(canvas, seg_canvas)
        painted = np.zeros_like(mask)
        for m, label in zip(inst.masks.numpy(), inst.labels.tolist()):
            assert not (painted[m > 0]).any()  # instances do not overlap
            painted[m > 0] = label
        labelled = (mask > 0) & (mask != IGNORE)
        assert np.array_equal(painted[labelled], mask[labelled]) and not painted[~labelled].any()
        assert torch.equal(inst.boxes, torch.tensor([_box(m) for m in inst.masks.numpy()]).reshape(-1, 4))


def _box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0]


# ------------------------------------------------------------------------------------------------ COCO AP


def _perfect(src) -> list[dict]:
    """Detections equal to the ground truth of every image of `src`."""
    out = []
    for i in range(len(src)):
        _, inst = src.load(i, 3)
        det = {"boxes": inst.boxes, "labels": inst.labels, "scores": torch.ones(len(inst.labels)),
               "masks": inst.masks[:, None].float()}  # fmt: skip
        out += to_results(det, src.categories, src.file_name(i), int(src.image_ids[i]))
    return out


def test_perfect_detections_score_100_ap_and_worse_ones_less(tmp_path):
    src = CocoSource(str(write_coco(tmp_path, "dir", clean=True)), train=False)
    gt, ids = src.coco(), [int(i) for i in src.image_ids]
    perfect = _perfect(src)
    scores = coco_ap(gt, perfect, ids)
    assert scores["box_ap"] == scores["mask_ap"] == pytest.approx(100.0)
    assert scores["per_category"]["three"]["box_ap"] == pytest.approx(100.0)
    shifted = [dict(r, bbox=[r["bbox"][0] + 6, *r["bbox"][1:]]) for r in perfect]
    assert coco_ap(gt, shifted, ids)["box_ap"] < scores["box_ap"]
    none = coco_ap(gt, [], ids)
    assert none["no_detections"] and none["box_ap"] == none["mask_ap"] == 0.0


def test_results_round_trip_through_coco_loadres(tmp_path):
    src = CocoSource(str(write_coco(tmp_path, "dir", clean=True)), train=False)
    results = json.loads(json.dumps(_perfect(src)))  # as predictions.json holds them
    dt = src.coco().loadRes(results)
    ann = dt.loadAnns(dt.getAnnIds(imgIds=[1]))[1]
    square = np.zeros((40, 48), np.uint8)
    square[10:20, 5:25] = 1
    assert (
        np.array_equal(dt.annToMask(ann), square)
        and ann["category_id"] == 3
        and ann["bbox"] == [5, 10, 20, 10]
    )
    assert {r["file_name"] for r in results} == {"1.png", "2.png"}


# ------------------------------------------------------------------------------------------------ the command


def test_prediction_inputs_name_their_outputs_apart_and_outputs_stay_out_of_the_input(tmp_path, capsys):
    from mae.infer.detect import Inputs

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "a.jpg", "b.png", "sub/a.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / name)
    inputs = Inputs(str(folder))
    assert sorted(inputs.stems()) == ["a.jpg", "a.png", "b", "sub/a"]  # never two outputs to one name
    fake = tmp_path / "seg_run"
    fake.mkdir()
    (fake / "config.yaml").write_text("task: segment\n")
    assert predict_main([str(fake), str(folder), str(tmp_path / "out")]) == 2
    assert "a 'segment' run, not a detect run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # a refused command leaves no directory
    for out, said in (
        (folder / "sub" / "out", "is inside INPUT"),
        (folder, "is INPUT"),
        (tmp_path, "holds INPUT"),
    ):
        assert predict_main([str(fake), str(folder), str(out)]) == 2
        assert said in capsys.readouterr().err
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "a.jpg", "a.png", "b.png", "sub", "sub/a.png"
    ]  # fmt: skip


def tiny_args(out, **extra) -> list[str]:
    args = {
        "recipe": "detect_demo",
        "output_dir": str(out),
        "model.patch_size": "8",
        "model.depth": "2",
        "model.embed_dim": "32",
        "model.num_heads": "2",
        "model.window_size": "4",
        "model.fpn_channels": "8",
        "data.epoch_samples": "16",
        "data.num_workers": "0",
        "train.batch_size": "4",
        "train.precision": "fp32",
        "train.warmup_steps": "1",
        "log.every_steps": "1",
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def test_detect_refuses_keys_it_does_not_read_and_answers_help_and_print_config(capsys):
    with pytest.raises(ConfigError, match=r"model.seg_head is not read by detect"):
        load_config(["recipe=detect_demo", "model.seg_head=linear"], task="detect")
    with pytest.raises(ConfigError, match=r"data.cat_max_ratio is not read by detect"):
        load_config(["recipe=detect_demo", "data.cat_max_ratio=0.5"], task="detect")
    with pytest.raises(ConfigError, match=r"train.min_lr is not read with train.schedule=step"):
        load_config(["recipe=detect_demo", "train.min_lr=1e-6"], task="detect")
    assert detect_main(["recipe=detect_demo", "model.mask_ratio=0.5"]) == 2
    assert "model.mask_ratio is not read by detect" in capsys.readouterr().err
    assert detect_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: python mae/detect.py" in out and "detect_demo" in out and "model.window_size" in out


@needs_fmnist
def test_print_config_counts_the_steps_of_the_detection_data(capsys):
    assert detect_main(["recipe=detect_demo", "--print-config"]) == 0
    derived = capsys.readouterr().out.split("derived:")[1]
    assert "steps_per_epoch: 900" in derived and "total_steps: 900" in derived  # 14,400 scenes / 16, 1 epoch


@needs_fmnist
def test_detect_demo_trains_evaluates_keeps_the_best_resumes_and_predicts(tmp_path, capsys):
    from experiments.detect_demo import write_scenes

    val = tmp_path / "val"
    write_scenes(val, 6, "test")
    out = tmp_path / "run"
    args = tiny_args(out, **{"data.val": str(val), "train.max_steps": "3"})
    assert detect_main(args) == 0
    evals = [r for r in rows(out) if "box_ap" in r]
    assert len(evals) == 1 and all(
        0 <= evals[0][k] <= 100 for k in ("box_ap", "box_ap50", "box_ap75", "mask_ap")
    )
    report = json.loads((out / "eval.json").read_text())
    assert (
        report["images"] == 6
        and report["box_ap"] == evals[0]["box_ap"]
        and "T-shirt/top" in report["per_category"]
    )
    meta = json.loads((out / "checkpoint-best" / "meta.json").read_text())
    assert meta["box_ap"] == evals[0]["box_ap"] and meta["task"] == "detect"
    assert json.loads((out / "categories.json").read_text())[0] == {"id": 1, "name": "T-shirt/top"}

    longer = tiny_args(out, **{"data.val": str(val), "train.max_steps": "5"})
    assert detect_main(longer) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in rows(out) if "loss" in r][-1] == 5

    shutil.copy(val / "images" / "00000.png", tmp_path / "one.png")
    (val / "images" / "00005.png").write_bytes(b"oops")
    pred = tmp_path / "pred"
    assert predict_main([str(out), str(val), str(pred), "--score-thresh", "0"]) == 0
    captured = capsys.readouterr()
    assert "5 image(s)" in captured.out and "1 unreadable" in captured.out and "00005.png" in captured.err
    results = json.loads((pred / "predictions.json").read_text())
    if results:  # COCO.loadRes takes the file as it is
        dt = CocoSource(str(val), train=False).coco().loadRes(results)
        assert {a["image_id"] for a in dt.anns.values()} <= {1, 2, 3, 4, 5}
    assert all(r["file_name"].startswith("images/") for r in results)
    assert Image.open(pred / "images" / "00000_overlay.png").mode == "RGB"
    assert predict_main([str(out), str(tmp_path / "one.png"), str(tmp_path / "p1")]) == 0
    assert (tmp_path / "p1" / "one_overlay.png").is_file()
    assert predict_main([str(out), str(val), str(val / "inside")]) == 2  # outputs never go into the input
    assert predict_main([str(tmp_path / "nowhere"), str(val), str(tmp_path / "p2")]) == 2
    assert "inside INPUT" in capsys.readouterr().err


def _scores(budget_gains: dict, seeds=(0, 1, 2)) -> dict:
    """Test box AP per budget, arm and seed: scratch at 20, the other arms at 20 + their paired gain."""
    return {
        b: {"scratch": {s: {"box_ap": 20.0} for s in seeds}}
        | {arm: {s: {"box_ap": 20.0 + g[i]} for i, s in enumerate(seeds)} for arm, g in arms.items()}
        for b, arms in budget_gains.items()
    }


def test_the_study_states_its_verdict_as_soon_as_the_budgets_it_needs_have_finished():
    from experiments.detect_study import FULL, report, verdict

    strong, control, null = [3.5, 4.0, 4.5], [6.0, 7.0, 8.0], [0.2, -0.3, 0.4]
    assert verdict(_scores({"1%": {"mae": strong, "control": control}}), FULL)[0] == "PASS"
    assert verdict(_scores({"1%": {"mae": [0.5, 4.0, 7.5], "control": control}}), FULL)[0] == "INCONCLUSIVE"
    assert verdict(_scores({"1%": {"mae": [-0.1, 5.0, 5.1], "control": control}}), FULL)[0] == "INCONCLUSIVE"
    # FAIL needs the 10% runs
    assert verdict(_scores({"1%": {"mae": null, "control": control}}), FULL) is None
    weak = [2.0, 2.5, 3.0]  # the control does not clear 3.0: no 10% result can make it PASS or FAIL
    word, why = verdict(_scores({"1%": {"mae": null, "control": weak}}), FULL)
    assert word == "INCONCLUSIVE" and "cannot tell" in why
    both = {"1%": {"mae": null, "control": control}, "10%": {"mae": null, "control": control}}
    assert verdict(_scores(both), FULL)[0] == "FAIL"
    both["10%"]["mae"] = [1.5, 1.0, 2.0]
    assert verdict(_scores(both), FULL)[0] == "INCONCLUSIVE"
    partial = _scores({"1%": {"mae": null, "control": control}})
    del partial["1%"]["mae"][2]  # a seed still running: nothing is decided, and the budget has no row yet
    assert verdict(partial, FULL) is None
    text = report(partial, {"mae": 1e-3, "scratch": 1e-3, "control": 1e-3}, FULL)
    assert "| 1% (200) |" not in text and "not yet (the 1% and 10% runs" in text


@needs_fmnist
@pytest.mark.slow
def test_the_study_runs_its_protocol_on_tiny_budgets_resumes_and_states_a_verdict(tmp_path):
    from experiments.detect_study import QUICK, main, run_name

    out = tmp_path / "study"
    assert main(["--quick", "--out", str(out)]) == 0
    lrs = json.loads((out / "selection.json").read_text())
    assert set(lrs) == set(QUICK.arms) and all(lr in QUICK.lrs for lr in lrs.values())
    for budget in QUICK.order:  # every final run scored once on the test scenes
        for arm in QUICK.arms:
            for seed in QUICK.seeds:
                test = json.loads(
                    (out / "runs" / run_name(arm, budget, lrs[arm], seed) / "test.json").read_text()
                )
                assert test["images"] == QUICK.test and 0 <= test["box_ap"] <= 100
    report = (out / "report.md").read_text()
    assert report.count("| 1% (8) |") == 3 and any(
        f"Verdict: **{w}**" in report for w in ("PASS", "FAIL", "INCONCLUSIVE")
    )
    stamp = (out / "runs" / run_name("mae", "1%", lrs["mae"], 0) / "test.json").stat().st_mtime
    assert main(["--quick", "--out", str(out)]) == 0  # re-running trains and scores nothing again
    assert (out / "runs" / run_name("mae", "1%", lrs["mae"], 0) / "test.json").stat().st_mtime == stamp


@needs_fmnist
@pytest.mark.slow
def test_two_processes_score_every_image_once_as_one_process_does(tmp_path):
    """2 gloo processes train and evaluate on an odd number of images; rank 0 scores the gathered results of both,
    and the logged AP equal one process evaluating the same final weights."""
    import os
    import subprocess
    import sys

    from accelerate import Accelerator
    from conftest import TWO_CPU_PROCESSES
    from safetensors.torch import load_file

    from experiments.detect_demo import write_scenes
    from mae.tasks.detect import det_evaluator
    from mae.weights.build import build_detector

    write_scenes(tmp_path / "val", 5, "test")
    out = tmp_path / "run"
    args = tiny_args(
        out, **{"data.val": str(tmp_path / "val"), "train.max_steps": "2", "train.batch_size": "2"}
    )
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *TWO_CPU_PROCESSES, "mae/detect.py", *args], env=env, capture_output=True,
                       text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    logged = [x for x in rows(out) if "box_ap" in x][-1]
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 5 and report["bad_images"] == 0
    cfg = load_config(args, task="detect")
    model = build_detector(cfg, 10)
    model.load_state_dict(load_file(str(out / "checkpoint-last" / "model.safetensors")))
    train_src = det_source(cfg.data.train, train=True)
    single = det_evaluator(cfg, Accelerator(cpu=True), train_src, log=lambda *a: None)(model, 2)
    assert json.loads((out / "eval.json").read_text())["detections"] == report["detections"]
    for k in ("box_ap", "box_ap50", "box_ap75", "mask_ap"):
        assert single[k] == pytest.approx(logged[k], abs=1e-4), k


def test_exporting_or_embedding_a_detection_run_says_in_one_line_why_not(tmp_path, capsys):
    """Its ViTDet backbone (relative position biases, no class token) is no ViT of timm, Hugging Face or the MAE
    release: both commands name what the source is and what it serves, exit 2, and write nothing."""
    from safetensors.torch import save_file

    from mae.embed import main as embed_main
    from mae.export import main as export_main
    from mae.weights.build import build_detector

    model = build_detector(load_config(tiny_args(tmp_path / "unused"), task="detect"), 3)
    weights = tmp_path / "detector.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    for main, args in (
        (export_main, [str(weights), str(tmp_path / "exported"), "--to", "timm"]),
        (embed_main, [str(weights), "fashion-mnist:test", str(tmp_path / "embedded")]),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a detection run's weights: its ViTDet backbone" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detector.safetensors"]
