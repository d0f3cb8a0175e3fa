"""Webdataset shards: manifest lookup, URL expansion and the sharded sample stream.

The stream (one readable pipeline, per loader worker):
  shard list (shuffled with seed+epoch) -> split by rank, then by worker -> tar members grouped by key
  -> sample shuffle buffer (seeded) -> groups of batch_size raw samples -> decode + augment -> batch.
Batches are assembled inside the workers; a worker stops after its share of the explicit epoch length.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from itertools import islice

import torch
import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from .device import assemble
from .images import IMAGE_EXTS, BadSampleLog, ImageDecodeError
from .jpeg import CropDraw, worker_sample
from .sources import MANIFESTS, DataError
from .transforms import sample_seed

log = logging.getLogger("mae.data")
MANIFEST = MANIFESTS[0]


@dataclass
class ShardSet:
    urls: list[str]
    sizes: list[int] | None  # samples per shard when a manifest covers every shard
    classes: list[str] | None
    num_classes: int


def read_manifest(directory: str) -> dict | None:
    """The shard manifest of a directory as {"shards": [{"name", "samples"}...], "classes", "num_classes"},
    from make_shards' dataset.json or an open_clip-style sizes.json ({name: samples}); None if neither."""
    path = os.path.join(directory, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    path = os.path.join(directory, MANIFESTS[1])
    if os.path.exists(path):
        with open(path) as f:
            sizes = json.load(f)
        return {"shards": [{"name": k, "samples": int(v)} for k, v in sorted(sizes.items())], "classes": None}
    return None


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def resolve_shards(source: str) -> ShardSet:
    """A shard directory, a brace pattern, pipe: commands, or several joined with '::' -> ShardSet."""
    if os.path.isdir(source):
        manifest = read_manifest(source)
        if manifest is not None:
            urls = [os.path.join(source, s["name"]) for s in manifest["shards"]]
        else:
            urls = sorted(os.path.join(source, e.name) for e in os.scandir(source) if e.name.endswith(".tar"))
    else:
        urls = list(expand_urls(source))
    if not urls:
        raise DataError(f"data source {source!r}: no shards found")
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"data source {source!r}: shard {missing[0]} does not exist{more}")
    sizes, classes, num_classes = _sizes_from_manifests(urls)
    return ShardSet(urls, sizes, classes, num_classes)


def _sizes_from_manifests(urls: list[str]):
    """Look each local shard up in the manifest of its directory."""
    manifests, sizes, classes, num_classes = {}, [], None, 0
    for url in urls:
        if not _is_local(url):
            return None, None, 0
        d = os.path.dirname(url) or "."
        if d not in manifests:
            m = read_manifest(d)
            manifests[d] = None if m is None else ({s["name"]: int(s["samples"]) for s in m["shards"]}, m)
        if manifests[d] is None or os.path.basename(url) not in manifests[d][0]:
            return None, None, 0
        sizes.append(manifests[d][0][os.path.basename(url)])
        m = manifests[d][1]
        if m.get("classes") and classes is None:
            classes = list(m["classes"])
        num_classes = max(num_classes, int(m.get("num_classes") or len(m.get("classes") or [])))
    return sizes, classes, num_classes


def count_tar_samples(path: str) -> int:
    """Samples (distinct keys) in a local tar, read from the member headers only; a truncated or corrupt tar
    counts the samples before the damage, with a warning."""
    keys = set()
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                key, _ = base_plus_ext(m.name)
                if m.isfile() and key is not None:
                    keys.add(key)
    except (OSError, tarfile.TarError) as e:
        log.warning(
            "shard %s is truncated or corrupt (%s): counting its %d readable samples", path, e, len(keys)
        )
    return len(keys)


def shard_num_samples(shards: ShardSet, source: str, epoch_samples: int = 0) -> int:
    """data.epoch_samples when set, else the manifest total, else a header count of local shards."""
    if epoch_samples > 0:
        return int(epoch_samples)
    if shards.sizes is not None:
        return sum(shards.sizes)
    if all(_is_local(u) for u in shards.urls):
        log.info("no shard manifest for %s: counting samples in %d shards", source, len(shards.urls))
        return sum(count_tar_samples(u) for u in shards.urls)
    raise DataError(
        f"data source {source!r}: the number of samples is unknown (no manifest); set data.epoch_samples"
    )


def image_member(sample: dict) -> str | None:
    """The extension of the image member of a webdataset sample (jpg, png, ...), or None."""
    return next((e for e in IMAGE_EXTS if e in sample), None)


