"""The MAE model and the ViT classifier: exactness to the reference release, backends, interop with timm."""

import logging

import pytest
import timm
import torch
from _model_utils import get_2d_sincos_pos_embed, reference_mae

from mae.models import (
    Attention,
    backends,
    count_params,
    create_mae,
    create_vit,
    layer_id,
    list_models,
    resolve_attn_backend,
    sincos_pos_embed_2d,
)
from mae.models import vit as vit_module

TINY = dict(img_size=32, patch_size=8)  # 16 patches: fast, and enough to see the order of things


def tiny_mae(**kw):
    return create_mae("mae_vit_tiny_patch16", **{**TINY, **kw})


def _has_xformers_cuda() -> bool:
    """xformers imports and its kernel runs here (a wheel built for another torch imports, then raises)."""
    if vit_module._xformers_ops() is None or not torch.cuda.is_available():
        return False
    return backends.prove("xformers", torch.device("cuda"), torch.float32, 4, 16) == ""


# ---- registry and parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size, total, trainable",
    [
        ("mae_vit_base_patch16", "base", 111_907_840, 111_655_680),
        ("mae_vit_large_patch16", "large", 329_541_888, None),
        ("mae_vit_huge_patch14", "huge", 657_074_508, None),
    ],
)
def test_state_dict_and_counts_match_reference(name, size, total, trainable):
    with torch.device("meta"):
        ours, ref = create_mae(name), reference_mae(size)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert count_params(ours) == count_params(ref) == total  # the published counts of the reference
    if trainable is not None:
        assert count_params(ours, trainable_only=True) == trainable
        encoder = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith(("decoder", "mask")))
        assert encoder == 85_798_656
    assert not ours.pos_embed.requires_grad and not ours.decoder_pos_embed.requires_grad


def test_registry_names_and_errors():
    names = list_models()
    for size, patch in [("tiny", 16), ("small", 16), ("base", 16), ("large", 16), ("huge", 14)]:
        assert f"mae_vit_{size}_patch{patch}" in names and f"vit_{size}_patch{patch}" in names
    with pytest.raises(ValueError, match="mae_vit_base_patch16"):
        create_mae("mae_vit_bas_patch16")
    with pytest.raises(TypeError, match="decoder_depth"):
        create_mae("mae_vit_tiny_patch16", decoder_dept=2)
    with pytest.raises(ValueError, match="divisible"):
        create_mae("mae_vit_tiny_patch16", img_size=30, patch_size=8)


def test_encoder_sizes_and_attributes():
    with torch.device("meta"):
        for name, dim, depth, heads in [
            ("mae_vit_tiny_patch16", 192, 12, 3),
            ("mae_vit_small_patch16", 384, 12, 6),
            ("mae_vit_large_patch16", 1024, 24, 16),
            ("mae_vit_huge_patch14", 1280, 32, 16),
        ]:
            m = create_mae(name)
            assert (m.embed_dim, m.depth, m.blocks[0].attn.num_heads) == (dim, depth, heads)
            assert m.norm.eps == 1e-6 and m.blocks[0].attn.qkv.bias is not None
            assert m.blocks[0].mlp.fc1.out_features == 4 * dim
    m = tiny_mae(in_chans=4, norm_pix_loss=True)
    assert m.patch_embed.patch_size == (8, 8) and m.patch_embed.num_patches == 16
    assert m.in_chans == 4 and m.norm_pix_loss


def test_init_is_the_references_for_the_same_seed():
    torch.manual_seed(0)
    ref = reference_mae("tiny", img_size=32, patch_size=8)
    torch.manual_seed(0)
    ours = tiny_mae()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # the distributions themselves: zero Linear biases, LayerNorm 1/0, tokens ~ N(0, 0.02)
    assert all(b.abs().max() == 0 for n, b in ours.named_parameters() if n.endswith("qkv.bias"))
    assert ours.patch_embed.proj.bias.abs().max() > 0  # torch's default init, as the reference
    assert 0.01 < ours.mask_token.std() < 0.03


def test_sincos_table_is_the_references():
    for dim, grid in [(192, 14), (64, 4), (512, 7)]:
        ref = torch.from_numpy(get_2d_sincos_pos_embed(dim, grid, cls_token=True)).float()
        torch.testing.assert_close(sincos_pos_embed_2d(dim, grid), ref, rtol=0, atol=0)
    table = sincos_pos_embed_2d(8, (2, 3))  # quarters [sin w, cos w, sin h, cos h], row-major tokens
    assert table[0].abs().max() == 0
    h, w = 1, 2  # token 1 + h * 3 + w
    expected = torch.tensor([2.0, 2.0, 1.0, 1.0]) + torch.tensor([0.0, 1.0, 0.0, 1.0]) * torch.pi / 2
    torch.testing.assert_close(table[1 + h * 3 + w, [0, 2, 4, 6]], expected.sin())  # frequency 1


