"""What data_tools.stats does: per-channel moments of a seeded subset of a data source, merged exactly over
worker processes."""

from __future__ import annotations

import math
import multiprocessing
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from mae.data import DataError, ImageDecodeError
from mae.data.bands import BandMismatch, decode_sample
from mae.data.loaders import pool_worker_signals
from mae.data.shards import first_shard_samples, image_member, resolve_shards
from mae.data.sources import SyntheticSource, is_shard_source, map_source

SPREAD = 16  # shards a sampled shard source is spread over (at least)


class Moments:
    """Per-channel count, mean and sum of squared deviations, merged exactly (Chan et al.) in float64."""

    def __init__(self, channels: int):
        self.n, self.mean, self.m2 = 0, np.zeros(channels), np.zeros(channels)
        self.samples, self.bad, self.first_bad = 0, 0, ""
        self.other_bands: Counter = Counter()  # band count -> samples of that count (not the one measured)

    def add_pixels(self, x: np.ndarray) -> None:
        """x: (pixels, C) float64."""
        mean = x.mean(0)
        self._merge(len(x), mean, ((x - mean) ** 2).sum(0))
        self.samples += 1

    def merge(self, other: Moments) -> None:
        self._merge(other.n, other.mean, other.m2)
        self.samples += other.samples
        self.other_bands += other.other_bands
        self.bad += other.bad
        self.first_bad = self.first_bad or other.first_bad

    def _merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))


def pixels(sample) -> np.ndarray:
    """A decoded sample (PIL image or float32 (C, H, W) tensor) -> (pixels, C) float64 in the loader's scale."""
    if isinstance(sample, torch.Tensor):
        return sample.numpy().astype(np.float64).reshape(sample.shape[0], -1).T
    a = np.asarray(sample, dtype=np.float64) / 255.0  # PIL: uint8 levels, as ToTensor divides them
    return a.reshape(-1, 1 if a.ndim == 2 else a.shape[2])


def _bad(m: Moments, name: str, reason: str) -> None:
    m.bad += 1
    m.first_bad = m.first_bad or f"{name}: {reason}"


# ----------------------------------------------------------------------------- jobs (run in worker processes)
_SOURCE = None  # the map-style source, set before the pool forks


def map_job(job: tuple[list[int], int]) -> Moments:
    indices, in_chans = job
    m = Moments(in_chans)
    for i in indices:
        try:
            m.add_pixels(pixels(_SOURCE.load(i, in_chans)))
        except BandMismatch as e:
            m.other_bands[e.bands] += 1
        except (ImageDecodeError, OSError) as e:
            _bad(m, _SOURCE.name(i), str(e))
    return m


def shard_job(job: tuple[str, list[int] | None, int, int]) -> Moments:
    """Samples of one shard: those at `positions` (sorted), or the first `limit` when positions is None."""
    import webdataset as wds

    url, positions, limit, in_chans = job
    m, want = Moments(in_chans), set(positions) if positions is not None else None
    last = max(positions) if positions else limit - 1

    def tar_error(exn: Exception) -> bool:
        _bad(m, url, f"{type(exn).__name__}: {exn}")
        return True

    for k, sample in enumerate(wds.tarfile_to_samples(handler=tar_error)(iter([{"url": url}]))):
        if k > last:
            break
        if want is not None and k not in want:
            continue
        sample = {key.lower() if not key.startswith("__") else key: v for key, v in sample.items()}
        ext, name = image_member(sample), f"{url}:{sample.get('__key__', '?')}"
        try:
            if ext is None:
                raise ImageDecodeError("no image member")
            m.add_pixels(pixels(decode_sample(sample[ext], ext, in_chans)))
        except BandMismatch as e:
            m.other_bands[e.bands] += 1
        except ImageDecodeError as e:
            _bad(m, name, str(e))
    return m


# ----------------------------------------------------------------------------- planning
ALL = 1 << 62  # "every sample" of a shard whose size is unknown


