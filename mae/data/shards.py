"""Webdataset shards: manifest lookup, URL expansion and the sharded sample stream.

The stream (one readable pipeline, per loader worker):
  the epoch's sample sequence (shards shuffled with seed+epoch, one after another) -> this (rank, worker)'s
  span of it, read as pieces of shards -> tar members grouped by key -> sample shuffle buffer (seeded)
  -> groups of batch_size raw samples -> decode + augment -> batch.
The spans of all (rank, worker) tile the epoch, so one epoch reads every sample once (docs/data.md).
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
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from .device import assemble
from .images import IMAGE_EXTS, BadSampleLog, ImageDecodeError
from .jpeg import CropDraw, worker_sample
from .sources import MANIFESTS, DataError
from .transforms import sample_seed

log = logging.getLogger("mae.data")
MANIFEST = MANIFESTS[0]
BUILD_STATE = (
    ".make_shards.json"  # data_tools.make_shards' progress: present and not complete = unfinished build
)
MISSING = "__missing__"  # marks the place of a sample a shard lacks (shorter than its manifest says)


@dataclass
class ShardSet:
    urls: list[str]
    sizes: list[int] | None  # samples per shard (manifest, else tar headers of local shards); None: unknown
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
        check_complete(source, manifest)
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
    if sizes is None and all(_is_local(u) for u in urls):
        log.info("no shard manifest for %s: counting samples in %d shards", source, len(urls))
        sizes = [count_tar_samples(u) for u in urls]
    return ShardSet(urls, sizes, classes, num_classes)


def check_complete(directory: str, manifest: dict | None) -> None:
    """Refuse (DataError) a shard directory that is not whole: an unfinished make_shards build (a `.partial`
    shard, progress recorded but no finished manifest) or a .tar its manifest does not list (the loader would
    leave it out). To train on a part of it, the user names the shards (a brace pattern). A listed shard cut short
    or damaged is bad data, skipped and counted as the loader reads it."""
    names = sorted(e.name for e in os.scandir(directory) if e.name.endswith((".tar", ".partial")))
    tars = [n for n in names if n.endswith(".tar")]
    partial = [n for n in names if n.endswith(".partial")]
    state = _read_json(os.path.join(directory, BUILD_STATE))
    if partial or (state is not None and not state.get("complete")):
        cut = f", {partial[0]} cut short" if partial else ""
        raise DataError(
            f"data source {directory!r} is an unfinished make_shards build ({len(tars)} shard(s) written{cut}): "
            "finish it by re-running the same make_shards command" + _pattern_hint(directory, tars)
        )
    if manifest is None:
        return
    listed = {s["name"] for s in manifest["shards"]}
    extra = [n for n in tars if n not in listed]
    if extra:
        raise DataError(f"data source {directory!r} does not match its manifest {MANIFEST} ({extra[0]} is not in "
                        "it): re-run make_shards, or check the directory with python -m data_tools.verify_shards")  # fmt: skip


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pattern_hint(directory: str, tars: list[str]) -> str:
    """'; to train on the finished shards alone, name them: DIR/train-{000000..000004}.tar' when they are
    numbered one after another (make_shards' names)."""
    parts = [t[: -len(".tar")].rpartition("-") for t in tars]
    if not parts or any(p[0] != parts[0][0] or not p[2].isdigit() for p in parts):
        return ""
    numbers = [int(p[2]) for p in parts]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        return ""
    return (f"; to train on the finished shards alone, name them: "
            f"{directory}/{parts[0][0]}-{{{parts[0][2]}..{parts[-1][2]}}}.tar")  # fmt: skip


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


def sample_offset(path: str, k: int) -> int | None:
    """Byte offset in a local tar of the first member of its sample k (samples counted as count_tar_samples
    does), found from the member headers alone; None if the tar has no sample k or cannot be read."""
    seen, last = 0, None
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                key, _ = base_plus_ext(m.name)
                if not m.isfile() or key is None or key == last:
                    continue
                if seen == k:
                    return m.offset
                seen, last = seen + 1, key
    except (OSError, tarfile.TarError):
        return None
    return None


def shard_num_samples(shards: ShardSet, source: str, epoch_samples: int = 0) -> int:
    """data.epoch_samples when set, else the total of the shard sizes (manifest or tar headers)."""
    if epoch_samples > 0:
        return int(epoch_samples)
    if shards.sizes is not None:
        return sum(shards.sizes)
    raise DataError(
        f"data source {source!r}: the number of samples is unknown (no manifest); set data.epoch_samples"
    )


def pass_order(num_shards: int, seed: int, epoch: int, p: int) -> list[int]:
    """Shard indices in the order of pass `p` of an epoch: a (seed, epoch, pass) shuffle."""
    order = list(range(num_shards))
    random.Random(sample_seed(seed, epoch, p)).shuffle(order)
    return order


def worker_span(rank: int, role: int, world_size: int, num_workers: int, steps: int, batch_size: int):
    """[begin, end) of the epoch's sample sequence read by worker `role` of `rank`.

    Rank r reads positions [r * steps * B, (r + 1) * steps * B); its workers split them by their batch
    quotas (the DataLoader takes batch b from worker b % num_workers), in worker order. All spans together
    are the first world_size * steps * B positions, each once."""
    base, extra = divmod(steps, num_workers)
    first = role * base + min(role, extra)  # batches of the workers before this one
    begin = (rank * steps + first) * batch_size
    return begin, begin + (base + (role < extra)) * batch_size


def epoch_pieces(sizes: list[int], seed: int, epoch: int, begin: int, end: int) -> list[tuple[int, int, int]]:
    """Positions [begin, end) of the epoch's sample sequence as (shard index, first, stop) pieces.

    The sequence is pass after pass over all shards, each pass in its pass_order and each shard's samples
    in tar order; an epoch of at most one pass (data.epoch_samples unset) is one pass, cut at the end."""
    total, pieces = sum(sizes), []
    p = begin // total
    pos = p * total
    while pos < end:
        for i in pass_order(len(sizes), seed, epoch, p):
            a, b = max(begin, pos), min(end, pos + sizes[i])
            if a < b:
                pieces.append((i, a - pos, b - pos))
            pos += sizes[i]
            if pos >= end:
                break
        p += 1
    return pieces


def first_shard_samples(url: str, n: int) -> list[tuple[str, str, bytes]]:
    """(name, image extension, bytes) of the first `n` samples of a local shard that have an image member;
    [] for a remote shard (not opened here) or an unreadable one (the training stream reports it)."""
    if not _is_local(url):
        return []
    out = []
    try:
        for sample in wds.tarfile_to_samples()(iter([{"url": url}])):
            sample = {k.lower() if not k.startswith("__") else k: v for k, v in sample.items()}
            ext = image_member(sample)
            if ext is not None:
                out.append((f"{url}:{sample['__key__']}", ext, sample[ext]))
            if len(out) >= n:
                break
    except Exception:  # a corrupt tar: counted and logged when the stream reads it
        pass
    return out


def shard_samples_at(url: str, numbers: set[int]) -> dict[int, tuple[str, str, bytes]]:
    """{number: (name, image extension, bytes)} of the samples with those numbers in a shard (counted as the
    eval stream's ids count them: samples in tar order, from 0). A sample without an image member is left out."""
    out = {}
    if not numbers:
        return out
    for k, sample in enumerate(wds.tarfile_to_samples()(iter([{"url": url}]))):
        if k in numbers:
            sample = {key.lower() if not key.startswith("__") else key: v for key, v in sample.items()}
            ext = image_member(sample)
            if ext is not None:
                out[k] = (f"{url}:{sample['__key__']}", ext, sample[ext])
        if k >= max(numbers):
            break
    return out


def image_member(sample: dict) -> str | None:
    """The extension of the image member of a webdataset sample (jpg, png, ...), or None."""
    return next((e for e in IMAGE_EXTS if e in sample), None)


class ShardStream(torch.utils.data.IterableDataset):
    """Batches (mae.data.device.RawBatch: B' samples) from webdataset shards, built in each worker.

    A batch is `batch_size` consecutive samples of the worker's stream minus the bad ones (B' <= B), so the
    position of every batch is known without decoding: resuming at a step skips raw tar members only.

    train=True: exactly `steps` batches per rank, batch b from worker b % num_workers (the DataLoader's
    round-robin order). With known shard sizes each worker reads its worker_span of the epoch's sequence
    (whole shards and pieces of shards, see _piece) through a seeded shuffle buffer, so the epoch reads
    every sample once. Sizes unknown (remote shards, no manifest): whole
    shards split by rank and worker, and a worker that exhausts its shards starts another shuffled pass.
    train=False: every sample once, in order; with fewer shards than ranks x workers every worker reads all
    shards and keeps every (ranks x workers)-th sample.
    """

    def __init__(self, shards: ShardSet, *, transform, in_chans: int, img_size: int, batch_size: int, seed: int, epoch: int,
                 rank: int, world_size: int, train: bool, steps: int = 0, start_step: int = 0,
                 resampled: bool = False, shuffle_buffer: int = 0, max_samples: int = 0,
                 draw: CropDraw | None = None, to_device: bool = False, norm=None):  # fmt: skip
        super().__init__()
        self.urls, self.sizes, self.transform, self.in_chans, self.batch_size = (
            shards.urls,
            shards.sizes,
            transform,
            in_chans,
            batch_size,
        )
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.train, self.steps, self.start_step = train, steps, start_step
        self.resampled, self.shuffle_buffer, self.max_samples = resampled, shuffle_buffer, max_samples
        self.tar_errors, self.shape = 0, (in_chans, img_size, img_size)
        self.draw, self.to_device = draw, to_device  # MAE crops of JPEGs: mae.data.jpeg.worker_sample
        self.norm = (
            norm  # (mean, std): a batch mixing TIFF / .npy samples with images (mae.data.device.assemble)
        )

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
        elif self.sizes is not None:
            raw = self._shuffled(self._span(role, nw), role, 0)
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

    def _span(self, role: int, nw: int):
        """This worker's worker_span of the epoch, piece by piece. A shard that holds fewer samples than its
        size says yields placeholders for the rest (counted as bad), so every later batch keeps its place."""
        begin, end = worker_span(self.rank, role, self.world_size, nw, self.steps, self.batch_size)
        for i, first, stop in epoch_pieces(self.sizes, self.seed, self.epoch, begin, end):
            read = first
            for s in self._piece(self.urls[i], first, stop):
                read += 1
                yield s
            for k in range(read, stop):
                yield {"__url__": self.urls[i], "__key__": f"#{k}", MISSING: True}

    def _piece(self, url: str, first: int, stop: int):
        """Raw samples [first, stop) of one shard. A local tar is read from sample `first` on (its offset
        found from the member headers); a remote one from its start, the samples before `first` undecoded."""
        offset = sample_offset(url, first) if first > 0 and _is_local(url) else None
        if offset is None:
            yield from islice(self._samples([url]), first, stop)
            return
        with open(url, "rb") as f:
            f.seek(offset)
            members = tar_file_expander([{"url": url, "stream": f}], handler=self._tar_error)
            yield from islice(group_by_keys(members, handler=self._tar_error), stop - first)

    def _one_pass(self, p: int, role: int, nw: int):
        """This worker's share of the shards (shuffled per pass): whole shards split by rank then by worker,
        or, with fewer shards than ranks x workers, every (ranks x workers)-th sample of all of them."""
        g, total = self.rank * nw + role, self.world_size * nw
        urls = list(self.urls)
        if self.train:
            urls = [urls[i] for i in pass_order(len(urls), self.seed, self.epoch, p)]
        if len(urls) >= total:
            yield from self._numbered(urls[self.rank :: self.world_size][role::nw])
        else:
            for i, s in enumerate(self._numbered(urls)):
                if i % total == g:
                    yield s

    def _numbered(self, urls):
        """The raw samples of `urls`, each with its place in the set's order as "__id__": the shard's number
        in the set << 32 | the sample's number in its tar."""
        place = {u: i for i, u in enumerate(self.urls)}
        last, k = None, 0
        for s in self._samples(urls):
            url = s.get("__url__")
            k, last = (k + 1 if url == last else 0), url
            s["__id__"] = (place.get(url, 0) << 32) | k
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
        ids, keys = [], []
        self.tar_errors = 0
        for j, sample in enumerate(group):
            sample = {k.lower() if not k.startswith("__") else k: v for k, v in sample.items()}
            name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            ext = image_member(sample)
            try:
                if MISSING in sample:
                    raise ImageDecodeError("the shard ends before its manifest's sample count")
                if ext is None:
                    raise ImageDecodeError(
                        f"no image member (found {', '.join(k for k in sample if not k.startswith('__'))})"
                    )
                label = int(sample["cls"]) if "cls" in sample else -1
                seed = sample_seed(self.seed, self.epoch, self.rank, role, pos0 + j)
                args = (self.in_chans, self.transform, self.draw, seed, self.to_device, name, ext)
                items.append(worker_sample(sample[ext], *args))
            except (ImageDecodeError, ValueError) as e:
                n_bad += 1
                self.badlog(name, str(e))
                continue
            labels.append(label)
            ids.append(sample.get("__id__", -1))
            keys.append(name)
        tags = {} if self.train else dict(ids=ids, keys=keys)  # eval: which samples the batch holds
        return assemble(items, labels, n_bad, self.shape, self.norm, self.badlog, **tags)
