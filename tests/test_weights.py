"""Reading weights from every supported source and initialising models from them."""

import argparse
import os

import pytest
import timm
import torch
from _model_utils import reference_mae
from safetensors.torch import save_file

from mae.models import create_mae, create_vit, sincos_pos_embed_2d
from mae.weights.formats import hf_to_mae_state_dict, load_state_dict_any, mae_to_hf_state_dict
from mae.weights.load import load_encoder_into_vit, load_mae_weights

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
    with pytest.raises(ValueError, match="is not a weights file: it holds more than tensors and plain data"):
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


def _features(model, imgs):
    with torch.no_grad():
        return model.forward_features(imgs)


@pytest.mark.parametrize("chans", [1, 6])
def test_rgb_weights_adapt_to_other_channel_counts_as_timm(mae_model, chans):
    """3 -> 1: the filters are summed, so a grey image gives the features its RGB copy gave; 3 -> 6: repeated
    and scaled by 3/6, so six equal bands give them too. The decoder's rows: the mean of the colour rows (1)
    or repeated (6), so each output channel predicts what its colour channel did."""
    from timm.models import adapt_input_conv

    vit = create_vit("vit_tiny_patch16", num_classes=5, in_chans=chans, global_pool=False, **TINY).eval()
    missing, unexpected = load_encoder_into_vit(vit, mae_model.state_dict(), verbose=False)
    assert (sorted(missing), unexpected) == (HEAD, [])
    torch.testing.assert_close(
        vit.patch_embed.proj.weight,
        adapt_input_conv(chans, mae_model.patch_embed.proj.weight),
        rtol=0,
        atol=0,
    )
    grey = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(
        _features(vit, grey.expand(-1, chans, -1, -1)), _features(mae_model, grey.expand(-1, 3, -1, -1)),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    full = create_mae("mae_vit_tiny_patch16", in_chans=chans, **TINY).eval()
    load_mae_weights(full, mae_model.state_dict())
    noise = torch.rand(2, 16)
    with torch.no_grad():
        _, pred, _ = full(grey.expand(-1, chans, -1, -1), noise=noise)
        _, pred3, _ = mae_model(grey.expand(-1, 3, -1, -1), noise=noise)
    pred, pred3 = pred.reshape(2, 16, 64, chans), pred3.reshape(2, 16, 64, 3)
    expected = pred3.mean(-1, keepdim=True) if chans == 1 else pred3.repeat(1, 1, 1, 2)
    torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-5)


def test_a_larger_patch_size_resamples_the_patch_embedding_as_timm():
    """Patch 8 -> 16 on one-patch images: timm's pseudo-inverse resize makes the token of a resized patch the
    token of the original, and the decoder predicts the resized patch."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    small = create_mae("mae_vit_tiny_patch16", img_size=8, patch_size=8, depth=2, decoder_depth=1).eval()
    big = create_mae("mae_vit_tiny_patch16", img_size=16, patch_size=16, depth=2, decoder_depth=1).eval()
    load_mae_weights(big, small.state_dict())
    x = torch.rand(2, 3, 8, 8)
    up = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(_features(big, up), _features(small, x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        _, pred_small, _ = small(x, mask_ratio=0.0)
        _, pred_big, _ = big(up, mask_ratio=0.0)
    resized = F.interpolate(
        small.unpatchify(pred_small), size=(16, 16), mode="bicubic", align_corners=False, antialias=True
    )
    torch.testing.assert_close(big.unpatchify(pred_big), resized, rtol=1e-4, atol=1e-4)


def test_a_sincos_table_is_recomputed_for_the_new_grid_keeping_the_cls_row():
    src = sincos_pos_embed_2d(192, 14).unsqueeze(0)
    src[:, 0] = torch.randn(192)  # a trained cls row must survive untouched
    vit = create_vit("vit_tiny_patch16", num_classes=5, img_size=256)
    load_encoder_into_vit(vit, {**_tiny_encoder(img_size=224), "pos_embed": src}, verbose=False)
    out = vit.pos_embed.detach()
    assert torch.equal(out[0, 0], src[0, 0])
    torch.testing.assert_close(out[0, 1:], sincos_pos_embed_2d(192, 16, cls_token=False), rtol=0, atol=0)


def test_a_learned_table_is_resampled_as_timm_and_stays_smooth():
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    src = sincos_pos_embed_2d(192, 14).unsqueeze(0) + 1e-2 * torch.randn(1, 197, 192)  # learned: not sin-cos
    vit = create_vit("vit_tiny_patch16", num_classes=5, img_size=256)
    load_encoder_into_vit(vit, {**_tiny_encoder(img_size=224), "pos_embed": src}, verbose=False)
    out = vit.pos_embed.detach()
    torch.testing.assert_close(out, resample_abs_pos_embed(src, [16, 16], [14, 14], 1), rtol=0, atol=0)
    assert torch.equal(out[0, 0], src[0, 0])
    # the resampled table is the sin-cos function sampled where the new token centres fall on the old grid
    c = (torch.arange(16, dtype=torch.float64) + 0.5) * 14 / 16 - 0.5
    omega = 1.0 / 10000 ** (torch.arange(48, dtype=torch.float64) / 48)
    h, w = torch.meshgrid(c, c, indexing="ij")
    ow, oh = w.reshape(-1, 1) * omega, h.reshape(-1, 1) * omega
    analytic = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1).float().reshape(16, 16, 192)
    err = (out[0, 1:].reshape(16, 16, 192) - analytic).abs()[4:12, 4:12]  # centre 8 x 8 tokens
    assert err.max() < 0.08 and err.mean() < 0.01


def _tiny_encoder(img_size: int) -> dict:
    vit = create_vit("vit_tiny_patch16", num_classes=0, img_size=img_size, global_pool=False)
    return {k: v for k, v in vit.state_dict().items() if k != "pos_embed"}


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


def test_a_file_that_is_not_weights_says_so_in_one_line_and_never_advises_loading_it_unsafely(tmp_path):
    """A text file named .pth once gave `...weights-only checkpoint: 101`; other non-weights files repeated
    torch's advice that weights_only=False "will likely succeed" (it would run code from the file)."""
    import pickle

    (tmp_path / "notes.pth").write_text("101\n")
    torch.save({"model": {"w": torch.ones(1)}, "x": _Payload()}, tmp_path / "objects.pth")
    with open(tmp_path / "plain.pth", "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, says in (("notes.pth", "not a PyTorch checkpoint"), ("objects.pth", "more than tensors"),
                       ("plain.pth", "more than tensors"), ("empty.pth", "an empty file")):  # fmt: skip
        with pytest.raises(ValueError) as e:
            load_state_dict_any(tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and f"{tmp_path / name} is not a weights file" in msg and says in msg, msg
        assert "weights_only" not in msg and "succeed" not in msg and "trust" not in msg, msg
