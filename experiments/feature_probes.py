"""Frozen-feature probes for the Fashion-MNIST study: how far each block of the pretrained encoder separates
the classes, measured with exactly the classifiers of the raw-pixel baselines.

For every block of the encoder, the block's tokens are pooled two ways (the cls token; the mean of the patch
tokens) and classified by logistic regression (full-batch L-BFGS, best L2 of the same sweep, features
standardised with the labelled subset's statistics) and by the k-NN monitor's 20-NN, on the study's
class-balanced labelled subsets and the 10,000 test images. Read against `pixel_baselines`, this says
whether the features beat the pixels and at which depth; the last block's normalised cls token is what
the linear-probe runs train on. The last block's normalised patch tokens are also read as a small feature
map (their mean over each cell of a 3x3 grid of patches: spatially laid out, as the pixel classifiers see
the pixels), and the last block's read-outs are scored by the k-NN on a randomly initialised encoder of the
same architecture: what each read-out gives without any learning.

    .venv/bin/python experiments/feature_probes.py runs/study/pretrain     # prints the figures as JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as a script: `experiments` is importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.pixel_baselines import L2_SWEEP, linear_pixels, pixels  # noqa: E402
from mae.data.loaders import SUBSET_SEED  # noqa: E402
from mae.data.sources import label_subset  # noqa: E402
from mae.eval.metrics import knn_top1  # noqa: E402
from mae.runs.record import load_run_config, resolve_checkpoint  # noqa: E402
from mae.weights.build import build_vit  # noqa: E402
from mae.weights.load import load_encoder_into_vit  # noqa: E402


def encoder(run: str | Path, pretrained: bool = True) -> torch.nn.Module:
    """The pretraining run's encoder as a ViT (cls-token pooling, final norm kept, no head), eval mode; with
    `pretrained=False`, the same architecture at its random initialisation (seeded)."""
    _, run_dir = resolve_checkpoint(run)
    cfg = load_run_config(run_dir)
    cfg.model.global_pool, cfg.model.drop_path = False, 0.0
    torch.manual_seed(0)
    vit = build_vit(cfg, num_classes=0)
    if pretrained:
        load_encoder_into_vit(vit, run, verbose=False)
    return vit.eval()


@torch.no_grad()
def block_features(vit: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> dict[str, torch.Tensor]:
    """{"block{b}/cls", "block{b}/mean"} (N, D) for b = 1..depth, "final/cls" (the last block after the final
    norm: the linear probe's input) and "final/grid" (N, D * 9: the patch tokens after the final norm,
    averaged over each cell of a 3x3 grid), from flat normalised pixels `x` (N, H*W)."""
    side = int(x.shape[1] ** 0.5)
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(x), batch):
        imgs = x[i : i + batch].view(-1, 1, side, side)
        t = vit.patch_embed(imgs) + vit.pos_embed[:, 1:, :]
        cls = (vit.cls_token + vit.pos_embed[:, :1, :]).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1)
        for b, blk in enumerate(vit.blocks, start=1):
            t = blk(t)
            out.setdefault(f"block{b}/cls", []).append(t[:, 0])
            out.setdefault(f"block{b}/mean", []).append(t[:, 1:].mean(dim=1))
        t = vit.norm(t)
        out.setdefault("final/cls", []).append(t[:, 0])
        n, grid = t.shape[0], int((t.shape[1] - 1) ** 0.5)
        fmap = t[:, 1:].transpose(1, 2).reshape(n, -1, grid, grid)
        out.setdefault("final/grid", []).append(F.adaptive_avg_pool2d(fmap, 3).flatten(1))
    return {k: torch.cat(v) for k, v in out.items()}


def probes(run: str | Path, fractions: list[float], k: int = 20, test_samples: int | None = None) -> dict:
    """{"linear": {feature: {fraction: top1}}, "linear_l2": {...}, "knn": {feature: {fraction: top1}}, "random":
    the k-NN alone for the last block's features of a randomly initialised encoder}, on the 10,000 test images (the
    first `test_samples` of them, when given)."""
    (xtr, ytr), (xte, yte) = pixels("train"), pixels("test")
    xte, yte = xte[:test_samples], yte[:test_samples]
    subsets = {f: torch.from_numpy(label_subset(ytr.numpy(), f, SUBSET_SEED)) for f in fractions}
    used = torch.unique(torch.cat(list(subsets.values())))  # only the labelled images need features
    row = torch.full((len(xtr),), -1, dtype=torch.long)
    row[used] = torch.arange(len(used))

    def score(vit: torch.nn.Module, names: list[str] | None = None, linear: bool = True) -> dict:
        ftr, fte = block_features(vit, xtr[used]), block_features(vit, xte)
        return classify({n: ftr[n] for n in names or ftr}, fte, subsets, row, ytr, yte, k, linear)

    vit = encoder(run)
    out = score(vit)
    last = f"block{len(vit.blocks)}/mean"
    out["random"] = score(encoder(run, pretrained=False), [last, "final/cls", "final/grid"], linear=False)
    return out


def classify(ftr: dict, fte: dict, subsets: dict, row, ytr, yte, k: int, linear: bool = True) -> dict:
    """Each feature of `ftr` under the pixel baselines' k-NN and (`linear`) logistic regression, at every
    labelled subset."""
    torch.manual_seed(0)
    out: dict = {"linear": {}, "linear_l2": {}, "knn": {}} if linear else {"knn": {}}
    for name in ftr:
        for f, idx in subsets.items():
            tr, te, y = ftr[name][row[idx]], fte[name], ytr[idx]
            out["knn"].setdefault(name, {})[str(f)] = knn_top1(
                F.normalize(tr, dim=1), y, F.normalize(te, dim=1), yte, k=k
            )
            if not linear:
                continue
            mu, sd = tr.mean(0), tr.std(0) + 1e-6
            scores = {l2: linear_pixels(((tr - mu) / sd, y), ((te - mu) / sd, yte), l2) for l2 in L2_SWEEP}
            best = max(scores, key=scores.get)
            out["linear"].setdefault(name, {})[str(f)] = scores[best]
            out["linear_l2"].setdefault(name, {})[str(f)] = best
    return out


if __name__ == "__main__":
    json.dump(probes(sys.argv[1], [0.01, 0.1, 1.0]), sys.stdout, indent=1)
    print()
