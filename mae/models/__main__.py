"""`python -m mae.models`: every registered model with its parameter counts (built on the meta device)."""

import torch

from . import count_params, create_mae, create_vit, list_models


def main() -> int:
    print(f"{'name':<24} {'params':>13} {'trainable':>13} {'encoder':>13}")
    for name in list_models():
        with torch.device("meta"):
            model = create_mae(name) if name.startswith("mae_") else create_vit(name, num_classes=1000)
        total, trainable = count_params(model), count_params(model, trainable_only=True)
        encoder = sum(
            p.numel()
            for n, p in model.named_parameters()
            if not n.startswith(("decoder", "mask_token", "head"))
        )
        print(f"{name:<24} {total:>13,} {trainable:>13,} {encoder:>13,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
