"""What data_tools.make_shards does: read and validate the inputs, encode them, write the shards and their
manifest, resume an interrupted build."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mae.data import (
    FMNIST_CLASSES,
    MANIFEST,
    DataError,
    ImageDecodeError,
    decode_image,
    read_fashion_mnist,
    scan_folder,
)
from mae.data.bands import ext_of, is_array_ext, read_array, scale_array
from mae.data.images import convert_image
from mae.data.loaders import pool_worker_signals
from mae.data.shards import BUILD_STATE as STATE
from mae.data.sources import parse_builtin
from mae.runs.files import check_not_over_inputs, claimed_dir
from mae.runs.lock import LOCK_FILE

TAR_BLOCK = 512


class UsageError(Exception):
    """Bad command line or source: one line on stderr, exit code 2."""


@dataclass
class Input:
    src: str  # what the user knows it by: a path, or "fashion-mnist:train#i"
    label: int
    path: str | None = None  # file to read
    pixels: np.ndarray | None = None  # or in-memory uint8 pixels


@dataclass
class Encoded:
    pos: int
    src: str
    label: int
    ext: str = ""
    data: bytes = b""
    error: str = ""
    fatal: bool = False  # an error of the options, not of the input: the build stops (exit 2)


# ------------------------------------------------------------------------------------------------ inputs
def collect_inputs(source: str, fmnist_dir: str | None) -> tuple[list[Input], list[str] | None]:
    """(inputs in source order, class names or None). Raises UsageError for a missing or empty source."""
    builtin = parse_builtin(source, "train")
    if builtin and builtin[0] == "fashion-mnist":
        try:
            images, labels = read_fashion_mnist(fmnist_dir, builtin[1])
        except DataError as e:
            raise UsageError(str(e)) from None
        inputs = [
            Input(f"fashion-mnist:{builtin[1]}#{i}", int(y), pixels=x)
            for i, (x, y) in enumerate(zip(images, labels))
        ]
        return inputs, list(FMNIST_CLASSES)
    if os.path.isdir(source):
        try:
            folder = scan_folder(source)
        except DataError as e:
            raise UsageError(str(e)) from None
        inputs = [
            Input(p.decode(), int(y), path=os.path.join(source, p.decode()))
            for p, y in zip(folder.paths, folder.labels)
        ]
        return inputs, (folder.classes or None)
    if os.path.isfile(source):
        return read_list(source)
    raise UsageError(
        f"source {source!r} does not exist (expected an image folder, a list/CSV file or 'fashion-mnist')"
    )


def read_list(list_file: str) -> tuple[list[Input], list[str] | None]:
    """A text/CSV file of `path[,label]` rows (relative paths are relative to the file). Integer labels are
    used as they are; other labels are class names, numbered in sorted order. A header row is skipped."""
    base = os.path.dirname(os.path.abspath(list_file))
    rows = []
    with open(list_file, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if len(row) > 2:
                raise UsageError(f"{list_file}:{n}: expected `path[,label]`, got {len(row)} columns")
            rows.append((n, row[0], row[1] if len(row) == 2 and row[1] != "" else None))
    if (
        rows
        and rows[0][1].lower() in ("path", "file", "filename", "image")
        and not os.path.exists(os.path.join(base, rows[0][1]))
    ):
        rows = rows[1:]
    if not rows:
        raise UsageError(f"source {list_file!r} lists no images")
    labelled = {lab is not None for _, _, lab in rows}
    if len(labelled) > 1:
        n = next(n for n, _, lab in rows if lab is None)
        raise UsageError(f"{list_file}:{n}: missing label (other rows have one)")
    names, classes = [lab for _, _, lab in rows], None
    if labelled == {True}:
        if all(_is_int(v) for v in names):
            labels = [int(v) for v in names]
            if min(labels) < 0:
                raise UsageError(f"{list_file}: labels must be >= 0")
        else:
            classes = sorted(set(names))
            labels = [classes.index(v) for v in names]
    else:
        labels = [-1] * len(rows)
    return [Input(p, y, path=os.path.join(base, p)) for (_, p, _), y in zip(rows, labels)], classes


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ encoding
def encode(job: tuple[int, Input, dict]) -> Encoded:
    """Read, validate (full decode) and optionally resize / re-encode one input."""
    pos, inp, opt = job
    out = Encoded(pos, inp.src, inp.label)
    try:
        if inp.path is not None and is_array_ext(ext_of(inp.path)):
            return _encode_array(out, inp.path, opt)
        if inp.pixels is not None:
            img, data, ext = Image.fromarray(inp.pixels), None, "png"
        else:
            with open(inp.path, "rb") as f:
                data = f.read()
            img = decode_image(data)
            ext = {"jpeg": "jpg", "tiff": "tif"}.get(
                inp.path.rsplit(".", 1)[-1].lower(), inp.path.rsplit(".", 1)[-1].lower()
            )
        fmt, size = opt["format"], opt["resize"]
        if size and min(img.size) > size:
            w, h = img.size
            scale = size / min(w, h)
            img = (img if img.mode in ("L", "RGB", "RGBA") else _normal_mode(img)).resize(
                (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)  # fmt: skip
            data, fmt = None, fmt if fmt != "keep" else ("jpg" if ext == "jpg" else "png")
        if fmt == "keep" and data is not None:
            out.ext, out.data = ext, data
        else:
            fmt = "png" if fmt == "keep" else fmt
            out.ext, out.data = fmt, _encode_image(img, fmt, opt["quality"])
    except (ImageDecodeError, OSError, ValueError) as e:
        out.error = str(e) or type(e).__name__
    return out


def _encode_array(out: Encoded, path: str, opt: dict) -> Encoded:
    """A TIFF / .npy input, validated as the loader reads it (mae.data.bands: layout, dtype, finite values):
    packed as its own bytes; with --resize (shorter side above S) as an .npy of the shrunk array in the file's
    dtype; with --format jpg|png as that image when an image can hold it (uint8 with 1, 3 or 4 bands, uint16
    with 1), otherwise the build stops (the option cannot apply)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        ext = {"tiff": "tif"}.get(ext_of(path), ext_of(path))
        a, how = read_array(data, ext)
        scale_array(a)
    except (ImageDecodeError, OSError) as e:
        out.error = str(e) or type(e).__name__
        return out
    size, fmt = opt["resize"], opt["format"]
    if size and min(a.shape[:2]) > size:
        a, data = shrink_array(a, size), None
    if fmt != "keep":
        img = _array_image(a)
        if img is None:
            out.error, out.fatal = (
                f"{how} ({a.dtype}) cannot be written as {fmt}; pack arrays with --format keep",
                True,
            )
            return out
        out.ext, out.data = fmt, _encode_image(img, fmt, opt["quality"])
    elif data is None:
        buf = io.BytesIO()
        np.save(buf, a)
        out.ext, out.data = "npy", buf.getvalue()
    else:
        out.ext, out.data = ext, data
    return out