# ---- masking, loss, patches ----------------------------------------------------------------------------


@pytest.mark.parametrize("L, ratio", [(16, 0.75), (49, 0.75), (10, 0.6), (7, 0.5)])
def test_masking_keeps_smallest_noise_in_original_order(L, ratio):
    model = tiny_mae()
    x = torch.randn(3, L, 5)
    noise = torch.rand(3, L)
    kept, mask, ids_restore = model.random_masking(x, ratio, noise)
    len_keep = int(L * (1 - ratio))
    order = noise.argsort(dim=1)
    assert kept.shape == (3, len_keep, 5)
    for n in range(3):
        assert torch.equal(kept[n], x[n, order[n, :len_keep]])
        expected = torch.ones(L)
        expected[order[n, :len_keep]] = 0  # 1 = removed, indexed by original patch position
        assert torch.equal(mask[n], expected)
        assert torch.equal(order[n][ids_restore[n]], torch.arange(L))


def test_same_noise_same_output_and_rand_without_noise():
    model = tiny_mae().eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    a, b = model(imgs, noise=noise), model(imgs, noise=noise.clone())
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = model(imgs, noise=torch.rand(2, 16))
    assert not torch.equal(a[2], c[2])
    torch.manual_seed(3)
    d = model(imgs)
    torch.manual_seed(3)
    e = model(imgs, noise=torch.rand(2, 16))
    assert all(torch.equal(u, v) for u, v in zip(d, e))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_is_mean_masked_patch_mse(norm_pix_loss):
    model = tiny_mae(norm_pix_loss=norm_pix_loss, in_chans=1)
    imgs = torch.rand(2, 1, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    p = 8
    total, count = 0.0, 0
    for n in range(2):
        for i in range(4):
            for j in range(4):
                if mask[n, i * 4 + j] == 1:
                    target = imgs[n, 0, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(-1)  # row-major
                    if norm_pix_loss:
                        target = (target - target.mean()) / (target.var(unbiased=True) + 1e-6).sqrt()
                    total += ((pred[n, i * 4 + j] - target) ** 2).mean()
                    count += 1
    assert count == 2 * 12
    torch.testing.assert_close(loss, total / count, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("C", [1, 3, 4])
def test_patchify_roundtrip_and_layout(C):
    model = tiny_mae(in_chans=C)
    imgs = torch.randn(2, C, 32, 32)
    x = model.patchify(imgs)
    assert x.shape == (2, 16, 8 * 8 * C)
    assert torch.equal(model.unpatchify(x), imgs)
    # element (row r, col q, channel c) of patch (i, j) sits at (r * p + q) * C + c
    i, j, r, q, c = 1, 2, 3, 5, C - 1
    assert x[0, i * 4 + j, (r * 8 + q) * C + c] == imgs[0, c, i * 8 + r, j * 8 + q]


def test_bad_inputs_name_the_problem():
    model = tiny_mae()
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="noise"):
        model(torch.randn(1, 3, 32, 32), noise=torch.rand(1, 15))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=1.0)


# ---- exactness to the reference ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, name, img, C, norm_pix",
    [
        ("tiny", "mae_vit_tiny_patch16", 64, 3, True),
        ("tiny", "mae_vit_tiny_patch16", 48, 1, False),
        pytest.param("base", "mae_vit_base_patch16", 224, 3, True, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_matches_reference_on_shared_weights_and_noise(size, name, img, C, norm_pix, backend):
    ref = reference_mae(size, img_size=img, in_chans=C, norm_pix_loss=norm_pix)
    ours = create_mae(name, img_size=img, in_chans=C, norm_pix_loss=norm_pix, attn_backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    imgs = torch.randn(2, C, img, img)
    L = (img // 16) ** 2
    noise = torch.rand(2, L)
    with torch.no_grad():
        loss_r, pred_r, mask_r = ref(imgs, mask_ratio=0.75, noise=noise)
        loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, mask_r)
    torch.testing.assert_close(pred, pred_r, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, loss_r, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.unpatchify(pred), ref.unpatchify(pred_r), rtol=0, atol=1e-5)


def test_forward_features_is_the_unmasked_encoder_in_original_order():
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 32, 32)
    identity_noise = torch.arange(16.0).expand(2, 16)  # keeps every patch, order unchanged
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.0, identity_noise)
        feats = model.forward_features(imgs)
    assert feats.shape == (2, 17, 192) and mask.sum() == 0
    torch.testing.assert_close(feats, latent)


# ---- attention backends --------------------------------------------------------------------------------


@pytest.mark.parametrize("B, N, dim, heads", [(2, 17, 64, 4), (3, 50, 96, 3), (1, 5, 48, 6)])
def test_math_and_sdpa_agree_on_outputs_and_gradients(B, N, dim, heads):
    torch.manual_seed(0)
    attn = Attention(dim, heads, backend="math")
    x = torch.randn(B, N, dim, requires_grad=True)
    results = {}
    for backend in ("math", "sdpa"):
        attn.backend = backend
        attn.zero_grad()
        x.grad = None
        y = attn(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[backend] = (y.detach(), x.grad.clone(), attn.qkv.weight.grad.clone())
    for a, b in zip(results["math"], results["sdpa"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_model_backends_agree_with_gradients():
    torch.manual_seed(0)
    a = tiny_mae(attn_backend="math")
    b = tiny_mae(attn_backend="sdpa")
    b.load_state_dict(a.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    la, lb = a(imgs, mask_ratio=0.7, noise=noise)[0], b(imgs, mask_ratio=0.7, noise=noise)[0]  # 5 visible
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.skipif(not _has_xformers_cuda(), reason="needs a CUDA device and an xformers that runs on it")
def test_xformers_matches_sdpa_on_cuda():
    torch.manual_seed(0)
    attn = Attention(64, 4, backend="sdpa").cuda()
    x = torch.randn(2, 17, 64, device="cuda")
    ref = attn(x)
    attn.backend = "xformers"
    torch.testing.assert_close(attn(x), ref, rtol=0, atol=1e-4)


def test_backend_choice_env_override_and_fallback(monkeypatch, caplog):
    monkeypatch.delenv("MAE_ATTN_BACKEND", raising=False)
    assert tiny_mae(attn_backend="math").blocks[0].attn.backend == "math"
    monkeypatch.setenv("MAE_ATTN_BACKEND", "sdpa")
    model = tiny_mae(attn_backend="math")  # the environment is read when the model is built
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"sdpa"}
    monkeypatch.setenv("MAE_ATTN_BACKEND", "fast")
    with pytest.raises(ValueError, match="MAE_ATTN_BACKEND"):
        tiny_mae()
    monkeypatch.delenv("MAE_ATTN_BACKEND")
    with pytest.raises(ValueError, match="attn_backend"):
        tiny_mae(attn_backend="flash")
    if vit_module._xformers_ops() is None:
        vit_module._warn_once.cache_clear()
        with caplog.at_level(logging.WARNING, logger="mae.models.vit"):
            model = tiny_mae(attn_backend="xformers")
        assert model.blocks[0].attn.backend == "sdpa"
        assert len([r for r in caplog.records if "xformers" in r.getMessage()]) == 1
        assert resolve_attn_backend("auto") == "sdpa"


# ---- interop with timm and the classifier --------------------------------------------------------------


def test_base_encoder_loads_strict_into_timm_with_same_features():
    torch.manual_seed(0)
    mae = create_mae("mae_vit_base_patch16").eval()
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    vit.load_state_dict(encoder, strict=True)
    imgs = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), mae.forward_features(imgs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("global_pool", [True, False])
def test_vit_classifier_is_key_and_output_identical_to_timm(global_pool):
    ours = create_vit(
        "vit_tiny_patch16", num_classes=7, global_pool=global_pool, img_size=32, patch_size=8
    ).eval()
    theirs = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=7,
        img_size=32,
        patch_size=8,
        global_pool="avg" if global_pool else "token",
    ).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert ("fc_norm.weight" in ours.state_dict()) == global_pool
    assert ("norm.weight" in ours.state_dict()) != global_pool
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(imgs), theirs(imgs), rtol=0, atol=1e-5)
        feats = ours.forward_features(imgs)
        assert feats.shape == (3, 17, 192)
        torch.testing.assert_close(ours.forward_head(feats), ours(imgs))
        assert ours.forward_head(feats, pre_logits=True).shape == (3, 192)
    assert isinstance(create_vit("vit_tiny_patch16", num_classes=0, img_size=32).head, torch.nn.Identity)


@pytest.mark.parametrize("global_pool", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        dict(indices=None),
        dict(indices=2, norm=True),
        dict(indices=[0, -1], output_fmt="NLC"),
        dict(indices=[1, 2], return_prefix_tokens=True, stop_early=True),
        dict(indices=[3], norm=True, output_fmt="NLC", intermediates_only=True),
    ],
)
def test_forward_intermediates_equals_timms_on_the_same_weights(global_pool, kw):
    """A head written against timm's VisionTransformer.forward_intermediates reads our encoder unchanged."""
    torch.manual_seed(0)
    ours = create_vit("vit_tiny_patch16", num_classes=0, global_pool=global_pool, img_size=32, patch_size=8,
                      depth=4).eval()  # fmt: skip
    theirs = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=4,
                               global_pool="avg" if global_pool else "token").eval()  # fmt: skip
    theirs.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = ours.forward_intermediates(imgs, **kw), theirs.forward_intermediates(imgs, **kw)
    if not kw.get("intermediates_only"):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)  # the final normed tokens
        got, want = got[1], want[1]
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        for a, b in zip(g, w) if isinstance(g, tuple) else [(g, w)]:
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_forward_intermediates_of_the_mae_encoder_and_other_grids():
    """The MAE's unmasked encoder gives the same block features as a ViT with its weights; images of another
    size (multiples of the patch) get the position table resampled to their grid, as timm's dynamic size."""
    torch.manual_seed(0)
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=3).eval()
    vit = create_vit("vit_tiny_patch16", num_classes=0, global_pool=False, img_size=32, patch_size=8, depth=3)
    vit.load_state_dict({k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))})
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = mae.forward_intermediates(
            imgs, indices=1, norm=True, output_fmt="NLC", intermediates_only=True
        )
        torch.testing.assert_close(last[0], mae.forward_features(imgs)[:, 1:], rtol=0, atol=1e-6)
        torch.testing.assert_close(
            last[0],
            vit.eval().forward_intermediates(
                imgs, indices=1, norm=True, output_fmt="NLC", intermediates_only=True
            )[0],
            rtol=0,
            atol=1e-6,
        )
        wide = vit.forward_intermediates(torch.randn(2, 3, 32, 48), indices=[0, 2], intermediates_only=True)
        theirs = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=3,
                                   global_pool="token", dynamic_img_size=True).eval()  # fmt: skip
        theirs.load_state_dict(vit.state_dict(), strict=True)
        x = torch.randn(2, 3, 32, 48)
        ours = vit.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        want = theirs.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert [tuple(w.shape) for w in wide] == [(2, 192, 4, 6)] * 2
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of"):
        vit.forward_intermediates(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="output_fmt"):
        vit.forward_intermediates(imgs, output_fmt="NHWC")


