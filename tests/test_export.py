"""Export to timm and Hugging Face, and back: the other library computes what mae computes."""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from mae.config import to_yaml
from mae.export import main
from mae.models import create_mae
from mae.tasks import load_config
from mae.weights.formats import load_state_dict_any
from mae.weights.load import load_mae_weights

TINY = dict(img_size=32, patch_size=8)


def _run_dir(tmp_path, model, overrides):
    """A pretraining run directory as the training loop leaves it."""
    run = tmp_path / "run"
    (run / "checkpoint-00000007").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(overrides)))
    save_file(model.state_dict(), str(run / "checkpoint-00000007" / "model.safetensors"))
    (run / "checkpoint-last").symlink_to("checkpoint-00000007")
    return run


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory):
    """A 1-channel tiny MAE run with per-patch normalised targets (everything the defaults are not)."""
    torch.manual_seed(0)
    model = create_mae("mae_vit_tiny_patch16", in_chans=1, norm_pix_loss=True, **TINY).eval()
    overrides = [
        "model.name=mae_vit_tiny_patch16",
        "model.img_size=32",
        "model.patch_size=8",
        "model.in_chans=1",
        "model.norm_pix_loss=true",
        "model.mask_ratio=0.6",
        "data.mean=[0.286]",
        "data.std=[0.353]",
    ]
    return model, _run_dir(tmp_path_factory.mktemp("gray"), model, overrides)


def test_timm_export_loads_offline_with_the_same_features(tmp_path, gray_run):
    model, run = gray_run
    assert main([str(run), str(tmp_path / "timm"), "--to", "timm"]) == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["mean"] == [0.286] and config["pretrained_cfg"]["input_size"] == [
        1,
        32,
        32,
    ]
    vit = timm.create_model(
        config["architecture"],
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors")),
        **config["model_args"],
    ).eval()
    imgs = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            vit.forward_features(imgs), model.forward_features(imgs), rtol=0, atol=1e-6
        )
    assert set(load_state_dict_any(tmp_path / "timm")) == set(vit.state_dict())


def test_timm_export_of_a_reference_file(tmp_path):
    torch.manual_seed(0)
    model = create_mae("mae_vit_small_patch16", **TINY).eval()
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_small.pth")
    assert main([str(tmp_path / "mae_pretrain_vit_small.pth"), str(tmp_path / "out"), "--to", "timm"]) == 0
    vit = timm.create_model("local-dir:" + str(tmp_path / "out"), pretrained=True).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            vit.forward_features(imgs), model.forward_features(imgs), rtol=0, atol=1e-6
        )


def test_hf_roundtrip_same_loss_for_the_same_noise(tmp_path, gray_run):
    transformers = pytest.importorskip("transformers")
    model, run = gray_run
    assert main([str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.norm_pix_loss and hf.config.mask_ratio == 0.6 and hf.config.num_channels == 1
    imgs, noise = torch.randn(3, 1, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = model(imgs, mask_ratio=0.6, noise=noise)
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, pred, rtol=0, atol=1e-5)
    assert torch.equal(out.mask, mask)

    # and back: a Hugging Face directory -> our names, bit-identical
    assert main([str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "mae"]) == 0
    back = load_state_dict_any(tmp_path / "back")
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    again = create_mae("mae_vit_tiny_patch16", in_chans=1, norm_pix_loss=True, **TINY)
    load_mae_weights(again, tmp_path / "hf")  # the Hugging Face directory itself loads too
    assert torch.equal(again.decoder_pred.weight, model.decoder_pred.weight)
    args = json.loads((tmp_path / "back" / "config.json").read_text())["mae_model_args"]
    assert args["in_chans"] == 1 and args["norm_pix_loss"] is True and args["decoder_num_heads"] == 4


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "o"), "--to", "timm"]) == 2
    assert main([str(tmp_path), str(tmp_path / "o")]) == 2  # --to is required
    assert main([str(tmp_path), str(tmp_path / "o"), "--to", "onnx"]) == 2
    torch.manual_seed(0)
    model = create_mae("mae_vit_tiny_patch16", embed_dim=96, num_heads=2, **TINY)
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder}, tmp_path / "enc.pth")
    assert (
        main([str(tmp_path / "enc.pth"), str(tmp_path / "o"), "--to", "hf"]) == 2
    )  # width 96: heads unknown
    assert (
        main([str(tmp_path / "enc.pth"), str(tmp_path / "o"), "--to", "hf", "--num-heads", "2"]) == 2
    )  # no decoder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("mae-export: error:") for line in err)
    assert "missing.pth" in err[0] and "--to" in err[1] and "--num-heads" in err[3] and "decoder" in err[4]