def shrink_array(a: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> shorter side `size`: antialiased bicubic (the loaders' resize) on float32, integers rounded
    and clipped back to their dtype, bool thresholded at 0.5."""
    import torch
    from torchvision.transforms.v2 import functional as F

    h, w = a.shape[:2]
    scale = size / min(h, w)
    shape = [max(1, round(h * scale)), max(1, round(w * scale))]
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))
    r = (
        F.resize(t, shape, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        .numpy()
        .transpose(1, 2, 0)
    )
    if a.dtype == np.bool_:
        return r > 0.5
    if a.dtype.kind in "ui":
        info = np.iinfo(a.dtype)
        return np.clip(np.rint(r), info.min, info.max).astype(a.dtype)
    return r.astype(a.dtype)


def _array_image(a: np.ndarray) -> Image.Image | None:
    """The PIL image of an (H, W, C) array an image format can hold, or None."""
    c = a.shape[2]
    if a.dtype == np.uint8 and c in (1, 3, 4):
        return Image.fromarray(np.ascontiguousarray(a[:, :, 0] if c == 1 else a))  # L, RGB, RGBA
    if a.dtype == np.uint16 and c == 1:
        return Image.fromarray(np.ascontiguousarray(a[:, :, 0]))
    return None


def _normal_mode(img: Image.Image) -> Image.Image:
    """Modes PIL cannot resize or write everywhere (16-bit, CMYK, palette, ...) -> L, RGB or RGBA."""
    gray = img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;")
    alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    return convert_image(img, 4 if alpha and not gray else (1 if gray else 3))


def _encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img = (
            img
            if img.mode in ("L", "RGB")
            else convert_image(_normal_mode(img), 1 if img.mode in ("L", "LA") else 3)
        )
        img.save(buf, format="JPEG", quality=quality)
    else:
        img = img if img.mode in ("L", "RGB", "RGBA", "I;16") else _normal_mode(img)
        img.save(buf, format="PNG")
    return buf.getvalue()


def _tar_bytes(e: Encoded) -> int:
    """Bytes a sample adds to a tar: one header block per member, data padded to whole blocks."""
    sizes = [len(e.data), 64 + len(e.src), 8 if e.label >= 0 else -1]
    return sum(TAR_BLOCK + -(-s // TAR_BLOCK) * TAR_BLOCK for s in sizes if s >= 0)


# ------------------------------------------------------------------------------------------------ writing
class ShardWriter:
    """Writes PREFIX-NNNNNN.tar.partial, renames it to PREFIX-NNNNNN.tar when full, then records progress."""

    def __init__(self, out_dir: str, prefix: str, state: dict, key_width: int):
        self.out_dir, self.prefix, self.state, self.key_width = out_dir, prefix, state, key_width
        self.tar, self.count, self.bytes, self.first = None, 0, 0, state["next"]

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def add(self, e: Encoded) -> None:
        if self.tar is None:
            self.path = os.path.join(self.out_dir, self.name(len(self.state["shards"])))
            self.file = open(self.path + ".partial", "wb")
            self.tar = wds.TarWriter(self.file, encoder=False, mtime=0)
        sample = {
            "__key__": f"{e.pos:0{self.key_width}d}",
            e.ext: e.data,
            "json": json.dumps({"src": e.src}).encode(),
        }
        if e.label >= 0:
            sample["cls"] = str(e.label).encode()
        self.tar.write(sample)
        self.count += 1
        self.bytes += _tar_bytes(e)

    def finish(self, next_pos: int) -> None:
        """Close and publish the current shard; `next_pos` is the first input not in it."""
        if self.tar is not None:
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.path + ".partial", self.path)
            self.state["shards"].append({"name": os.path.basename(self.path), "samples": self.count,
                                         "bytes": os.path.getsize(self.path), "first": self.first, "end": next_pos})  # fmt: skip
            self.tar = None
        self.state["next"], self.first, self.count, self.bytes = next_pos, next_pos, 0, 0
        _write_json(os.path.join(self.out_dir, STATE), self.state)


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _check_output(out_dir: str, prefix: str, fingerprint: dict, overwrite: bool) -> None:
    """Refuse (UsageError) an OUTPUT_DIR that holds another build or other files; changes nothing."""
    if overwrite or not os.path.isdir(out_dir):
        return
    state = _read_state(out_dir)
    if state is not None:
        if state["fingerprint"] != fingerprint:
            diff = sorted(
                k
                for k in set(fingerprint) | set(state["fingerprint"])
                if fingerprint.get(k) != state["fingerprint"].get(k)
            )
            raise UsageError(f"{out_dir} holds a build with different settings ({', '.join(diff)}); "
                             "use another directory or pass --overwrite")  # fmt: skip
        return
    if _ours(out_dir, prefix) or os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise UsageError(f"{out_dir} already holds shards not made by this command; "
                         "use another directory or pass --overwrite")  # fmt: skip
    others = sorted(f for f in os.listdir(out_dir) if f != LOCK_FILE)
    if others:
        raise UsageError(f"OUTPUT_DIR {out_dir} is not empty ({others[0]} is not part of a make_shards build); "
                         "choose an empty or new directory, or pass --overwrite to write into it")  # fmt: skip


def _ours(out_dir: str, prefix: str) -> list[str]:
    return [f for f in os.listdir(out_dir) if f.startswith(prefix + "-") and f.endswith((".tar", ".partial"))]


def _read_state(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, STATE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _resume_state(out_dir: str, prefix: str, fingerprint: dict, overwrite: bool) -> dict | None:
    """The recorded progress of the same build, a fresh state, or None when the build is already complete
    (the directory has passed _check_output)."""
    manifest_path = os.path.join(out_dir, MANIFEST)
    fresh = {"fingerprint": fingerprint, "shards": [], "next": 0, "skipped": []}
    if overwrite:
        for f in _ours(out_dir, prefix) + [STATE, MANIFEST, "classes.json"]:
            if os.path.exists(os.path.join(out_dir, f)):
                os.remove(os.path.join(out_dir, f))
        return fresh
    state = _read_state(out_dir)
    if state is None:
        return fresh
    if os.path.exists(manifest_path) and state.get("complete"):
        return None
    for f in _ours(out_dir, prefix):
        if f.endswith(".partial"):
            os.remove(os.path.join(out_dir, f))
    for i, s in enumerate(state["shards"]):  # keep the shards that are still intact
        p = os.path.join(out_dir, s["name"])
        if not os.path.exists(p) or os.path.getsize(p) != s["bytes"]:
            state["shards"], state["next"] = state["shards"][:i], s["first"]
            state["skipped"] = [k for k in state["skipped"] if k["pos"] < s["first"]]
            break
    return state


def build(args) -> int:
    inputs, classes = collect_inputs(args.source, args.fmnist_dir)
    order = list(range(len(inputs)))
    if args.seed is not None:
        random.Random(args.seed).shuffle(order)
    options = {
        k: getattr(args, k)
        for k in ("prefix", "samples_per_shard", "max_shard_bytes", "resize", "format", "quality", "seed")
    }
    fingerprint = {"source": os.path.abspath(args.source) if os.path.exists(args.source) else args.source,
                   "inputs": len(inputs), **options}  # fmt: skip
    check_not_over_inputs(args.output_dir, {"SOURCE": args.source}, flag="OUTPUT_DIR")
    check = partial(_check_output, args.output_dir, args.prefix, fingerprint, args.overwrite)
    with claimed_dir(Path(args.output_dir), "OUTPUT_DIR", check):  # one build per directory
        return _build(args, inputs, classes, order, fingerprint)


def _build(args, inputs: list[Input], classes: list[str] | None, order: list[int], fingerprint: dict) -> int:
    state = _resume_state(args.output_dir, args.prefix, fingerprint, args.overwrite)
    if state is None:
        print(f"{args.output_dir}: already complete (same source and options); nothing to do")
        return 0
    start = state["next"]
    if start:
        print(
            f"resuming: {len(state['shards'])} shards already written, continuing at input {start} of {len(inputs)}"
        )
    writer = ShardWriter(args.output_dir, args.prefix, state, key_width=max(8, len(str(len(inputs)))))
    opt = {"format": args.format, "resize": args.resize, "quality": args.quality}
    jobs = ((pos, inputs[order[pos]], opt) for pos in range(start, len(inputs)))
    t0 = time.time()
    bar = tqdm(total=len(inputs), initial=start, unit="img", disable=not args.progress, file=sys.stderr)
    with _pool(args.workers) as imap:
        for e in imap(encode, jobs):
            bar.update(1)
            if e.fatal:
                raise UsageError(f"{e.src}: {e.error}")
            if e.error:
                state["skipped"].append({"pos": e.pos, "path": e.src, "reason": e.error})
                print(f"skipping {e.src}: {e.error}", file=sys.stderr)
                continue
            if writer.count and (
                writer.count >= args.samples_per_shard or writer.bytes + _tar_bytes(e) > args.max_shard_bytes
            ):
                writer.finish(e.pos)
            writer.add(e)
        writer.finish(len(inputs))
    bar.close()
    write_manifest(args, state, classes, inputs)
    total = sum(s["samples"] for s in state["shards"])
    dt = time.time() - t0
    print(f"wrote {total} samples in {len(state['shards'])} shards to {args.output_dir} "
          f"({len(state['skipped'])} inputs skipped; {(len(inputs) - start) / max(dt, 1e-9):.0f} inputs/s)")  # fmt: skip
    return 0


def write_manifest(args, state: dict, classes: list[str] | None, inputs: list[Input]) -> None:
    labels = [i.label for i in inputs]
    num_classes = len(classes) if classes else (max(labels) + 1 if min(labels) >= 0 else 0)
    manifest = {
        "format": "mae-shards/1",
        "source": state["fingerprint"]["source"],
        "total": sum(s["samples"] for s in state["shards"]),
        "num_classes": num_classes,
        "classes": classes,
        "skipped": len(state["skipped"]),
        "skipped_inputs": [{"path": k["path"], "reason": k["reason"]} for k in state["skipped"]],
        "options": {k: v for k, v in state["fingerprint"].items() if k not in ("source", "inputs")},
        "shards": [{k: s[k] for k in ("name", "samples", "bytes")} for s in state["shards"]],
    }
    if classes:
        _write_json(os.path.join(args.output_dir, "classes.json"), classes)
    _write_json(os.path.join(args.output_dir, MANIFEST), manifest)
    state["complete"] = True
    _write_json(os.path.join(args.output_dir, STATE), state)


class _pool:
    """`with _pool(n) as imap:` an ordered imap over n processes (in-process when n <= 1)."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def __enter__(self):
        if self.workers <= 1:
            return map
        self.pool = multiprocessing.get_context("fork").Pool(self.workers, initializer=pool_worker_signals)
        return lambda f, jobs: self.pool.imap(f, jobs, chunksize=8)

    def __exit__(self, exc_type, *exc):
        if self.pool is None:
            return
        if exc_type is None:  # every job done: the workers leave at the pool's end-of-work sentinel
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()
