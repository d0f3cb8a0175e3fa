"""Evaluation shared by the entry points: classifier top-k accuracy, the k-NN feature monitor, segmentation's
confusion matrix and scores, and the check that names a collapsed model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

PAD_LABEL = -100  # a filler sample of in_lockstep: run through the model, never scored


def in_lockstep(
    loader: Iterable, any_rank: Callable[[bool], bool], shape: tuple[int, ...]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The batches of `loader`, then, while another rank still has batches, one filler image of `shape`
    labelled PAD_LABEL. The forward of a sharded (FSDP) model is collective: every rank must run as many
    as the others, whatever its share of the data. `any_rank(flag)` is true when `flag` is on any rank."""
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if not any_rank(batch is not None):
            return
        yield batch if batch is not None else (torch.zeros(1, *shape), torch.full((1,), PAD_LABEL), 0)


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module, loader: Iterable, device: torch.device, autocast: Callable, reduce: Callable
) -> dict:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over every sample of `loader`.

    `reduce(tensor)` sums over processes, so each rank may hold a disjoint part of the data. Samples
    labelled PAD_LABEL (in_lockstep's fillers) are not scored.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    for images, labels, _ in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast():
            logits = model(images)
        keep = labels != PAD_LABEL
        logits, labels = logits.float()[keep], labels[keep]
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices  # (N, k)
        hit = topk.eq(labels[:, None])
        totals += torch.stack(
            [
                hit[:, 0].sum().double(),
                hit.any(dim=1).sum().double(),
                F.cross_entropy(logits, labels, reduction="sum").double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
            ]
        )
    totals = reduce(totals)
    n = max(totals[3].item(), 1.0)
    return {
        "top1": 100.0 * totals[0].item() / n,
        "top5": 100.0 * totals[1].item() / n,
        "val_loss": totals[2].item() / n,
    }


@torch.no_grad()
def extract_features(
    features: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device,
    autocast: Callable,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, D) and labels (N,) of every sample of `loader`."""
    feats, labels = [], []
    for images, y, _ in loader:
        with autocast():
            f = features(images.to(device))
        feats.append(F.normalize(f.float(), dim=1).cpu())
        labels.append(y.cpu())
    if not feats:  # a loader that yielded nothing (ended by a stop signal)
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN top-1 (percent) with cosine similarity, votes weighted by exp(sim / T) (DINO)."""
    num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    k = min(k, train_f.shape[0])
    correct = 0
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i : i + chunk] @ train_f.T  # (n, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (n, k)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(dim=1) == test_y[i : i + chunk]).sum().item()
    return 100.0 * correct / max(test_f.shape[0], 1)


def mean_patch_features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Encoder features for k-NN: the average of the patch tokens (cls excluded), all patches visible."""

    def fn(images: torch.Tensor) -> torch.Tensor:
        last = model.forward_intermediates(images, 1, norm=True, output_fmt="NLC", intermediates_only=True)
        return last[0].mean(dim=1)

    return fn


# ----------------------------------------------------------------------------------------------------------
# semantic segmentation


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = 255
) -> torch.Tensor:
    """(K, K) int64 counts, rows the true class, columns the predicted one; pixels labelled `ignore` left out."""
    keep = target != ignore
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(conf: torch.Tensor) -> dict:
    """mIoU, mAcc, aAcc (percent) and per-class IoU / accuracy of a confusion matrix, as mmsegmentation's
    IoUMetric: a class with no pixel in the truth and none predicted has no IoU (left out of the mean);
    one never in the truth has no accuracy; a class only predicted scores IoU 0."""
    conf = conf.double()
    tp, truth, predicted = conf.diag(), conf.sum(1), conf.sum(0)
    union = truth + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(truth > 0, tp / truth.clamp(min=1), torch.full_like(tp, float("nan")))
    total = truth.sum()
    return {
        "miou": 100 * float(iou.nanmean()) if (union > 0).any() else float("nan"),
        "macc": 100 * float(acc.nanmean()) if (truth > 0).any() else float("nan"),
        "aacc": 100 * float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": [None if v != v else round(100 * float(v), 4) for v in iou],
        "acc": [None if v != v else round(100 * float(v), 4) for v in acc],
    }


# ----------------------------------------------------------------------------------------------------------
# a model that learnt nothing

CHANCE_MARGIN = 1.0  # percentage points: a mean class accuracy this close to 100 / classes is chance


def collapse(
    predicted, names: list[str] | None = None, macc: float | None = None, classes: int | None = None
) -> str | None:
    """Why an evaluation says the model learnt nothing, or None. `predicted`: how many predictions fell on
    each class (segmentation: the confusion matrix's column sums; a detector: its detections above the score
    threshold per category). Collapsed: no prediction at all, every prediction on one class, or a mean class
    accuracy `macc` (percent) within CHANCE_MARGIN of chance, 100 / `classes` (the classes in the truth): what
    a model that ignores its input scores."""
    counts = [int(c) for c in predicted]
    names = names or [str(i) for i in range(len(counts))]
    on = [i for i, c in enumerate(counts) if c > 0]
    if not on:
        return "no prediction at all"
    why = []
    if len(on) == 1 and len(counts) > 1:
        why.append(f"every prediction is class {on[0]} ({names[on[0]]})")
    if macc is not None and classes and macc <= 100 / classes + CHANCE_MARGIN:
        why.append(f"mAcc {macc:.2f}% is chance (100 / {classes} classes = {100 / classes:.2f}%)")
    return "; ".join(why) or None