def _load_as_the_contract_says(out_dir):
    """The exact call DESIGN.md promises for a `--to timm` directory."""
    config = json.loads((out_dir / "config.json").read_text())
    return timm.create_model(
        config["architecture"],
        pretrained=True,
        num_classes=0,
        **config["model_args"],
        pretrained_cfg_overlay=dict(file=str(out_dir / "model.safetensors"), first_conv=None),
    ).eval()


def test_timm_export_of_the_demo_encoder(tmp_path):
    """The demo recipe's encoder (192-d, 6 blocks, 3 heads, 28 px, patch 4, 1 channel) from its run dir."""
    torch.manual_seed(0)
    model = create_mae(
        "mae_vit_tiny_patch16",
        img_size=28,
        patch_size=4,
        in_chans=1,
        depth=6,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    ).eval()
    run = _run_dir(tmp_path, model, ["recipe=demo"])
    assert main([str(run), str(tmp_path / "timm"), "--to", "timm"]) == 0
    vit = _load_as_the_contract_says(tmp_path / "timm")
    assert (len(vit.blocks), vit.embed_dim, vit.blocks[0].attn.num_heads) == (6, 192, 3)
    imgs = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            vit.forward_features(imgs), model.forward_features(imgs), rtol=0, atol=1e-5
        )


def test_timm_export_of_an_odd_non_square_encoder(tmp_path):
    """Width 96 with 2 heads, 3 blocks, MLP ratio 2, 4 channels, 24x40 images in 8x8 patches: no standard
    timm size, a non-square grid, heads that the weights alone do not tell."""
    from mae.weights.convert import export_mae

    torch.manual_seed(0)
    kw = dict(img_size=(24, 40), patch_size=8, in_chans=4, embed_dim=96, depth=3, num_heads=2, mlp_ratio=2.0)
    kw.update(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    model = create_mae("mae_vit_tiny_patch16", **kw).eval()
    export_mae(model.state_dict(), {**kw, "img_size": [24, 40]}, {}, tmp_path / "mae")
    assert main([str(tmp_path / "mae"), str(tmp_path / "timm"), "--to", "timm"]) == 0
    vit = _load_as_the_contract_says(tmp_path / "timm")
    assert tuple(vit.patch_embed.img_size) == (24, 40) and vit.blocks[0].attn.num_heads == 2
    imgs = torch.randn(2, 4, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(
            vit.forward_features(imgs), model.forward_features(imgs), rtol=0, atol=1e-5
        )


def test_a_segmentation_run_exports_and_embeds_its_encoder_and_says_in_one_line_what_it_cannot(
    tmp_path, capsys
):
    """`mae-export` of a segmentation run once ended at `...VisionTransformer:`. Its encoder (which has no final
    norm: the heads read the blocks' outputs) goes to timm and gives there the features mae-embed gives; a full
    MAE (--to hf, --to mae) it cannot give, and one complete line says why."""
    from mae.embed import Embedder
    from mae.weights.build import build_segmenter

    keys = ["recipe=segment_demo", "model.img_size=32", "model.patch_size=8", "model.depth=2",
            "model.embed_dim=32", "model.num_heads=2", "model.seg_channels=8", "model.num_classes=3",
            "model.in_chans=3", "data.mean=[0.5]", "data.std=[0.25]"]  # fmt: skip
    torch.manual_seed(0)
    run = _run_dir(tmp_path, build_segmenter(load_config(keys), 3).eval(), keys)
    out = tmp_path / "timm"
    assert main([str(run), str(out), "--to", "timm"]) == 0
    config = json.loads((out / "config.json").read_text())
    theirs = timm.create_model(config["architecture"], pretrained=True, num_classes=0, **config["model_args"],
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), first_conv=None))  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), Embedder.from_pretrained(run)(x), rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    for to in ("hf", "mae"):
        assert main([str(run), str(tmp_path / to), "--to", to]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "a segmentation run's weights" in err[0] and err[0].endswith("--to timm"), (
            err
        )
