"""build_train_loader / build_eval_loader: one interface over map-style sources and webdataset shards."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch

from .bands import band_mismatch, decode_bands, decode_sample, is_array_ext, read_array
from .device import Finisher, Prefetcher, RawBatch, assemble
from .images import SUPPORTED_CHANS, BadSampleLog, ImageDecodeError, decode_image
from .jpeg import CropDraw, worker_sample
from .sampling import epoch_order, eval_bounds, full_steps, train_bounds
from .shards import (
    ShardSet,
    ShardStream,
    first_shard_samples,
    resolve_shards,
    shard_num_samples,
    shard_samples_at,
)
from .sources import (
    ArraySource,
    DataError,
    SyntheticSource,
    balanced_order,
    is_shard_source,
    label_subset,
    map_source,
)
from .transforms import AUGMENTATIONS, build_transform, norm_stats, sample_seed, seeded

log = logging.getLogger("mae.data")
SUBSET_SEED = 0  # label_fraction / k-NN subsets are the same for every run seed, so runs compare


class _MapDataset(torch.utils.data.Dataset):
    """Item (index, position) -> (image tensor or DeferredCrop, label), or None for a bad sample; the
    augmentation is seeded from (seed, epoch, position in the epoch), so it does not depend on which worker
    loads it. With `draw` (MAE crops) JPEG files go through mae.data.jpeg.worker_sample: cropped here, or
    left encoded for the device when `to_device` (data.decode=device). `keyed` (eval): the item also carries
    the sample's index and name, (x, label, index, name)."""

    def __init__(self, source, transform, in_chans: int, seed: int, epoch: int, draw: CropDraw | None = None,
                 to_device: bool = False, keyed: bool = False):  # fmt: skip
        self.source, self.transform, self.in_chans = source, transform, in_chans
        self.seed, self.epoch, self.keyed = seed, epoch, keyed
        self.labels = np.asarray(source.labels)
        self.badlog = BadSampleLog()
        self.draw = draw if hasattr(source, "read") else None  # only files have encoded bytes
        self.to_device = to_device

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        i, pos = int(item[0]), item[1]
        seed = sample_seed(self.seed, self.epoch, pos)
        try:
            if self.draw is not None:
                data, name, ext = self.source.read(i), self.source.name(i), self.source.ext(i)
                x = worker_sample(
                    data, self.in_chans, self.transform, self.draw, seed, self.to_device, name, ext
                )
            else:
                img = self.source.load(i, self.in_chans)
                with seeded(seed):
                    x = self.transform(img)
        except (ImageDecodeError, OSError) as e:
            self.badlog(self.source.name(i), str(e))
            return None
        return (x, int(self.labels[i]), i, self.source.name(i)) if self.keyed else (x, int(self.labels[i]))


def _collate(items, shape, norm, badlog, keyed: bool = False) -> RawBatch:
    good = [it for it in items if it is not None]
    tags = dict(ids=[it[2] for it in good], keys=[it[3] for it in good]) if keyed else {}
    xs, ys, n_bad = [it[0] for it in good], [it[1] for it in good], len(items) - len(good)
    return assemble(xs, ys, n_bad, shape, norm, badlog, **tags)


def _map_loader(dataset: _MapDataset, workers: int, order: np.ndarray, bounds, shape, norm):
    collate = partial(_collate, shape=shape, norm=norm, badlog=dataset.badlog, keyed=dataset.keyed)
    return _data_loader(dataset, workers, batch_sampler=_Batches(order, bounds), collate_fn=collate)


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


