import numpy as np
import pytest
import torch
from PIL import Image

from mae.eval.figures import reconstruct
from mae.models import create_mae
from mae.viz import main as viz_main
from tests.conftest import TINY_FMNIST, needs_fmnist


@pytest.mark.parametrize("norm_pix", [False, True])
def test_panels_keep_visible_patches_and_fill_masked_ones(norm_pix):
    torch.manual_seed(0)
    model = create_mae(
        "mae_vit_tiny_patch16",
        img_size=32,
        patch_size=8,
        in_chans=3,
        depth=1,
        embed_dim=48,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        norm_pix_loss=norm_pix,
    )
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    orig, masked, recon, pasted = reconstruct(model, imgs, 0.75, noise)
    _, pred, mask = model(imgs, 0.75, noise)
    m = model.unpatchify(mask.unsqueeze(-1).expand_as(pred))  # 1 = removed
    assert torch.equal(orig, imgs)
    assert torch.equal(masked * m, torch.zeros_like(imgs)) and torch.equal(masked * (1 - m), imgs * (1 - m))
    torch.testing.assert_close(pasted * (1 - m), imgs * (1 - m))  # visible patches pasted back
    torch.testing.assert_close(pasted * m, recon * m)
    if norm_pix:  # de-normalised with each patch's own statistics
        target = model.patchify(imgs)
        expect = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        torch.testing.assert_close(recon, model.unpatchify(expect))
    else:
        torch.testing.assert_close(recon, model.unpatchify(pred))


@needs_fmnist
def test_mae_viz_draws_any_images_from_a_run(tmp_path, capsys):
    from skimage import data as skdata

    from mae.pretrain import main

    out = tmp_path / "run"
    assert main(TINY_FMNIST + [f"output_dir={out}", "train.max_steps=2"]) == 0
    photo, gray = tmp_path / "astronaut.png", tmp_path / "camera.png"
    Image.fromarray(skdata.astronaut()).save(photo)  # RGB photo into a 1-channel model
    Image.fromarray(skdata.camera()).save(gray)
    png = tmp_path / "recon.png"
    assert viz_main([str(out), str(photo), str(gray), "--out", str(png)]) == 0
    img = np.asarray(Image.open(png))
    assert img.shape[0] > img.shape[1] / 4 and img.shape[1] > 4 * 112  # 2 rows, 4 panels of >= 112 px
    assert viz_main([str(out), str(tmp_path / "missing.png")]) == 2
    assert "image not found" in capsys.readouterr().err
