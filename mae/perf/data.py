"""`mae-bench --data`: the input pipeline per worker, each decode mode side by side with the reference loader.

For every source and `data.decode` mode two rates are timed: the workers' part (read, decode or sniff the
JPEG header, crop, batch: what each DataLoader worker does) and the device part in the main process
(copy, JPEG decode + crop for data.decode=device, cast and normalise), with the bytes per image that
cross from the workers. `--reference` adds the reference MAE's loader on image folders:
torchvision ImageFolder + RandomResizedCrop (bicubic) + flip + ToTensor + Normalize. Configurations
are timed round-robin and the best round is reported (a shared machine only ever slows a run down).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import torch


def _endless(loader) -> Iterator:
    """The loader's raw batches, epoch after epoch."""
    for epoch in itertools.count():
        yield from loader.raw(epoch)


def _reference_batches(cfg, root: str, img_size: int, batch: int, workers: int) -> Iterator:
    """The reference MAE pretraining loader (main_pretrain.py's transform over torchvision ImageFolder)."""
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose([
        T.RandomResizedCrop(img_size, scale=(float(cfg.scale_min), 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(list(cfg.mean), list(cfg.std)),
    ])  # fmt: skip
    dataset = datasets.ImageFolder(root, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )
    for _ in itertools.count():
        for images, labels in loader:
            yield images, labels, 0


class _Case:
    """One row: a batch source timed in slices of `n` batches; the best slice counts."""

    def __init__(self, row: dict, batches: Iterator, finish=None, device=None):
        self.row, self.batches, self.finish, self.device = row, batches, finish, device
        self.best, self.best_device, self.nbytes, self.images = 0.0, 0.0, 0, 0

    def run(self, n: int) -> None:
        got, t0, nbytes, device_s = 0, time.perf_counter(), 0, 0.0
        held = []
        for raw in itertools.islice(self.batches, n):
            if self.finish is None:  # the reference: float batches straight from the loader
                got, nbytes = got + len(raw[0]), nbytes + raw[0].nbytes + raw[1].nbytes
                continue
            nbytes += raw.nbytes()
            held.append(raw)
        worker_s = time.perf_counter() - t0
        for raw in held:  # the main process's part, timed apart from the workers'
            t = time.perf_counter()
            images, _, _ = self.finish(raw.to(self.device), self.device)
            _sync(self.device)
            device_s += time.perf_counter() - t
            got += len(images)
        self.images = got
        self.nbytes = nbytes / max(got, 1)
        self.best = max(self.best, got / max(worker_s, 1e-9))
        if held:
            self.best_device = max(self.best_device, got / max(device_s, 1e-9))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_data(sources: list[str], data_cfg, img_size: int, in_chans: int, batch: int, batches: int,
               workers: int, decodes: tuple[str, ...] = ("cpu",), reference: bool = False, rounds: int = 1,
               device: torch.device | None = None) -> list[dict]:  # fmt: skip
    """Rows {source, loader, decode, workers, images, img_per_s, img_per_s_per_worker, bytes_per_image,
    device_img_per_s}. With workers=0 everything runs in this process on one thread: one worker's rate."""
    from mae.data import build_train_loader

    torch.set_num_threads(1)
    device = device or torch.device("cpu")
    cases = []
    for src in sources:
        for mode in decodes:
            cfg = _with(data_cfg, decode=mode)
            loader = build_train_loader(cfg, source=src, img_size=img_size, in_chans=in_chans, batch_size=batch,
                                        augment="mae", seed=0, rank=0, world_size=1)  # fmt: skip
            it = _endless(loader)
            next(it)  # worker start-up, file opening
            row = {"source": src, "loader": "mae", "decode": loader.decode, "workers": workers}
            cases.append(_Case(row, it, loader.finish, device))
        if reference and os.path.isdir(src):
            it = _reference_batches(data_cfg, src, img_size, batch, workers)
            next(it)
            cases.append(
                _Case({"source": src, "loader": "reference", "decode": "cpu", "workers": workers}, it)
            )
    for _ in range(rounds):
        for case in cases:
            case.run(batches)
    rows = []
    for c in cases:
        per_worker = c.best / max(workers, 1)
        rows.append({**c.row, "images": c.images, "img_per_s": c.best, "img_per_s_per_worker": per_worker,
                     "bytes_per_image": round(c.nbytes), "device_img_per_s": c.best_device or None})  # fmt: skip
    return rows


def _with(cfg, **kw):
    """A copy of a data config (OmegaConf or namespace) with keys replaced."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        out = OmegaConf.create(OmegaConf.to_container(cfg))
        for k, v in kw.items():
            out[k] = v
        return out
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(cfg), **kw})


def format_rows(report: dict) -> str:
    """The per-worker table, with each loader's ratio to the reference on the same source."""
    ref = {r["source"]: r["img_per_s_per_worker"] for r in report["data"] if r["loader"] == "reference"}
    head = ["source", "loader", "decode", "img/s/worker", "vs ref", "bytes/img", "main img/s"]
    lines = [head]
    for r in report["data"]:
        ratio = r["img_per_s_per_worker"] / ref[r["source"]] if r["source"] in ref else None
        lines.append([
            os.path.basename(r["source"].rstrip("/")) or r["source"], r["loader"], r["decode"],
            f"{r['img_per_s_per_worker']:.1f}", f"{ratio:.2f}x" if ratio else "-", f"{r['bytes_per_image']:,}",
            f"{r['device_img_per_s']:.0f}" if r["device_img_per_s"] else "-",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    where = (
        f"{report['data'][0]['workers']} worker processes" if report["data"][0]["workers"] else "one worker"
    )
    title = (f"input pipeline, {report['img_size']} px, batch {report['batch']}, MAE crops, {where}; "
             f"main-process part on {report.get('device', 'cpu')}:")  # fmt: skip
    return "\n".join([title, *("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines)])
