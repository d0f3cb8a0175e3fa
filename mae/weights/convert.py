"""Weights out to other libraries: the encoder to timm (any size, `model_args` in config.json), the full model
to (and from) a Hugging Face ViTMAEForPreTraining directory, and back to our names (`--to mae`); the
architecture of a bare file read from its tensor shapes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mae.weights.formats import load_state_dict_any, mae_to_hf_state_dict, read_recorded

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TIMM_ARCH = {  # (embed_dim, depth, num_heads) -> timm architecture
    (192, 12, 3): "vit_tiny_patch16_224",
    (384, 12, 6): "vit_small_patch16_224",
    (768, 12, 12): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (1280, 32, 16): "vit_huge_patch14_224",
}
SEGMENTATION_HEADS = (
    "decode_head.",
    "neck.",
    "aux_head.",
)  # a segmentation run's own layers, not its encoder
DETECTION_PARTS = (
    "pyramid.",
    "rpn.",
    "roi_heads.",
)  # a detection run's own layers, beside its ViTDet backbone
NOT_A_VIT = (
    "a detection run's weights: its ViTDet backbone (window attention with relative position biases, no class "
    "token) has no counterpart in timm's or Hugging Face's ViT or the MAE release"
)
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 128: 4, 256: 8, 512: 16}  # width -> heads


class ExportError(ValueError):
    """A user-facing problem with the source or the options (one line, exit code 2)."""


def is_detection(sd: dict) -> bool:
    """Whether a state dict is a detection model's (mae.models.detection.MaskRCNNViT)."""
    return any(k.startswith(DETECTION_PARTS) or ".attn.rel_pos_" in k for k in sd)


def _without_decoder(sd: dict) -> str:
    """What a source without a decoder is, for the message."""
    if any(k.startswith(SEGMENTATION_HEADS) for k in sd):
        return "a segmentation run's weights: its encoder and heads"
    return "a classifier's weights" if "head.weight" in sd else "encoder-only weights"


def _first_line(e: BaseException) -> str:
    """The first line of an error, without a trailing colon that announces lines left out."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0].rstrip(":") if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------------------
# what the source is


def _count_blocks(sd: dict, prefix: str) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})


def infer_mae_args(sd: dict, num_heads: int | None = None, decoder_num_heads: int | None = None) -> dict:
    """MaskedAutoencoder arguments read from tensor shapes; head counts from the standard sizes."""
    w, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    if grid * grid != pos.shape[1] - 1:
        raise ExportError("pos_embed is not a square grid; pass a source with a config")
    dim = w.shape[0]
    args = dict(
        img_size=grid * w.shape[2],
        patch_size=w.shape[2],
        in_chans=w.shape[1],
        embed_dim=dim,
        depth=_count_blocks(sd, "blocks"),
        num_heads=num_heads or STANDARD_HEADS.get(dim),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
    )
    if "decoder_embed.weight" in sd:
        dec = sd["decoder_embed.weight"].shape[0]
        heads = decoder_num_heads or STANDARD_HEADS.get(dec)
        args.update(
            decoder_embed_dim=dec, decoder_depth=_count_blocks(sd, "decoder_blocks"), decoder_num_heads=heads
        )
    missing = [k for k in ("num_heads", "decoder_num_heads") if k in args and args[k] is None]
    if missing:
        raise ExportError(
            f"cannot tell {' and '.join(missing)} from the weights; pass --{missing[0].replace('_', '-')}"
        )
    return args


def describe_source(source: str | Path, opts: argparse.Namespace | None = None) -> tuple[dict, dict, dict]:
    """(state dict in our names, MaskedAutoencoder arguments, extras: mask_ratio, mean, std, crop_pct)."""
    sd = load_state_dict_any(source)
    if is_detection(sd):
        raise ExportError(
            f"{source} is {NOT_A_VIT}; it initialises another detection run (model.init={source})"
        )
    args, extras = read_recorded(source)
    if args is None:
        args = infer_mae_args(sd, getattr(opts, "num_heads", None), getattr(opts, "decoder_num_heads", None))
    if opts is not None:
        for key in ("num_heads", "decoder_num_heads", "norm_pix_loss"):
            if getattr(opts, key, None) is not None:
                args[key] = getattr(opts, key)
        if opts.mask_ratio is not None:
            extras["mask_ratio"] = opts.mask_ratio
    return sd, args, extras


# ----------------------------------------------------------------------------------------------------------
# writers


def timm_architecture(embed_dim: int, depth: int, num_heads: int) -> str:
    """The timm name whose defaults the model args override: the standard ViT of these sizes, else the
    standard one of this width, else ViT-B/16. Every size is in `model_args`, so the name only labels."""
    exact = TIMM_ARCH.get((embed_dim, depth, num_heads))
    if exact is not None:
        return exact
    return next((a for (w, _, _), a in TIMM_ARCH.items() if w == embed_dim), TIMM_ARCH[(768, 12, 12)])


def timm_model_args(args: dict, global_pool: str) -> dict:
    """timm VisionTransformer arguments for MaskedAutoencoder arguments: any width, depth, heads, image and
    patch size (square or (H, W)) and channel count; LayerNorm eps 1e-6 and qkv bias are timm's defaults."""

    def size(v):
        return list(v) if isinstance(v, (tuple, list)) else int(v)

    return dict(
        img_size=size(args["img_size"]),
        patch_size=size(args["patch_size"]),
        in_chans=int(args["in_chans"]),
        embed_dim=int(args["embed_dim"]),
        depth=int(args["depth"]),
        num_heads=int(args["num_heads"]),
        mlp_ratio=float(args.get("mlp_ratio", 4.0)),
        global_pool=global_pool,
    )