def test_layer_ids_follow_beit():
    vit = create_vit("vit_tiny_patch16", num_classes=10, img_size=32, patch_size=8)
    ids = {n: layer_id(n, vit.depth) for n, _ in vit.named_parameters()}
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.11.mlp.fc2.bias"] == 12
    assert ids["fc_norm.weight"] == ids["head.weight"] == 13


# ---- training modes ------------------------------------------------------------------------------------


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    a = tiny_mae()
    b = tiny_mae(grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    la, lb = a(imgs, noise=noise)[0], b(imgs, noise=noise)[0]
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad)
    vit = create_vit("vit_tiny_patch16", num_classes=3, img_size=32, patch_size=8)
    vit.set_grad_checkpointing(True)
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None


def test_drop_path_is_stochastic_in_training_only():
    vit = create_vit("vit_tiny_patch16", num_classes=3, drop_path_rate=0.5, img_size=32, patch_size=8)
    imgs = torch.randn(4, 3, 32, 32)
    vit.train()
    torch.manual_seed(0)
    a = vit(imgs)
    b = vit(imgs)
    assert not torch.allclose(a, b)
    vit.eval()
    assert torch.equal(vit(imgs), vit(imgs))


def test_bf16_autocast_forward_backward_on_cpu():
    model = tiny_mae(norm_pix_loss=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(torch.randn(4, 3, 32, 32))
    assert pred.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = tiny_mae(norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    eager = model(imgs, noise=noise)[0]
    compiled = torch.compile(model)
    loss = compiled(imgs, noise=noise)[0]
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    assert model.blocks[0].attn.qkv.weight.grad is not None
