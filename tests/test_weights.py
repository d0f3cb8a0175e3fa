"""Reading weights from every supported source and initialising models from them."""

import argparse
import os

import pytest
import timm
import torch
from _model_utils import interpolate_pos_embed as reference_interpolate_pos_embed
from _model_utils import reference_mae
from safetensors.torch import save_file

from mae.models import create_mae, create_vit, sincos_pos_embed_2d
from mae.weights import (
    hf_to_mae_state_dict,
    interpolate_pos_embed,
    load_encoder_into_vit,
    load_mae_weights,
    load_state_dict_any,
    mae_to_hf_state_dict,
)

TINY = dict(img_size=32, patch_size=8)


@pytest.fixture(scope="module")
def mae_model():
    torch.manual_seed(0)
    return create_mae("mae_vit_tiny_patch16", **TINY).eval()


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- files and directories -----------------------------------------------------------------------------


def test_reads_safetensors_and_reference_pth_with_its_extras(tmp_path, mae_model):
    sd = mae_model.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert _same(load_state_dict_any(tmp_path / "w.safetensors"), sd)
    # a reference training checkpoint: model + optimizer + epoch + argparse args
    ckpt = {
        "model": sd,
        "optimizer": {"param_groups": [{"lr": 0.1}]},
        "epoch": 3,
        "args": argparse.Namespace(lr=1),
    }
    torch.save(ckpt, tmp_path / "checkpoint-3.pth")
    assert _same(load_state_dict_any(tmp_path / "checkpoint-3.pth"), sd)
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    assert _same(load_state_dict_any(tmp_path / "ddp.pt"), sd)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_refuses_arbitrary_pickles_and_names_missing_paths(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "x": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_state_dict_any(tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_state_dict_any(tmp_path / "nope.pth")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(FileNotFoundError, match="checkpoint-last"):
        load_state_dict_any(tmp_path / "empty_run")


def test_run_directory_resolves_to_latest_checkpoint(tmp_path, mae_model):
    run = tmp_path / "run"
    (run / "checkpoint-00000010").mkdir(parents=True)
    (run / "checkpoint-00000020").mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    old = {k: torch.zeros_like(v) for k, v in mae_model.state_dict().items()}
    save_file(old, str(run / "checkpoint-00000010" / "model.safetensors"))
    save_file(mae_model.state_dict(), str(run / "checkpoint-00000020" / "model.safetensors"))
    assert _same(load_state_dict_any(run), mae_model.state_dict())  # latest by name without the link
    (run / "checkpoint-last").symlink_to("checkpoint-00000010")
    assert _same(load_state_dict_any(run), old)  # the link decides when present
    assert _same(load_state_dict_any(run / "checkpoint-00000020"), mae_model.state_dict())


def test_hf_names_roundtrip_both_transformers_generations(mae_model):
    sd = mae_model.state_dict()
    for style in ("v4", "v5"):
        hf = mae_to_hf_state_dict(sd, style)
        assert "vit.embeddings.position_embeddings" in hf and "decoder.decoder_pred.weight" in hf
        assert _same(hf_to_mae_state_dict(hf), sd)
    v4 = mae_to_hf_state_dict(sd, "v4")
    torch.testing.assert_close(
        v4["vit.encoder.layer.0.attention.attention.key.weight"], sd["blocks.0.attn.qkv.weight"][192:384]
    )
    with pytest.raises(ValueError, match="unrecognised"):
        hf_to_mae_state_dict(
            {"vit.embeddings.cls_token": sd["cls_token"], "vit.pooler.dense.weight": sd["norm.weight"]}
        )


# ---- initialising the classifier -----------------------------------------------------------------------

HEAD = ["head.bias", "head.weight"]
FC_NORM = ["fc_norm.bias", "fc_norm.weight"]


def _reference_files(tmp_path):
    torch.manual_seed(1)
    ref = reference_mae("tiny", **TINY)
    full = ref.state_dict()
    encoder = {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": full}, tmp_path / "mae_visualize_vit_tiny.pth")
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_tiny.pth")
    return full


@pytest.mark.parametrize("global_pool", [True, False])
def test_each_init_path_loads_with_only_head_and_fc_norm_missing(tmp_path, mae_model, global_pool):
    full = _reference_files(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoint-00000005").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    save_file(mae_model.state_dict(), str(run / "checkpoint-00000005" / "model.safetensors"))
    (run / "checkpoint-last").symlink_to("checkpoint-00000005")
    timm_vit = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **TINY)
    save_file(timm_vit.state_dict(), str(tmp_path / "timm.safetensors"))

    expected_missing = sorted(HEAD + FC_NORM) if global_pool else HEAD
    sources = {
        "ours": (run, mae_model.state_dict()),
        "reference encoder-only": (tmp_path / "mae_pretrain_vit_tiny.pth", full),
        "reference full": (tmp_path / "mae_visualize_vit_tiny.pth", full),
        "timm file": (tmp_path / "timm.safetensors", timm_vit.state_dict()),
        "timm state dict": (timm_vit.state_dict(), timm_vit.state_dict()),
    }
    for what, (source, weights) in sources.items():
        vit = create_vit("vit_tiny_patch16", num_classes=5, global_pool=global_pool, **TINY)
        missing, unexpected = load_encoder_into_vit(vit, source, verbose=False)
        assert (sorted(missing), unexpected) == (expected_missing, []), what
        own = vit.state_dict()
        for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.mlp.fc2.weight"):
            assert torch.equal(own[k], weights[k]), (what, k)
        if not global_pool:
            assert torch.equal(own["norm.weight"], weights["norm.weight"]), what


def test_loaded_classifier_features_equal_the_mae_encoder(mae_model):
    vit = create_vit("vit_tiny_patch16", num_classes=5, global_pool=False, **TINY).eval()
    load_encoder_into_vit(vit, mae_model.state_dict(), verbose=False)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            vit.forward_features(imgs), mae_model.forward_features(imgs), rtol=0, atol=1e-6
        )


def test_channel_mismatch_is_a_clear_error(mae_model):
    vit = create_vit("vit_tiny_patch16", num_classes=5, in_chans=1, **TINY)
    with pytest.raises(ValueError, match="3 input channels.*in_chans"):
        load_encoder_into_vit(vit, mae_model.state_dict(), verbose=False)


def test_pos_interpolation_224_to_256_keeps_the_table_smooth_and_the_cls_row():
    src = sincos_pos_embed_2d(192, 14).unsqueeze(0)
    src[:, 0] = torch.randn(192)  # a trained cls row must survive untouched
    vit = create_vit("vit_tiny_patch16", num_classes=5, img_size=256)
    load_encoder_into_vit(vit, {"pos_embed": src}, verbose=False)
    out = vit.pos_embed.detach()
    ref = {"pos_embed": src.clone()}
    reference_interpolate_pos_embed(vit, ref)
    torch.testing.assert_close(out, ref["pos_embed"], rtol=0, atol=0)  # the reference's semantics
    assert torch.equal(out[0, 0], src[0, 0])
    # the resized table is the sin-cos function sampled where the new token centres fall on the old grid
    c = (torch.arange(16, dtype=torch.float64) + 0.5) * 14 / 16 - 0.5
    omega = 1.0 / 10000 ** (torch.arange(48, dtype=torch.float64) / 48)
    h, w = torch.meshgrid(c, c, indexing="ij")
    ow, oh = w.reshape(-1, 1) * omega, h.reshape(-1, 1) * omega
    analytic = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1).float().reshape(16, 16, 192)
    err = (out[0, 1:].reshape(16, 16, 192) - analytic).abs()[4:12, 4:12]  # centre 8 x 8 tokens
    assert err.max() < 0.05 and err.mean() < 0.005
    assert torch.equal(interpolate_pos_embed(src, (14, 14)), src)


# ---- full MAE weights ----------------------------------------------------------------------------------


def test_load_mae_weights_reference_full_and_encoder_only(tmp_path):
    full = _reference_files(tmp_path)
    model = create_mae("mae_vit_tiny_patch16", **TINY)
    load_mae_weights(model, tmp_path / "mae_visualize_vit_tiny.pth")
    assert _same(model.state_dict(), full)
    with pytest.raises(ValueError, match="encoder-only"):
        load_mae_weights(create_mae("mae_vit_tiny_patch16", **TINY), tmp_path / "mae_pretrain_vit_tiny.pth")


def test_load_mae_weights_other_resolution_keeps_own_tables(mae_model):
    model = create_mae("mae_vit_tiny_patch16", img_size=48, patch_size=8)
    load_mae_weights(model, mae_model.state_dict())
    assert torch.equal(model.blocks[3].attn.qkv.weight, mae_model.blocks[3].attn.qkv.weight)
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(192, 6))