def pool_worker_signals() -> None:
    """The initializer of a multiprocessing pool's workers (the data tools'): SIGTERM as the default (Pool.terminate
    stops them so, also when the parent had a Python handler of its own, which a returning or raising one would
    turn into a hang or a traceback per worker) and SIGINT ignored (Ctrl-C reaches the whole group; the parent
    stops the pool)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


class MapTrainLoader:
    """Training batches of a rank from a map-style source (image / mask pairs, detection images), for steps
    start_step .. steps_per_epoch - 1: every global step takes the next batch_size x world_size positions of a
    per-(seed, epoch) permutation of the source (repeated when epoch_samples exceeds it), rank r block r, so the
    data order is a pure function of (seed, epoch, step) and a run resumes exactly. Subclasses say what the
    positions become: `dataset(epoch)` (index, position) -> item or None, and `collate(items)`."""

    what = "data: samples"  # "<source kind>: <unit>", for the error message

    def __init__(self, size: int, *, batch_size, seed, rank, world_size, workers, epoch_samples=0):
        self.size, self.batch_size, self.seed, self.rank, self.world_size, self.workers = (
            size, batch_size, seed, rank, world_size, workers,
        )  # fmt: skip
        self.num_samples = int(epoch_samples) or size
        self.steps_per_epoch = full_steps(self.num_samples, batch_size * world_size, self.what)

    def dataset(self, epoch: int) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, items: list):
        raise NotImplementedError

    def iterate(self, epoch: int, start_step: int = 0):
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        if start_step == self.steps_per_epoch:
            return iter(())
        order = epoch_order(np.arange(self.size), self.num_samples, self.seed, epoch)
        bounds = train_bounds(self.batch_size, self.rank, self.world_size, start_step, self.steps_per_epoch)
        sampler = _Batches(order, bounds)
        return iter(
            _data_loader(self.dataset(epoch), self.workers, batch_sampler=sampler, collate_fn=self.collate)
        )

    def __len__(self) -> int:
        return self.steps_per_epoch


def rank_block_loader(dataset, size: int, *, batch_size, rank, world_size, workers):
    """Every item of a map-style dataset once across ranks (rank r: a contiguous block; nothing padded or seen
    twice), in batches of (the good items, the number of bad ones: None)."""
    bounds = eval_bounds(size, batch_size, rank, world_size)
    return _data_loader(
        dataset, workers, batch_sampler=_Batches(np.arange(size), bounds), collate_fn=_good_and_bad
    )


def _good_and_bad(items):
    return [it for it in items if it is not None], sum(it is None for it in items)


def _data_loader(dataset, num_workers: int, **kw) -> torch.utils.data.DataLoader:
    # A generator of its own: a DataLoader draws its workers' base seed from torch's global generator each time
    # it is iterated, which a resumed run does at another moment than the uninterrupted one (mid-epoch, after
    # the checkpoint restored the generator drop path reads). Every transform seeds itself per sample.
    return _DataLoader(
        dataset, num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0), **kw,
    )  # fmt: skip


class TrainLoader:
    """Training batches for one rank, steps start_step .. steps_per_epoch - 1 of an epoch; a batch holds
    batch_size drawn samples minus the bad ones.

    `device_batches(epoch, start_step, device)`: (images float32 (B', C, S, S), labels, n_bad) on `device`,
    prefetched (what the training loop reads). `iterate(epoch, start_step)`: the same batches on the CPU.
    `raw(epoch, start_step)`: what the workers hand over (RawBatch). `decode`: "cpu" or "device".
    """

    def __init__(self, *, num_samples: int, steps_per_epoch: int, num_classes: int, make, finish: Finisher,
                 decode: str = "cpu"):  # fmt: skip
        self.num_samples, self.steps_per_epoch, self.num_classes = num_samples, steps_per_epoch, num_classes
        self._make, self.finish, self.decode = make, finish, decode

    def raw(self, epoch: int, start_step: int = 0) -> Iterator[RawBatch]:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        if start_step < self.steps_per_epoch:
            yield from self._make(epoch, start_step)

    def device_batches(self, epoch: int, start_step: int, device: torch.device):
        return Prefetcher(self.raw(epoch, start_step), torch.device(device), self.finish)

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        return iter(self.device_batches(epoch, start_step, torch.device("cpu")))

    def __len__(self) -> int:
        return self.steps_per_epoch


class EvalLoader:
    """Every sample of the source once across ranks (no padding, no drop_last), in a fixed order.

    Iterating gives (images, labels, n_bad) per batch; `keyed()` also says which samples a batch holds."""

    def __init__(self, *, num_samples: int, num_classes: int, loader, finish: Finisher):
        self.num_samples, self.num_classes = num_samples, num_classes
        self._loader, self._finish = loader, finish

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        return iter(Prefetcher(self._loader, torch.device("cpu"), self._finish))

    def keyed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], int]]:
        """(images (B', C, S, S) float32, labels (B',), ids (B',) int64, names (B'), n_bad) on the CPU. ids: each
        kept sample's place in the source's own order (index of a built-in set or folder listing; for shards
        shard number << 32 | sample number in its tar), so sorting the ids of every rank's batches gives the
        samples in the source's order whatever the ranks and workers; names as the bad-sample log gives them."""
        cpu = torch.device("cpu")
        for raw in self._loader:
            images, labels, n_bad = self._finish(raw, cpu)
            ids = raw.ids if raw.ids is not None else torch.empty(0, dtype=torch.int64)
            yield images, labels, ids, raw.keys or [], n_bad


def _check(in_chans: int, batch_size: int, rank: int, world_size: int) -> None:
    if in_chans < 1:
        raise DataError(f"model.in_chans must be >= 1, got {in_chans}")
    if batch_size < 1:
        raise DataError(f"train.batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside world size {world_size}")


PROBE_SAMPLES = 8  # samples read when a loader is built, to check model.in_chans against the data


def probe_channels(source: str, src_or_shards, in_chans: int) -> str:
    """Check model.in_chans against the data before training starts: "bands" (TIFF / .npy samples, whose band
    count must equal in_chans) or "image" (images Pillow reads, converted to 1, 3 or 4 channels). The first
    readable of the first PROBE_SAMPLES samples decides (for shards: of the first local shard; `pipe:` and
    URL shards are not probed, their mismatching samples are skipped and counted). Raises DataError."""
    if isinstance(src_or_shards, (ArraySource, SyntheticSource)):
        if in_chans not in SUPPORTED_CHANS:
            raise DataError(f"data source {source!r} has ordinary images, which convert to 1, 3 or 4 channels, "
                            f"not model.in_chans={in_chans} (multi-band data: TIFF or .npy files)")  # fmt: skip
        return "image"
    if isinstance(src_or_shards, ShardSet):
        samples = first_shard_samples(src_or_shards.urls[0], PROBE_SAMPLES)
    else:
        n = min(PROBE_SAMPLES, len(src_or_shards))
        samples = ((src_or_shards.name(i), src_or_shards.ext(i), src_or_shards.read(i)) for i in range(n))
    first = None
    for name, ext, data in samples:
        try:
            if is_array_ext(ext):
                a, how = read_array(data, ext)
                if a.shape[2] != in_chans:
                    raise DataError(
                        f"data source {source!r}: {name} has {band_mismatch(a.shape[2], in_chans, how)}"
                    )
                decode_bands(data, ext)  # dtype and values
                return "bands"
            img = decode_image(data)
            if in_chans not in SUPPORTED_CHANS:
                raise DataError(f"data source {source!r}: {name} is an ordinary image (mode {img.mode}), which "
                                f"converts to 1, 3 or 4 channels, not model.in_chans={in_chans} "
                                "(multi-band data: TIFF or .npy files)")  # fmt: skip
            return "image"
        except (ImageDecodeError, OSError) as e:
            first = first or f"{name}: {e}"
    if first is None:
        return "image"  # nothing to probe (a remote or empty shard)
    raise DataError(f"data source {source!r}: none of its first samples is readable ({first})")


def _num_classes(source) -> int:
    labels = np.asarray(source.labels)
    return 0 if len(labels) == 0 or labels.min() < 0 else max(len(source.classes), int(labels.max()) + 1)


DECODES = ("auto", "cpu", "device")


def resolve_decode(cfg, source: str, augment: str) -> str:
    """data.decode -> "cpu" or "device". auto: the device on CUDA for file sources (folders, shards) under the
    pretraining augmentation, the CPU elsewhere."""
    mode = str(getattr(cfg, "decode", "auto"))
    if mode not in DECODES:
        raise DataError(f"data.decode must be one of {', '.join(DECODES)}, got {mode!r}")
    device_crops = AUGMENTATIONS[augment].crops_on_device
    if mode == "auto":
        files = is_shard_source(source) or os.path.isdir(source)
        return "device" if torch.cuda.is_available() and files and device_crops else "cpu"
    if mode == "device" and not device_crops:
        raise DataError(f"data.decode=device decodes pretraining crops only; the {augment!r} augmentation "
                        "runs on the CPU (use data.decode=cpu or auto)")  # fmt: skip
    return mode


def build_train_loader(cfg, *, source: str, img_size: int, in_chans: int, batch_size: int, augment: str,
                       seed: int, rank: int, world_size: int) -> TrainLoader:  # fmt: skip
    """Training loader over any source (see docs/data.md). Map-style sources: every global step consumes the
    next batch_size x world_size positions of a per-(seed, epoch) permutation, rank r taking block r.
    Workers hand over uint8 crops (normalised on the device) except under fine-tuning's float transforms and
    for TIFF / .npy samples (float32 bands, normalised in the worker). model.in_chans is checked against the
    first samples here (probe_channels), before anything trains or is written."""
    _check(in_chans, batch_size, rank, world_size)
    if augment not in AUGMENTATIONS:
        raise DataError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    kind = AUGMENTATIONS[augment]
    transform = build_transform(cfg, augment, img_size, in_chans, uint8=kind.uint8)
    decode = resolve_decode(cfg, source, augment)
    draw = CropDraw(img_size, (float(cfg.scale_min), 1.0), bool(cfg.hflip)) if kind.crops_on_device else None
    to_device = decode == "device"
    norm = norm_stats(cfg, in_chans)
    finish = Finisher(*norm, img_size, in_chans)
    shape, workers = (in_chans, img_size, img_size), int(cfg.num_workers)
    per_step = batch_size * world_size
    if is_shard_source(source):
        if float(cfg.label_fraction) < 1.0:
            raise DataError(f"data.label_fraction < 1 is not supported for shard sources ({source!r}); "
                            "build shards from the subset instead")  # fmt: skip
        shards = resolve_shards(source)
        _note_augment(cfg, augment, in_chans, probe_channels(source, shards, in_chans))
        num_samples = shard_num_samples(shards, source, int(cfg.epoch_samples))
        steps = full_steps(num_samples, per_step, f"data source {source!r}")

        def make(epoch: int, start_step: int):
            stream = ShardStream(shards, transform=transform, in_chans=in_chans, img_size=img_size,
                                 batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                 train=True, steps=steps, start_step=start_step, resampled=bool(cfg.resampled),
                                 shuffle_buffer=int(cfg.shuffle_buffer), draw=draw,
                                 to_device=to_device, norm=norm)  # fmt: skip
            return _data_loader(stream, workers, batch_size=None)

        return TrainLoader(num_samples=num_samples, steps_per_epoch=steps, num_classes=shards.num_classes,
                           make=make, finish=finish, decode=decode)  # fmt: skip

    src = map_source(cfg, source, img_size=img_size, train=True)
    _note_augment(cfg, augment, in_chans, probe_channels(source, src, in_chans))
    subset = np.arange(len(src))
    if float(cfg.label_fraction) < 1.0:
        subset = label_subset(np.asarray(src.labels), float(cfg.label_fraction), SUBSET_SEED)
    num_samples = int(cfg.epoch_samples) or len(subset)
    steps = full_steps(num_samples, per_step, f"data source {source!r}")
    drawn_on_device = isinstance(src, SyntheticSource) and kind.crops_on_device
    finish.synthetic_split = getattr(src, "split", 0)

    def make(epoch: int, start_step: int):
        order = epoch_order(subset, num_samples, seed, epoch)
        bounds = train_bounds(batch_size, rank, world_size, start_step, steps)
        if drawn_on_device:  # nothing to load: the indices are the batch
            return (_synthetic_batch(src, order[a:b]) for a, b in bounds)
        dataset = _MapDataset(src, transform, in_chans, seed, epoch, draw, to_device)
        return _map_loader(dataset, workers, order, bounds, shape, norm)

    return TrainLoader(num_samples=num_samples, steps_per_epoch=steps, num_classes=_num_classes(src), make=make,
                       finish=finish, decode=decode)  # fmt: skip


def _note_augment(cfg, augment: str, in_chans: int, kind: str) -> None:
    if (
        kind == "bands"
        and AUGMENTATIONS[augment].rgb_only
        and str(cfg.auto_augment or "")
        and in_chans in (1, 3)
    ):
        log.warning("data.auto_augment=%s is not applied to TIFF / .npy samples (RandAugment is RGB-only); "
                    "they get crop, flip and random erasing", cfg.auto_augment)  # fmt: skip


def _synthetic_batch(src: SyntheticSource, indices: np.ndarray) -> RawBatch:
    """A batch of the synthetic source to draw on the device (mae.data.synthetic)."""
    index = torch.as_tensor(indices, dtype=torch.int64)
    labels = torch.as_tensor(np.asarray(src.labels)[indices], dtype=torch.int64)
    return RawBatch(torch.empty(0, dtype=torch.uint8), labels, 0, render=index)


def build_eval_loader(cfg, *, source: str, img_size: int, in_chans: int, batch_size: int, rank: int,
                      world_size: int, max_samples: int = 0) -> EvalLoader:  # fmt: skip
    """Eval loader: resize to img_size / crop_pct + center crop. Rank r gets a contiguous block of the samples.
    max_samples > 0: the first max_samples of a fixed class-balanced order (a k-NN memory bank)."""
    _check(in_chans, batch_size, rank, world_size)
    transform = build_transform(cfg, "none", img_size, in_chans, uint8=True)
    norm = norm_stats(cfg, in_chans)
    finish = Finisher(*norm, img_size, in_chans)
    shape, workers = (in_chans, img_size, img_size), int(cfg.num_workers)
    if is_shard_source(source):
        shards = resolve_shards(source)
        probe_channels(source, shards, in_chans)
        total = shard_num_samples(shards, source)
        stream = ShardStream(shards, transform=transform, in_chans=in_chans, img_size=img_size, batch_size=batch_size,
                             seed=SUBSET_SEED, epoch=0, rank=rank, world_size=world_size, train=False,
                             max_samples=max_samples, norm=norm)  # fmt: skip
        loader = _data_loader(stream, workers, batch_size=None)
        n = min(total, max_samples) if max_samples > 0 else total
        return EvalLoader(num_samples=n, num_classes=shards.num_classes, loader=loader, finish=finish)

    src = map_source(cfg, source, img_size=img_size, train=False)
    probe_channels(source, src, in_chans)
    order = np.arange(len(src))
    if max_samples > 0:
        order = balanced_order(np.asarray(src.labels), SUBSET_SEED)[:max_samples]
    bounds = eval_bounds(len(order), batch_size, rank, world_size)
    dataset = _MapDataset(src, transform, in_chans, SUBSET_SEED, 0, keyed=True)
    loader = _map_loader(dataset, workers, order, bounds, shape, norm)
    return EvalLoader(num_samples=len(order), num_classes=_num_classes(src), loader=loader, finish=finish)


def read_by_ids(cfg, *, source: str, ids, img_size: int, in_chans: int) -> list[torch.Tensor]:
    """The samples `ids` of a source (the ids EvalLoader.keyed gives) through the eval transform, each a
    normalised float32 (C, img_size, img_size), in the order of `ids`: what the model saw, for figures.
    Raises ImageDecodeError for a sample that does not decode."""
    transform = build_transform(cfg, "none", img_size, in_chans)
    ids = [int(i) for i in ids]
    if not is_shard_source(source):
        src = map_source(cfg, source, img_size=img_size, train=False)
        return [transform(src.load(i, in_chans)) for i in ids]
    urls, found = resolve_shards(source).urls, {}
    for shard in sorted({i >> 32 for i in ids}):
        numbers = {i & 0xFFFFFFFF for i in ids if i >> 32 == shard}
        for k, (_, ext, data) in shard_samples_at(urls[shard], numbers).items():
            found[(shard << 32) | k] = decode_sample(data, ext, in_chans)
    missing = [i for i in ids if i not in found]
    if missing:
        raise ImageDecodeError(
            f"sample {missing[0] & 0xFFFFFFFF} of shard {urls[missing[0] >> 32]} not found"
        )
    return [transform(found[i]) for i in ids]
