"""build_train_loader / build_eval_loader: one interface over map-style sources and webdataset shards."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch

from .images import SUPPORTED_CHANS, BadSampleLog, ImageDecodeError
from .shards import ShardStream, resolve_shards, shard_num_samples, stack_batch
from .sources import DataError, balanced_order, is_shard_source, label_subset, map_source
from .transforms import build_transform, sample_seed, seeded

log = logging.getLogger("mae.data")
SUBSET_SEED = 0  # label_fraction / k-NN subsets are the same for every run seed, so runs compare


class _MapDataset(torch.utils.data.Dataset):
    """Item (index, position) -> (image tensor, label) or None for a bad sample; the augmentation is seeded
    from (seed, epoch, position in the epoch), so it does not depend on which worker loads it."""

    def __init__(self, source, transform, in_chans: int, seed: int, epoch: int):
        self.source, self.transform, self.in_chans, self.seed, self.epoch = (
            source,
            transform,
            in_chans,
            seed,
            epoch,
        )
        self.labels = np.asarray(source.labels)
        self.badlog = BadSampleLog()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        i, pos = item
        try:
            img = self.source.load(int(i), self.in_chans)
        except (ImageDecodeError, OSError) as e:
            self.badlog(self.source.name(int(i)), str(e))
            return None
        with seeded(sample_seed(self.seed, self.epoch, pos)):
            x = self.transform(img)
        return x, int(self.labels[i])


def _collate(items, shape):
    good = [it for it in items if it is not None]
    return stack_batch([x for x, _ in good], [y for _, y in good], len(items) - len(good), shape)


class _Batches(torch.utils.data.Sampler):
    """Lists of (index, position) for batches [first, last) of a fixed order, computed lazily."""

    def __init__(self, order: np.ndarray, bounds: list[tuple[int, int]]):
        self.order, self.bounds = order, bounds

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self):
        for a, b in self.bounds:
            yield [(int(self.order[p]), p) for p in range(a, b)]


# Signals that stop a run. Clusters and terminals send them to every process of a job or process group
# (SLURM, `timeout`, Ctrl-C, torchrun's agent); the training process owns the shutdown (finish the step,
# checkpoint, exit) and ends its workers itself, so a worker that died of one first would abort the run.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _worker_init(_):
    # SIGTERM too: torch's own handler exits only for its parent's SIGTERM and dies of anyone else's. A worker
    # asked to stop by the parent finishes its batch and leaves at the shutdown sentinel.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending ones were discarded by SIG_IGN
    torch.set_num_threads(1)


class _DataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers ignore the stop signals from their first instruction: they are forked with
    the signals blocked (a signal landing between fork and worker_init waits, then is ignored), and the
    parent's own delivery is only deferred while workers start (once per epoch; nothing per batch)."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()  # starts the workers (a persistent loader: the first time only)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _data_loader(dataset, num_workers: int, **kw) -> torch.utils.data.DataLoader:
    return _DataLoader(
        dataset, num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
        pin_memory=torch.cuda.is_available(), **kw,
    )  # fmt: skip


class TrainLoader:
    """Training batches for one rank. `iterate(epoch, start_step)` yields (images, labels, n_bad) for steps
    start_step .. steps_per_epoch - 1 of that epoch; a batch holds batch_size drawn samples minus the bad ones."""

    def __init__(self, *, num_samples: int, steps_per_epoch: int, num_classes: int, make):
        self.num_samples, self.steps_per_epoch, self.num_classes = num_samples, steps_per_epoch, num_classes
        self._make = make

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        if start_step < self.steps_per_epoch:
            yield from self._make(epoch, start_step)

    def __len__(self) -> int:
        return self.steps_per_epoch


class EvalLoader:
    """Every sample of the source once across ranks (no padding, no drop_last), in a fixed order."""

    def __init__(self, *, num_samples: int, num_classes: int, loader):
        self.num_samples, self.num_classes, self._loader = num_samples, num_classes, loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        return iter(self._loader)


def _check(in_chans: int, batch_size: int, rank: int, world_size: int) -> None:
    if in_chans not in SUPPORTED_CHANS:
        raise DataError(f"model.in_chans={in_chans}: images convert to 1 (L), 3 (RGB) or 4 (RGBA) channels")
    if batch_size < 1:
        raise DataError(f"train.batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside world size {world_size}")


def _num_classes(source) -> int:
    labels = np.asarray(source.labels)
    return 0 if len(labels) == 0 or labels.min() < 0 else max(len(source.classes), int(labels.max()) + 1)


def _epoch_order(subset: np.ndarray, num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Source indices for one epoch: seeded permutations of the subset, repeated when epoch_samples > its size."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    reps = -(-num_samples // len(subset))
    return np.concatenate([subset[rng.permutation(len(subset))] for _ in range(reps)])[:num_samples]


def build_train_loader(cfg, *, source: str, img_size: int, in_chans: int, batch_size: int, augment: str,
                       seed: int, rank: int, world_size: int) -> TrainLoader:  # fmt: skip
    """Training loader over any source (see docs/data.md). Map-style sources: every global step consumes the
    next batch_size x world_size positions of a per-(seed, epoch) permutation, rank r taking block r."""
    _check(in_chans, batch_size, rank, world_size)
    transform = build_transform(cfg, augment, img_size, in_chans)
    shape, workers = (in_chans, img_size, img_size), int(cfg.num_workers)
    per_step = batch_size * world_size
    if is_shard_source(source):
        if float(cfg.label_fraction) < 1.0:
            raise DataError(f"data.label_fraction < 1 is not supported for shard sources ({source!r}); "
                            "build shards from the subset instead")  # fmt: skip
        shards = resolve_shards(source)
        num_samples = shard_num_samples(shards, source, int(cfg.epoch_samples))
        steps = _steps(num_samples, per_step, source)

        def make(epoch: int, start_step: int):
            stream = ShardStream(shards, transform=transform, in_chans=in_chans, img_size=img_size,
                                 batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                 train=True, steps=steps, start_step=start_step, resampled=bool(cfg.resampled),
                                 shuffle_buffer=int(cfg.shuffle_buffer))  # fmt: skip
            return _data_loader(stream, workers, batch_size=None)

        return TrainLoader(
            num_samples=num_samples, steps_per_epoch=steps, num_classes=shards.num_classes, make=make
        )

    src = map_source(cfg, source, img_size=img_size, train=True)
    subset = np.arange(len(src))
    if float(cfg.label_fraction) < 1.0:
        subset = label_subset(np.asarray(src.labels), float(cfg.label_fraction), SUBSET_SEED)
    num_samples = int(cfg.epoch_samples) or len(subset)
    steps = _steps(num_samples, per_step, source)

    def make(epoch: int, start_step: int):
        order = _epoch_order(subset, num_samples, seed, epoch)
        bounds = [
            ((k * world_size + rank) * batch_size, (k * world_size + rank + 1) * batch_size)
            for k in range(start_step, steps)
        ]
        dataset = _MapDataset(src, transform, in_chans, seed, epoch)
        return _data_loader(
            dataset, workers, batch_sampler=_Batches(order, bounds), collate_fn=partial(_collate, shape=shape)
        )

    return TrainLoader(
        num_samples=num_samples, steps_per_epoch=steps, num_classes=_num_classes(src), make=make
    )


def _steps(num_samples: int, per_step: int, source: str) -> int:
    steps = num_samples // per_step
    if steps < 1:
        raise DataError(f"data source {source!r}: {num_samples} samples make no full batch of {per_step} "
                        "(batch_size x world_size)")  # fmt: skip
    return steps


def build_eval_loader(cfg, *, source: str, img_size: int, in_chans: int, batch_size: int, rank: int,
                      world_size: int, max_samples: int = 0) -> EvalLoader:  # fmt: skip
    """Eval loader: resize to img_size / crop_pct + center crop. Rank r gets a contiguous block of the samples.
    max_samples > 0: the first max_samples of a fixed class-balanced order (a k-NN memory bank)."""
    _check(in_chans, batch_size, rank, world_size)
    transform = build_transform(cfg, "none", img_size, in_chans)
    shape, workers = (in_chans, img_size, img_size), int(cfg.num_workers)
    if is_shard_source(source):
        shards = resolve_shards(source)
        total = shard_num_samples(shards, source)
        stream = ShardStream(shards, transform=transform, in_chans=in_chans, img_size=img_size, batch_size=batch_size,
                             seed=SUBSET_SEED, epoch=0, rank=rank, world_size=world_size, train=False,
                             max_samples=max_samples)  # fmt: skip
        loader = _data_loader(stream, workers, batch_size=None)
        n = min(total, max_samples) if max_samples > 0 else total
        return EvalLoader(num_samples=n, num_classes=shards.num_classes, loader=loader)

    src = map_source(cfg, source, img_size=img_size, train=False)
    order = np.arange(len(src))
    if max_samples > 0:
        order = balanced_order(np.asarray(src.labels), SUBSET_SEED)[:max_samples]
    lo, hi = len(order) * rank // world_size, len(order) * (rank + 1) // world_size
    bounds = [(a, min(a + batch_size, hi)) for a in range(lo, hi, batch_size)]
    dataset = _MapDataset(src, transform, in_chans, SUBSET_SEED, 0)
    loader = _data_loader(
        dataset, workers, batch_sampler=_Batches(order, bounds), collate_fn=partial(_collate, shape=shape)
    )
    return EvalLoader(num_samples=len(order), num_classes=_num_classes(src), loader=loader)
