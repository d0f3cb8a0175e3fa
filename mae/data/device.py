"""The device half of the input pipeline: what a worker hands over (`RawBatch`), how it becomes a
normalised float batch on the device (`Finisher`), and the one-batch-ahead prefetch (`Prefetcher`).

Workers send uint8 crops (a quarter of the bytes of float32), or, with `data.decode=device`, the encoded
JPEG bytes plus the crop each sample drew; the main process decodes those in one batched call
(torchvision.io.decode_jpeg, nvJPEG on CUDA), crops, resizes and flips them on the device, then casts and
normalises. The same code runs on CPU tensors, so CI exercises it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .images import BadSampleLog, ImageDecodeError
from .jpeg import DeferredCrop, crop_here, decode_mode, resized_crop


@dataclass
class RawBatch:
    """One batch as a worker builds it. B' = samples kept (drawn minus bad); m of them still encoded."""

    pixels: torch.Tensor  # (B' - m, C, H, W) uint8 crops, or float32 normalised (fine-tuning transforms)
    labels: torch.Tensor  # (B',) int64
    n_bad: int
    jpeg: torch.Tensor | None = None  # (total bytes,) uint8: the m encoded JPEGs, concatenated
    offsets: torch.Tensor | None = None  # (m + 1,) int64: JPEG k is jpeg[offsets[k]:offsets[k + 1]]
    boxes: torch.Tensor | None = None  # (m, 4) int64 top, left, height, width
    flips: torch.Tensor | None = None  # (m,) bool
    deferred_at: torch.Tensor | None = None  # (m,) int64: positions of the encoded samples in the batch
    render: torch.Tensor | None = None  # (B',) int64: sample indices drawn on the device (synthetic data)
    names: list[str] | None = None  # (m,) the encoded samples' names, for the bad-sample log
    ids: torch.Tensor | None = None  # (B',) int64: the kept samples' places in their source (eval loaders)
    keys: list[str] | None = None  # (B',) their names: file, `#index`, `shard:key` (eval loaders)

    def pin_memory(self) -> RawBatch:  # called by the DataLoader's pin-memory thread
        return replace(self, pixels=self.pixels.pin_memory(), labels=self.labels.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = False) -> RawBatch:
        """Pixels and labels to `device`; encoded bytes stay on the host (the decoder reads them there)."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, pixels=move(self.pixels), labels=move(self.labels))

    def nbytes(self) -> int:
        """Bytes this batch moves from a worker to the main process."""
        tensors = (self.pixels, self.labels, self.jpeg, self.offsets, self.boxes, self.flips, self.render)
        return sum(t.nbytes for t in tensors if t is not None)


def assemble(items: list, labels: list[int], n_bad: int, shape: tuple[int, int, int], norm=None,
             badlog: BadSampleLog | None = None, ids: list[int] | None = None,
             keys: list[str] | None = None) -> RawBatch:  # fmt: skip
    """Worker side: samples (a (C, H, W) tensor, or a DeferredCrop) -> one RawBatch; an all-bad batch has B' = 0.
    `ids` and `keys` (eval loaders): each sample's place in its source and its name, kept with it.

    Multi-band samples (TIFF / .npy) arrive normalised float32. When a batch holds them together with uint8
    crops or encoded JPEGs (a folder that mixes both kinds), the others are decoded and normalised here with
    `norm` = (mean, std), by the operations of `normalize`, so the whole batch is float32 and normalised."""
    if norm is not None and any(_is_float(x) for x in items) and not all(_is_float(x) for x in items):
        items, kept, n_bad = _all_normalised(items, n_bad, shape, norm, badlog or BadSampleLog())
        labels = [labels[k] for k in kept]
        ids, keys = (None if v is None else [v[k] for k in kept] for v in (ids, keys))
    done = [x for x in items if not isinstance(x, DeferredCrop)]
    pixels = torch.stack(done) if done else torch.empty(0, *shape, dtype=torch.uint8)
    batch = RawBatch(pixels, torch.tensor(labels, dtype=torch.int64), n_bad)
    if ids is not None:
        batch.ids, batch.keys = torch.tensor(ids, dtype=torch.int64), list(keys)
    deferred = [(k, x) for k, x in enumerate(items) if isinstance(x, DeferredCrop)]
    if deferred:
        sizes = [len(x.data) for _, x in deferred]
        batch.jpeg = torch.frombuffer(bytearray(b"".join(x.data for _, x in deferred)), dtype=torch.uint8)
        batch.offsets = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int64)
        batch.boxes = torch.tensor([x.box for _, x in deferred], dtype=torch.int64)
        batch.flips = torch.tensor([x.flip for _, x in deferred], dtype=torch.bool)
        batch.deferred_at = torch.tensor([k for k, _ in deferred], dtype=torch.int64)
        batch.names = [x.name for _, x in deferred]
    return batch


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _all_normalised(items: list, n_bad: int, shape, norm, badlog: BadSampleLog):
    """Every item of a mixed batch as a normalised float32 (C, H, W): JPEGs left for the device are
    decoded and cropped here (crop_here), uint8 crops normalised; a JPEG that does not decode is dropped.
    Returns (items, positions of the kept ones, n_bad)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in norm)
    out, kept = [], []
    for k, x in enumerate(items):
        if isinstance(x, DeferredCrop):
            try:
                x = crop_here(x, shape[0], shape[1])
            except ImageDecodeError as e:
                badlog(x.name, str(e))
                n_bad += 1
                continue
        out.append(x if x.is_floating_point() else normalize(x[None], mean, std)[0])
        kept.append(k)
    return out, kept, n_bad


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std: the operations of ToTensor + Normalize, in their
    order, so the result equals the CPU float path bit for bit. float32, not the autocast dtype: the MAE
    loss takes its targets from these images, and bf16 targets would round away a pixel level."""
    return images.float().div_(255).sub_(mean).div_(std)


@dataclass
class Finisher:
    """RawBatch on the device -> (images float32 (B', C, S, S), labels (B',), n_bad)."""

    mean: list[float]
    std: list[float]
    img_size: int
    in_chans: int
    synthetic_split: int = 0
    badlog: BadSampleLog = field(default_factory=BadSampleLog)
    _stats: torch.Tensor | None = None  # (2, C) mean and std, on the device of the last batch

    def __call__(self, raw: RawBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        if raw.render is not None:
            from .synthetic import render

            pixels = render(raw.render, self.synthetic_split, self.img_size, self.in_chans, device)
            return self._normalize(pixels), raw.labels, raw.n_bad
        pixels, labels, n_bad = raw.pixels, raw.labels, raw.n_bad
        if raw.jpeg is not None:
            pixels, labels, n_bad = self._with_decoded(raw, device)
        if pixels.dtype != torch.uint8:  # fine-tuning transforms normalise in the worker
            return pixels, labels, n_bad
        return self._normalize(pixels), labels, n_bad

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._stats is None or self._stats.device != pixels.device:
            self._stats = torch.tensor([self.mean, self.std], dtype=torch.float32).to(pixels.device)
        return normalize(pixels, self._stats[0].view(-1, 1, 1), self._stats[1].view(-1, 1, 1))

    def _with_decoded(self, raw: RawBatch, device: torch.device):
        """Decode the encoded samples on `device` and put them at their positions; drop what fails."""
        crops, ok = decode_crops(raw, self.img_size, self.in_chans, device, self.badlog)
        n = len(raw.labels)
        is_deferred = torch.zeros(n, dtype=torch.bool)
        is_deferred[raw.deferred_at] = True
        decoded_at, done_at = raw.deferred_at.to(device), torch.nonzero(~is_deferred)[:, 0].to(device)
        out = torch.empty(n, self.in_chans, self.img_size, self.img_size, dtype=torch.uint8, device=device)
        out[decoded_at] = crops  # index tensors, not masks: no device sync
        out[done_at] = raw.pixels
        keep = torch.ones(n, dtype=torch.bool)
        keep[raw.deferred_at[~ok]] = False
        if keep.all():
            return out, raw.labels, raw.n_bad
        return out[keep.to(device)], raw.labels[keep.to(raw.labels.device)], raw.n_bad + int((~ok).sum())


def decode_crops(raw: RawBatch, size: int, in_chans: int, device: torch.device, badlog: BadSampleLog):
    """The encoded JPEGs of `raw` -> (crops uint8 (m, C, size, size) on `device`, decoded ok (m,) bool).

    One batched decode; when it fails, each image again on its own, then on the CPU (a JPEG variant the
    device decoder lacks), so only a file that no decoder reads is dropped (logged and counted). Crop +
    resize: bicubic with antialias, as PIL (see docs/data.md for the difference)."""
    from torchvision.io import decode_jpeg

    mode = decode_mode(in_chans)
    o = raw.offsets.tolist()
    data = [raw.jpeg[o[k] : o[k + 1]] for k in range(len(o) - 1)]
    try:
        images = decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        images = [_decode_one(d, mode, device, badlog, name) for d, name in zip(data, raw.names)]
    ok = torch.tensor([im is not None for im in images], dtype=torch.bool)
    crops = torch.empty(len(images), in_chans, size, size, dtype=torch.uint8, device=device)
    boxes, flips = raw.boxes.tolist(), raw.flips.tolist()
    for k, im in enumerate(images):
        if im is not None:
            crops[k] = resized_crop(im, boxes[k], flips[k], size)
    return crops, ok


def _decode_one(data: torch.Tensor, mode, device: torch.device, badlog: BadSampleLog, name: str):
    from torchvision.io import decode_jpeg

    for where in dict.fromkeys([device, torch.device("cpu")]):
        try:
            return decode_jpeg(data, mode=mode, device=where).to(device)
        except RuntimeError as e:
            reason = str(e).splitlines()[-1]
    badlog(name, reason)
    return None


class Prefetcher:
    """Finished batches on `device`, prepared one batch ahead.

    On CUDA the copy (pinned memory, non_blocking), the decode and the normalisation of batch k+1 run on a
    side stream while step k runs. Stream discipline: the side stream first waits for the compute stream
    (memory the step freed is not overwritten early), the compute stream waits for the event of the batch
    it takes, and every handed-over tensor is recorded on the compute stream, so the allocator does not
    reuse its memory for the next batch while the step still reads it. Elsewhere: a plain pass-through.
    """

    def __init__(self, raw_batches, device: torch.device, finish: Finisher):
        self.raw, self.device, self.finish = raw_batches, device, finish

    def __iter__(self):
        if self.device.type != "cuda":
            for raw in self.raw:
                yield self.finish(raw.to(self.device), self.device)
            return
        side, ahead = torch.cuda.Stream(self.device), None
        for raw in self.raw:
            side.wait_stream(
                torch.cuda.current_stream(self.device)
            )  # the compute stream, outside the context
            with torch.cuda.stream(side):
                batch = self.finish(raw.to(self.device, non_blocking=True), self.device)
                ready = torch.cuda.Event()
                ready.record(side)
            if ahead is not None:
                yield self._hand_over(*ahead)
            ahead = batch, ready
        if ahead is not None:
            yield self._hand_over(*ahead)

    def _hand_over(self, batch, ready: torch.cuda.Event):
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ready)
        images, labels, n_bad = batch
        images.record_stream(compute)
        labels.record_stream(compute)
        return images, labels, n_bad
