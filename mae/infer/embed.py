"""What `mae-embed` does with a data set: embed it on every process, gather the parts into the source's order,
write embeddings.npy + index.csv, score --knn as the pretraining's k-NN monitor does and draw --neighbours."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mae.weights.encoder import Embedder, EmbedError

NEIGHBOUR_QUERIES = 8  # rows of neighbours.png: the first of a class-balanced order of the queries


@dataclass
class Processes:
    """This process's place among those `accelerate launch` (or torchrun) started; one process otherwise."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # the launcher's device for this rank
    gather: Callable[[list], list] | None = None  # every rank's list, concatenated in rank order
    broadcast: Callable[[list], list] | None = None  # rank 0's list on every rank

    @classmethod
    def from_env(cls, device: str = "auto") -> Processes:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list, gather_object

        # as the training entry points: the CPU (gloo) without CUDA, under ACCELERATE_USE_CPU or --device cpu
        forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or str(device) == "cpu"
        state = PartialState(cpu=forced or not torch.cuda.is_available())
        return cls(
            state.process_index, state.num_processes, state.device, gather_object, broadcast_object_list
        )


@dataclass
class Embedded:
    """A data source's embeddings in its own order."""

    ids: np.ndarray  # (N,) int64: place in the source (mae.data.EvalLoader.keyed)
    vectors: np.ndarray  # (N, D) float32, or (N, L, D) for pool=tokens
    labels: np.ndarray  # (N,) int64; -1 unlabelled
    names: list[str]  # file path, `#index` or `shard:key`
    skipped: int  # unreadable samples, left out


