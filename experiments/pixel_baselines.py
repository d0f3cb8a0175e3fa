"""Raw-pixel baselines for the Fashion-MNIST study: what "no learning at all" reaches on the same splits.

Every number of the study reads against these: a linear classifier and a k-NN classifier on the normalised
pixels, trained on the same class-balanced labelled subsets (`label_subset`, seed SUBSET_SEED) the fine-tune
and probe runs use, scored on the same 10,000 test images; and the k-NN monitor's own setup (memory bank and
queries of `log.knn_train_samples` / `log.knn_val_samples`) for the pretraining curve.

    .venv/bin/python experiments/pixel_baselines.py        # prints the figures as JSON
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from mae.data.loaders import SUBSET_SEED
from mae.data.sources import balanced_order, label_subset, read_fashion_mnist
from mae.eval.metrics import knn_top1

MEAN, STD = 0.2860, 0.3530  # recipes/demo.yaml: the normalisation every run of the study sees
# logistic regression's L2 penalties: the best is reported, as for the from-scratch lr sweep
L2_SWEEP = (1e-4, 1e-3, 1e-2, 1e-1)


def pixels(split: str, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixels (N, 784) float32 and labels (N,) int64 of Fashion-MNIST's `split` (train | test)."""
    images, labels = read_fashion_mnist(root, split)
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return (x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64))


def knn_pixels(train: tuple, test: tuple, k: int = 20) -> float:
    """Weighted cosine k-NN top-1 (%), exactly the k-NN monitor's scoring, on pixel vectors."""
    (xtr, ytr), (xte, yte) = train, test
    return knn_top1(F.normalize(xtr, dim=1), ytr, F.normalize(xte, dim=1), yte, k=k)


def linear_pixels(train: tuple, test: tuple, l2: float, steps: int = 200) -> float:
    """Top-1 (%) of multinomial logistic regression on pixels (full-batch L-BFGS, L2 penalty `l2`)."""
    (xtr, ytr), (xte, yte) = train, test
    w = torch.zeros(xtr.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * ((xte @ w + b).argmax(1) == yte).float().mean().item()


def baselines(fractions: list[float], knn_bank: int, knn_queries: int, k: int = 20) -> dict:
    """{"linear": {fraction: top1}, "linear_l2": {fraction: l2}, "knn": {fraction: top1}, "knn_monitor": top1}."""
    torch.manual_seed(0)
    xtr, ytr = pixels("train")
    xte, yte = pixels("test")
    out: dict = {"linear": {}, "linear_l2": {}, "knn": {}}
    for f in fractions:
        idx = torch.from_numpy(label_subset(ytr.numpy(), f, SUBSET_SEED))
        sub = (xtr[idx], ytr[idx])
        scores = {l2: linear_pixels(sub, (xte, yte), l2) for l2 in L2_SWEEP}
        best = max(scores, key=scores.get)
        out["linear"][str(f)], out["linear_l2"][str(f)] = scores[best], best
        out["knn"][str(f)] = knn_pixels(sub, (xte, yte), k)
    bank = torch.from_numpy(balanced_order(ytr.numpy(), SUBSET_SEED)[:knn_bank])
    queries = torch.from_numpy(balanced_order(yte.numpy(), SUBSET_SEED)[:knn_queries])
    out["knn_monitor"] = knn_pixels((xtr[bank], ytr[bank]), (xte[queries], yte[queries]), k)
    return out


if __name__ == "__main__":
    json.dump(baselines([0.01, 0.1, 1.0], 5000, 1000), sys.stdout, indent=1)
    print()