class ShardStream(torch.utils.data.IterableDataset):
    """Batches (mae.data.device.RawBatch: B' samples) from webdataset shards, built in each worker.

    A batch is `batch_size` consecutive samples of the worker's stream minus the bad ones (B' <= B), so the
    position of every batch is known without decoding: resuming at a step skips raw tar members only.

    train=True: shards shuffled per (seed, epoch, pass), a seeded sample shuffle buffer, exactly `steps`
    batches per rank, batch b from worker b % num_workers (the DataLoader's round-robin order); a worker that
    exhausts its shards starts another shuffled pass over them. train=False: every sample once, in order.
    With fewer shards than ranks x workers every worker reads all shards and keeps every (ranks x workers)-th
    sample, so small shard sets still split exactly.
    """

    def __init__(self, shards: ShardSet, *, transform, in_chans: int, img_size: int, batch_size: int, seed: int, epoch: int,
                 rank: int, world_size: int, train: bool, steps: int = 0, start_step: int = 0,
                 resampled: bool = False, shuffle_buffer: int = 0, max_samples: int = 0,
                 draw: CropDraw | None = None, to_device: bool = False):  # fmt: skip
        super().__init__()
        self.urls, self.transform, self.in_chans, self.batch_size = (
            shards.urls,
            transform,
            in_chans,
            batch_size,
        )
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.train, self.steps, self.start_step = train, steps, start_step
        self.resampled, self.shuffle_buffer, self.max_samples = resampled, shuffle_buffer, max_samples
        self.tar_errors, self.shape = 0, (in_chans, img_size, img_size)
        self.draw, self.to_device = draw, to_device  # MAE crops of JPEGs: mae.data.jpeg.worker_sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        self.badlog = BadSampleLog()
        if not self.train:
            yield from self._eval_batches(w, nw)
            return
        role = (w + self.start_step) % nw  # worker w produces global batches start_step + w, + nw, ...
        quota = self.steps // nw + (role < self.steps % nw)
        skip = len(range(role, self.start_step, nw))
        if self.resampled:
            raw = self._shuffled(self._resampled(role, nw), role, -1)
        else:
            raw = self._split_passes(role, nw)
        for b in range(quota):
            group = list(islice(raw, self.batch_size))
            if not group:
                log.warning(
                    "shard stream of rank %d worker %d ran dry after %d of %d batches", self.rank, w, b, quota
                )
                return
            if b >= skip:
                yield self._decode_batch(group, role, b * self.batch_size)

    def _eval_batches(self, w: int, nw: int):
        raw = self._split_passes(w, nw)
        if self.max_samples > 0:
            g, total = self.rank * nw + w, self.world_size * nw
            raw = islice(raw, self.max_samples // total + (g < self.max_samples % total))
        for b in range(1 << 62):
            group = list(islice(raw, self.batch_size))
            if not group:
                return
            yield self._decode_batch(group, w, b * self.batch_size)

    def _tar_error(self, exn: Exception) -> bool:
        self.tar_errors += 1
        self.badlog("shard", f"{type(exn).__name__}: {exn}")
        return True  # skip the rest of that shard and go on

    def _samples(self, urls):
        return wds.tarfile_to_samples(handler=self._tar_error)({"url": u} for u in urls)

    def _split_passes(self, role: int, nw: int):
        """Raw samples of this worker, pass after pass when training (each pass reshuffled, the shuffle buffer
        drained at its end, so one pass over balanced shards yields every sample exactly once)."""
        for p in range(1 << 62):
            src = self._one_pass(p, role, nw)
            if self.train:
                src = self._shuffled(src, role, p)
            n = 0
            for s in src:
                n += 1
                yield s
            if not self.train or n == 0:
                return

    def _shuffled(self, src, role: int, p: int):
        bufsize = max(1, self.shuffle_buffer)
        seed = sample_seed(self.seed, self.epoch, self.rank, role, p)
        return wds.shuffle(bufsize, min(bufsize, 1000), seed=seed)(src)

    def _one_pass(self, p: int, role: int, nw: int):
        """This worker's share of the shards (shuffled per pass): whole shards split by rank then by worker,
        or, with fewer shards than ranks x workers, every (ranks x workers)-th sample of all of them."""
        g, total = self.rank * nw + role, self.world_size * nw
        urls = list(self.urls)
        if self.train:
            random.Random(sample_seed(self.seed, self.epoch, p)).shuffle(urls)
        if len(urls) >= total:
            yield from self._samples(urls[self.rank :: self.world_size][role::nw])
        else:
            for i, s in enumerate(self._samples(urls)):
                if i % total == g:
                    yield s

    def _resampled(self, role: int, nw: int):
        """Shards drawn with replacement, independently per (rank, worker): an endless stream."""
        rng = random.Random(sample_seed(self.seed, self.epoch, self.rank, role, 11))
        empty = 0
        while empty < 100:
            n = 0
            for s in self._samples([rng.choice(self.urls)]):
                n += 1
                yield s
            empty = 0 if n else empty + 1

    def _decode_batch(self, group: list[dict], role: int, pos0: int):
        items, labels, n_bad = [], [], self.tar_errors
        self.tar_errors = 0
        for j, sample in enumerate(group):
            sample = {k.lower() if not k.startswith("__") else k: v for k, v in sample.items()}
            name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            ext = image_member(sample)
            try:
                if ext is None:
                    raise ImageDecodeError(
                        f"no image member (found {', '.join(k for k in sample if not k.startswith('__'))})"
                    )
                label = int(sample["cls"]) if "cls" in sample else -1
                seed = sample_seed(self.seed, self.epoch, self.rank, role, pos0 + j)
                args = (self.in_chans, self.transform, self.draw, seed, self.to_device, name)
                items.append(worker_sample(sample[ext], *args))
            except (ImageDecodeError, ValueError) as e:
                n_bad += 1
                self.badlog(name, str(e))
                continue
            labels.append(label)
        return assemble(items, labels, n_bad, self.shape)