def export_timm(sd: dict, args: dict, extras: dict, out_dir: str | Path) -> Path:
    """Encoder -> OUT_DIR/model.safetensors + config.json for timm (classifier head too, when present)."""
    import timm
    from safetensors.torch import save_file

    encoder = {
        k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token", *SEGMENTATION_HEADS))
    }
    num_classes = encoder["head.weight"].shape[0] if "head.weight" in encoder else 0
    unnormed = "norm.weight" not in encoder and "fc_norm.weight" not in encoder  # a segmentation encoder
    global_pool = "avg" if "fc_norm.weight" in encoder or unnormed else "token"
    model_args = timm_model_args(args, global_pool)
    if unnormed:  # its heads read the blocks' outputs as they are: timm without a final norm does the same
        model_args.update(final_norm=False, fc_norm=False)
    arch = timm_architecture(model_args["embed_dim"], model_args["depth"], model_args["num_heads"])
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    try:  # proves the file loads into timm before it is written
        model.load_state_dict(encoder, strict=True)
    except RuntimeError as e:
        raise ExportError(
            f"the encoder does not load into timm's VisionTransformer: {_first_line(e)}"
        ) from None
    C, mean, std = args["in_chans"], extras.get("mean"), extras.get("std")
    if mean is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if C == 3 else ([0.5] * C, [0.5] * C)
    H, W = model.patch_embed.img_size
    recorded_crop = extras.get("crop_pct")
    if recorded_crop is not None:  # the run's evaluation crop (0: the reference's rule, resolved here)
        from mae.data.transforms import eval_crop_pct

        crop_pct = eval_crop_pct(recorded_crop, min(H, W))
    else:
        crop_pct = 0.9
    config = dict(
        architecture=arch,
        num_classes=num_classes,
        num_features=model_args["embed_dim"],
        global_pool=global_pool,
        model_args=model_args,
        pretrained_cfg=dict(
            tag="mae",
            custom_load=False,
            input_size=[C, H, W],
            fixed_input_size=True,
            interpolation="bicubic",
            crop_pct=crop_pct,
            crop_mode="center",
            mean=list(mean),
            std=list(std),
            num_classes=num_classes,
            pool_size=None,
            first_conv="patch_embed.proj",
            classifier="head",
        ),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def hf_config_dict(args: dict, mask_ratio: float = 0.75) -> dict:
    """ViTMAEConfig arguments for our MaskedAutoencoder arguments (LayerNorm eps 1e-6 as ours)."""
    mlp = args.get("mlp_ratio", 4.0)
    return dict(
        hidden_size=args["embed_dim"],
        num_hidden_layers=args["depth"],
        num_attention_heads=args["num_heads"],
        intermediate_size=int(args["embed_dim"] * mlp),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,
        image_size=args["img_size"],
        patch_size=args["patch_size"],
        num_channels=args["in_chans"],
        qkv_bias=True,
        decoder_hidden_size=args["decoder_embed_dim"],
        decoder_num_hidden_layers=args["decoder_depth"],
        decoder_num_attention_heads=args["decoder_num_heads"],
        decoder_intermediate_size=int(args["decoder_embed_dim"] * mlp),
        mask_ratio=mask_ratio,
        norm_pix_loss=bool(args.get("norm_pix_loss", False)),
    )


def export_hf(sd: dict, args: dict, extras: dict, out_dir: str | Path) -> Path:
    """Full model -> a `save_pretrained` directory of transformers' ViTMAEForPreTraining."""
    from safetensors.torch import save_file

    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError:
        raise ExportError("--to hf needs transformers: pip install 'mae[hf]'") from None
    if "decoder_embed.weight" not in sd:
        raise ExportError(f"the source has no decoder ({_without_decoder(sd)}); --to hf writes a full MAE: "
                          "export the encoder with --to timm")  # fmt: skip
    if isinstance(args["img_size"], (tuple, list)) or isinstance(args["patch_size"], (tuple, list)):
        raise ExportError("Hugging Face ViTMAE needs square images and patches")
    model = ViTMAEForPreTraining(ViTMAEConfig(**hf_config_dict(args, extras.get("mask_ratio", 0.75))))
    style = "v5" if any(k.startswith("vit.layers.") for k in model.state_dict()) else "v4"
    model.load_state_dict(mae_to_hf_state_dict(sd, style), strict=True)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    # The weights are rewritten with transformers 4.x names, which 4.x and 5.x both load (5.x renames on
    # load); 5.x's own save names the decoder layers in a way 4.x does not read.
    for f in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        f.unlink()
    tensors = {k: v.contiguous() for k, v in mae_to_hf_state_dict(sd, "v4").items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def export_mae(sd: dict, args: dict, extras: dict, out_dir: str | Path) -> Path:
    """Our names -> OUT_DIR/model.safetensors + config.json (`mae_model_args` = MaskedAutoencoder arguments)."""
    from safetensors.torch import save_file

    from mae.models import MaskedAutoencoder

    if "decoder_embed.weight" not in sd:
        raise ExportError(f"the source has no decoder ({_without_decoder(sd)}); --to mae writes a full MAE: "
                          "export the encoder with --to timm")  # fmt: skip
    with torch.device("meta"):
        try:  # complete and consistent
            MaskedAutoencoder(**args).load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise ExportError(
                f"the weights do not load into the MAE they describe: {_first_line(e)}"
            ) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    config = {"mae_model_args": args, **{k: v for k, v in extras.items() if v is not None}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


WRITERS = {"timm": export_timm, "hf": export_hf, "mae": export_mae}