def plan(source: str, samples: int, seed: int, fmnist_dir: str):
    """(job function, jobs without in_chans, samples planned (None: unknown), samples in the source (None:
    unknown)). Map-style sources: a seeded subset of indices, in chunks. Shards: see the module docstring."""
    global _SOURCE
    rng = np.random.default_rng(seed)
    if not is_shard_source(source):
        _SOURCE = map_source(SimpleNamespace(fmnist_dir=fmnist_dir, synthetic_samples=2048), source,
                             img_size=224, train=True)  # fmt: skip
        n = len(_SOURCE)
        idx = np.arange(n) if samples <= 0 or samples >= n else np.sort(rng.choice(n, samples, replace=False))
        return map_job, [idx[a : a + 64].tolist() for a in range(0, len(idx), 64)], len(idx), n
    shards = resolve_shards(source)
    sizes = shards.sizes or [None] * len(shards.urls)
    total = sum(shards.sizes) if shards.sizes is not None else None
    every = samples <= 0 or (total is not None and samples >= total)
    per_shard = math.ceil(samples / min(SPREAD, len(shards.urls)))
    jobs, planned = [], 0
    for s in rng.permutation(len(shards.urls)):
        url, size = shards.urls[s], sizes[s]
        if every:
            jobs.append((url, None, ALL if size is None else size))
            continue
        if planned >= samples:
            break
        take = min(per_shard, samples - planned, per_shard if size is None else size)
        drawn = size is not None and take < size
        jobs.append((url, sorted(rng.choice(size, take, replace=False).tolist()) if drawn else None, take))
        planned += take
    return shard_job, jobs, (total if every else planned), total


def infer_channels(source: str, jobs, job_fn) -> int:
    """The channel count of the first readable sample: a TIFF / .npy file's bands, 1 for a grayscale image,
    3 for any other image."""
    if job_fn is map_job and not hasattr(_SOURCE, "read"):  # built-in sets
        return 3 if isinstance(_SOURCE, SyntheticSource) or _SOURCE.images.ndim == 4 else 1
    if job_fn is map_job:
        candidates = (
            (_SOURCE.name(i), _SOURCE.ext(i), _SOURCE.read(i)) for i in (jobs[0][:8] if jobs else [])
        )
    else:
        candidates = (c for url, _, _ in jobs[:4] for c in first_shard_samples(url, 8))
    for _, ext, data in candidates:
        try:
            x = decode_sample(data, ext, None)
        except ImageDecodeError:
            continue
        if isinstance(x, torch.Tensor):
            return int(x.shape[0])
        return 1 if x.mode in ("1", "L", "LA", "I", "F") or x.mode.startswith("I;") else 3
    raise DataError(
        f"data source {source!r}: no readable sample to take the channel count from; pass --in-chans"
    )


# ----------------------------------------------------------------------------- cli
def recipe_value(v: float) -> str:
    """4 significant digits, written so YAML reads a float back (1.234e-05, 0.1234, 1500.0)."""
    return repr(float(f"{v:.4g}"))


def compute(args) -> tuple[Moments, int, int | None, int]:
    job_fn, jobs, planned, total = plan(args.source, args.samples, args.seed, args.fmnist_dir)
    in_chans = args.in_chans or infer_channels(args.source, jobs, job_fn)
    jobs = [(*j, in_chans) if job_fn is shard_job else (j, in_chans) for j in jobs]
    m = Moments(in_chans)
    bar = tqdm(total=planned, unit="img", disable=not args.progress, file=sys.stderr)
    pool = (
        multiprocessing.get_context("fork").Pool(args.workers, initializer=pool_worker_signals)
        if args.workers > 1 and len(jobs) > 1
        else None
    )
    try:
        for part in pool.imap(job_fn, jobs) if pool else map(job_fn, jobs):
            m.merge(part)
            bar.update(part.samples + part.bad)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
    return m, planned, total, in_chans