def embed_source(embedder: Embedder, cfg, source: str, *, batch_size: int, max_samples: int,
                 procs: Processes, progress: bool) -> Embedded | None:  # fmt: skip
    """Every readable sample of `source` (each rank its share), on rank 0 in the source's order; None on the
    other ranks."""
    from tqdm import tqdm

    from mae.data import build_eval_loader

    s = embedder.spec
    loader = build_eval_loader(cfg, source=source, img_size=s.img_size, in_chans=s.in_chans,
                               batch_size=batch_size, rank=procs.rank, world_size=procs.world_size,
                               max_samples=max_samples)  # fmt: skip
    share = -(-loader.num_samples // procs.world_size)
    bar = tqdm(total=share, unit="img", desc=source, disable=True if not progress or procs.rank else None)
    ids, vectors, labels, names, skipped = [], [], [], [], 0
    for images, y, batch_ids, batch_names, n_bad in loader.keyed():
        if len(images):
            vectors.append(embedder(images).numpy())
            ids.append(batch_ids.numpy())
            labels.append(y.numpy())
            names += batch_names
        skipped += n_bad
        bar.update(len(images) + n_bad)
    bar.close()
    part = _part(ids, vectors, labels, names, skipped, embedder)
    if procs.gather is not None:
        parts = procs.gather([part])
        if procs.rank:
            return None
        part = _merge(parts)
    order = np.argsort(part.ids, kind="stable")  # the source's order, whatever the ranks and workers
    return Embedded(part.ids[order], part.vectors[order], part.labels[order],
                    [part.names[i] for i in order], part.skipped)  # fmt: skip


def _part(ids, vectors, labels, names, skipped, embedder: Embedder) -> Embedded:
    if not vectors:
        tail = (embedder.dim,) if embedder.pool != "tokens" else (0, embedder.dim)
        empty = np.zeros((0, *tail), np.float32)
        return Embedded(np.zeros(0, np.int64), empty, np.zeros(0, np.int64), [], skipped)
    return Embedded(np.concatenate(ids), np.concatenate(vectors), np.concatenate(labels), names, skipped)


def _merge(parts: list[Embedded]) -> Embedded:
    full = [p for p in parts if len(p.ids)] or parts[:1]
    return Embedded(
        np.concatenate([p.ids for p in full]),
        np.concatenate([p.vectors for p in full]),
        np.concatenate([p.labels for p in full]),
        [n for p in full for n in p.names],
        sum(p.skipped for p in parts),
    )


# ----------------------------------------------------------------------------------------------------------
# files


def write_outputs(out, emb: Embedded, paths: list[str], labels: list[str], dtype: str) -> None:
    """embeddings.npy and index.csv into `out` (mae.runs.files.OutputDir: they appear at its commit)."""

    with open(out.file("index.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label"])
        w.writerows(zip(paths, labels))
    with open(out.file("embeddings.npy"), "wb") as f:  # a file object: np.save would add ".npy" to the name
        np.save(f, emb.vectors.astype(dtype), allow_pickle=False)


@contextlib.contextmanager
def output_dir(opts: argparse.Namespace, data: str, procs: Processes):
    """OUT_DIR held by rank 0 for the whole command (mae.runs.files.OutputDir: never over SOURCE, DATA or
    VAL_DATA, one run at a time, its own earlier output replaced whole); every rank learns rank 0's verdict
    before anything is embedded. Yields the OutputDir on rank 0, None on the others."""
    from mae.runs.files import OutputDir, OutputError

    inputs = {"SOURCE": opts.source, "DATA": data, **({"--knn VAL_DATA": opts.knn} if opts.knn else {})}
    out, msg = OutputDir(opts.out_dir, "mae-embed", inputs, overwrite=opts.overwrite), ""
    if procs.rank == 0:
        try:
            out.__enter__()
        except OutputError as e:
            msg = str(e)
    if procs.broadcast is not None:
        msg = procs.broadcast([msg])[0]
    if msg:
        err = OutputError(msg)
        err.quiet = procs.rank != 0
        raise err
    if procs.rank:
        yield None
        return
    with contextlib.ExitStack() as stack:
        stack.push(out)
        yield out


def index_columns(emb: Embedded, source: str, classes: list[str] | None) -> tuple[list[str], list[str]]:
    """(path, label) of each row: the file (or `shard:key`), the dataset index for a built-in set; the class
    name (its number where the source names none), empty for unlabelled samples."""
    from mae.data.sources import parse_builtin

    builtin = parse_builtin(source, "train") is not None
    paths = [str(i) for i in emb.ids] if builtin else list(emb.names)
    return paths, label_names(emb.labels, classes)


def label_names(labels: np.ndarray, classes: list[str] | None) -> list[str]:
    names = list(classes or [])
    return [(names[y] if y < len(names) else str(y)) if y >= 0 else "" for y in labels.tolist()]


# ----------------------------------------------------------------------------------------------------------
# k-NN and neighbours


def knn_figure(bank: Embedded, queries: Embedded, k: int) -> float:
    """k-NN top-1 (percent) of the queries against the bank: mae.eval.metrics's, as the pretraining monitor
    (L2-normalised features, cosine similarity, votes weighted by exp(sim / 0.07))."""
    from mae.eval.metrics import knn_top1

    def feats(e: Embedded) -> torch.Tensor:
        return F.normalize(torch.from_numpy(e.vectors).float(), dim=1)

    return knn_top1(
        feats(bank), torch.from_numpy(bank.labels), feats(queries), torch.from_numpy(queries.labels), k=k
    )


def draw_neighbours(path: Path, embedder: Embedder, cfg, bank: Embedded, bank_source: str, k: int,
                    classes: list[str] | None, queries: Embedded | None = None,
                    query_source: str | None = None) -> None:  # fmt: skip
    """`path` (neighbours.png): NEIGHBOUR_QUERIES queries (from `queries`, else from the bank itself, which then does not
    count a query as its own neighbour) and their k nearest bank images by cosine similarity."""
    from mae.data.loaders import read_by_ids
    from mae.data.sources import balanced_order
    from mae.eval.figures import neighbour_grid

    own = queries is None
    queries, query_source = (bank, bank_source) if own else (queries, query_source)
    rows = balanced_order(queries.labels, 0)[:NEIGHBOUR_QUERIES]
    b = F.normalize(torch.from_numpy(bank.vectors).float(), dim=1)
    q = F.normalize(torch.from_numpy(queries.vectors[rows]).float(), dim=1)
    sims = q @ b.T  # (Q, N_bank)
    if own:
        sims[torch.arange(len(rows)), torch.from_numpy(rows)] = -float("inf")
    k = min(k, len(bank.ids) - int(own))
    if k < 1:
        raise EmbedError("--neighbours needs at least two images in DATA")
    top = sims.topk(k, dim=1).indices  # (Q, k), nearest first
    s = embedder.spec
    read = dict(cfg=cfg, img_size=s.img_size, in_chans=s.in_chans)
    q_imgs = torch.stack(read_by_ids(source=query_source, ids=queries.ids[rows], **read))
    n_imgs = torch.stack(read_by_ids(source=bank_source, ids=bank.ids[top.flatten().numpy()], **read))
    n_imgs = n_imgs.view(len(rows), k, *n_imgs.shape[1:])
    q_labels = label_names(queries.labels[rows], classes)
    n_labels = label_names(bank.labels[top.flatten().numpy()], classes)
    n_labels = [n_labels[i * k : (i + 1) * k] for i in range(len(rows))]
    grid = neighbour_grid(q_imgs, n_imgs, s.mean, s.std, q_labels, n_labels)
    grid.save(path, format="PNG")


# ----------------------------------------------------------------------------------------------------------
# the command


def data_config(source: str, embedder: Embedder, workers: int):
    """The data keys the eval loader reads: recipes/base.yaml's, then the source run's (fmnist_dir,
    synthetic_samples, ...), then the transform's mean / std / crop_pct and --workers."""
    from omegaconf import OmegaConf

    from mae.runs.record import run_config_of
    from mae.weights.encoder import base_data

    data = dict(base_data())
    run = run_config_of(Path(source))
    if run is not None and "data" in run:
        data.update(OmegaConf.to_container(run.data))
    s = embedder.spec
    data.update(mean=list(s.mean), std=list(s.std), crop_pct=float(s.crop_pct), num_workers=workers)
    return OmegaConf.create(data)


def _check_data(source: str, flag: str) -> None:
    """A data source that does not exist or is not one is a one-line error before the model is loaded."""
    from mae.data import DataError
    from mae.data.sources import SOURCE_HELP, is_shard_source, parse_builtin

    if parse_builtin(source, "train") or is_shard_source(source) or os.path.isdir(source):
        return
    reason = "no such file or directory" if not os.path.exists(source) else "not a data source"
    raise DataError(f"{flag} {source!r}: {reason} ({SOURCE_HELP})")


def run(opts: argparse.Namespace) -> int:
    from mae.config import ConfigError
    from mae.data import DataError, ImageDecodeError, train_split

    procs = Processes.from_env(opts.device)
    try:
        data, val = train_split(opts.data), opts.knn
        _check_data(data, "DATA")
        if val:
            _check_data(val, "--knn")
        with output_dir(opts, data, procs) as out:
            return _embed(opts, data, val, procs, out)
    except (EmbedError, DataError, ConfigError, ImageDecodeError, OSError) as e:
        if not getattr(e, "quiet", False):
            print(f"mae-embed: error: {e}", file=sys.stderr)
        return 2


def _embed(opts: argparse.Namespace, data: str, val: str | None, procs: Processes, out) -> int:
    """Embed DATA (and VAL_DATA) on every rank; rank 0 writes the files into `out` and scores --knn."""
    say = print if procs.rank == 0 else (lambda *a, **k: None)
    device = procs.device if opts.device == "auto" and procs.device is not None else opts.device
    t0 = time.perf_counter()
    embedder = Embedder.from_pretrained(
        opts.source, pool=opts.pool, layer=opts.layer, device=device, precision=opts.precision,
        img_size=opts.img_size, in_chans=opts.in_chans, mean=opts.mean, std=opts.std, crop_pct=opts.crop_pct,
        num_heads=opts.num_heads, log=say,
    )  # fmt: skip
    cfg = data_config(opts.source, embedder, opts.workers)
    classes, k = _labels_for_knn(opts, cfg, data, val)
    m = embedder.model
    say(f"mae-embed: {opts.source}: ViT {m.embed_dim}-d, block {len(m.blocks)}/{m.depth}, pool {opts.pool}, "
        f"{embedder.device.type} {embedder.precision}, {procs.world_size} process(es); "
        f"transform {embedder.spec.describe()}", flush=True)  # fmt: skip
    kw = dict(batch_size=opts.batch_size, procs=procs, progress=not opts.no_progress)
    bank = embed_source(embedder, cfg, data, max_samples=opts.max_samples, **kw)
    queries = embed_source(embedder, cfg, val, max_samples=opts.knn_max_samples, **kw) if val else None
    if procs.rank:
        return 0
    if not len(bank.ids):
        raise EmbedError(f"DATA {data!r}: no readable image ({bank.skipped} skipped)")
    write_outputs(out, bank, *index_columns(bank, data, classes), opts.dtype)
    if bank.skipped:
        print(
            f"mae-embed: skipped {bank.skipped} unreadable image(s) of {data} (named above)", file=sys.stderr
        )
    if queries is not None:
        top1 = _knn(bank, queries, data, val, k)
    if opts.neighbours:
        draw_neighbours(out.file("neighbours.png"), embedder, cfg, bank, data, opts.neighbours, classes,
                        queries, val)  # fmt: skip
    out.commit()
    shape = " x ".join(map(str, bank.vectors.shape))
    say(f"wrote {out.path / 'embeddings.npy'} ({shape} {opts.dtype}) and {out.path / 'index.csv'} "
        f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    if queries is not None:
        say(f"k-NN top-1 of {val} against {data} ({k}-NN, cosine, T 0.07; {len(queries.ids)} queries, "
            f"{len(bank.ids)} in the bank): {top1:.2f}% ({round(top1 * len(queries.ids) / 100)} right)")  # fmt: skip
    if opts.neighbours:
        say(f"wrote {out.path / 'neighbours.png'}")
    return 0


def _knn(bank: Embedded, queries: Embedded, data: str, val: str, k: int) -> float:
    if not len(queries.ids):
        raise EmbedError(f"--knn {val!r}: no readable image ({queries.skipped} skipped)")
    for flag, source, e in (("DATA", data, bank), ("--knn", val, queries)):
        if (e.labels < 0).any():
            raise EmbedError(f"{flag} {source!r} has unlabelled samples; the k-NN needs every label")
    return knn_figure(bank, queries, k)


def _labels_for_knn(opts, cfg, data: str, val: str | None) -> tuple[list[str] | None, int]:
    """(DATA's class names or None, the k of the k-NN). With --knn, VAL_DATA must have DATA's classes (as the
    pretraining's data.val; mae.eval.labelsets) and both must be labelled."""
    from mae.eval.labelsets import label_set
    from mae.runs.record import run_config_of

    bank = label_set(cfg, data)
    classes = list(bank.names) if bank is not None and bank.names else None
    run = run_config_of(Path(opts.source))
    k = opts.knn_k or (int(run.log.knn_k) if run is not None and "log" in run and "knn_k" in run.log else 20)
    if not val:
        return classes, k
    queries = label_set(cfg, val)
    for flag, source, labels in (("DATA", data, bank), ("--knn", val, queries)):
        if labels is not None and labels.num_classes == 0:
            raise EmbedError(f"{flag} {source!r} has no labels (class subfolders); the k-NN needs them")
    if bank is not None and queries is not None and bank.differs_from(queries):
        raise EmbedError(f"--knn {val!r} ({queries.describe()}) has other classes than DATA {data!r} "
                         f"({bank.describe()})")  # fmt: skip
    return classes, k
