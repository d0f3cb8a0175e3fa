"""What data_tools.verify_shards does: decode every member of every shard, check the counts against the manifest,
and report."""

from __future__ import annotations

import multiprocessing
import os
import tarfile
from collections import Counter

import numpy as np
from webdataset.tariterators import base_plus_ext

from mae.data import IMAGE_EXTS, MANIFEST, ImageDecodeError, convert_image, decode_image, read_manifest
from mae.data.bands import is_array_ext, read_array, scale_array
from mae.data.loaders import pool_worker_signals

SIZE_BINS = (32, 64, 128, 256, 384, 512, 768, 1024, 2048)


def _size_bin(w: int, h: int) -> str:
    """Shorter side, binned: '<=32', '<=64', ..., '>2048'."""
    s = min(w, h)
    return next((f"<={b}" for b in SIZE_BINS if s <= b), f">{SIZE_BINS[-1]}")


def check_shard(path: str) -> dict:
    """Decode every sample of one shard. Returns counts, problems [(key, reason)], histograms, pixel sums."""
    out = {"name": os.path.basename(path), "samples": 0, "problems": [], "labels": Counter(), "sizes": Counter(),
           "modes": Counter(), "n_pix": 0, "sum": np.zeros(3), "sumsq": np.zeros(3), "gray": True,
           "bands": {}}  # fmt: skip
    samples, order, reading = {}, [], None
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None:
                    out["problems"].append((m.name, "member name has no extension"))
                    continue
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                reading = m.name
                samples[key][ext.lower()] = tf.extractfile(m).read()
                reading = None
    except (tarfile.TarError, OSError, EOFError) as e:
        if reading is not None:  # that sample is cut short: report it, do not count it
            key = order.pop()
            samples.pop(key)
            out["problems"].append((key, f"truncated member {reading}: {e}"))
        else:
            where = f"after key {order[-1]}" if order else "at the start"
            out["problems"].append(("(tar)", f"truncated or corrupt tar {where}: {e}"))
    for key in order:
        _check_sample(key, samples[key], out)
    return out


def _check_sample(key: str, sample: dict, out: dict) -> None:
    out["samples"] += 1
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        out["problems"].append((key, f"no image member (members: {', '.join(sorted(sample))})"))
        return
    if "cls" in sample:
        try:
            out["labels"][int(sample["cls"])] += 1
        except ValueError:
            out["problems"].append((key, f"label is not an integer: {sample['cls'][:20]!r}"))
    if is_array_ext(ext):
        _check_array(key, ext, sample[ext], out)
        return
    try:
        img = decode_image(sample[ext])
    except ImageDecodeError as e:
        out["problems"].append((key, f"{ext}: {e}"))
        return
    out["sizes"][_size_bin(*img.size)] += 1
    out["modes"][img.mode] += 1
    gray = img.mode in ("1", "L", "I", "F") or img.mode.startswith("I;")
    out["gray"] &= gray
    a = (
        np.asarray(convert_image(img, 1 if gray else 3), dtype=np.float64).reshape(-1, 1 if gray else 3)
        / 255.0
    )
    out["n_pix"] += len(a)
    out["sum"] += a.sum(0)
    out["sumsq"] += (a**2).sum(0)


def _check_array(key: str, ext: str, data: bytes, out: dict) -> None:
    """A TIFF / .npy member read as the loader reads it; its pixel statistics per band count, after scaling."""
    try:
        a, _ = read_array(data, ext)
        x = scale_array(a).astype(np.float64).reshape(-1, a.shape[2])
    except ImageDecodeError as e:
        out["problems"].append((key, f"{ext}: {e}"))
        return
    c = a.shape[2]
    out["sizes"][_size_bin(a.shape[1], a.shape[0])] += 1
    out["modes"][f"{a.dtype}x{c}"] += 1
    n, s, ss, first = out["bands"].get(c, (0, np.zeros(c), np.zeros(c), key))
    out["bands"][c] = (n + len(x), s + x.sum(0), ss + (x**2).sum(0), first)


def _stats(n: int, s: np.ndarray, ss: np.ndarray) -> tuple[list[float], list[float]]:
    mean = s / max(n, 1)
    return mean.tolist(), np.sqrt(np.maximum(ss / max(n, 1) - mean**2, 0)).tolist()


def verify(directory: str, workers: int) -> dict:
    """Everything verify_shards reports, as a dict; `errors` lists what is wrong."""
    errors, manifest = [], read_manifest(directory)
    present = sorted(f for f in os.listdir(directory) if f.endswith(".tar"))
    partial = sorted(f for f in os.listdir(directory) if f.endswith(".partial"))
    errors += [
        f"{f}: unfinished shard (the build was interrupted; re-run make_shards to finish)" for f in partial
    ]
    if manifest is None:
        errors.append(f"no manifest ({MANIFEST}) in {directory}: counts cannot be checked")
        expected = {f: None for f in present}
    else:
        expected = {s["name"]: s.get("samples") for s in manifest["shards"]}
        errors += [f"{n}: listed in the manifest but missing" for n in expected if n not in present]
        errors += [f"{n}: not listed in the manifest" for n in present if n not in expected]
    paths = [os.path.join(directory, n) for n in expected if n in present]
    if workers > 1 and len(paths) > 1:
        with multiprocessing.get_context("fork").Pool(workers, initializer=pool_worker_signals) as pool:
            results = pool.map(check_shard, paths)
    else:
        results = [check_shard(p) for p in paths]
    labels, sizes, modes, n_pix, s, ss, gray = (
        Counter(),
        Counter(),
        Counter(),
        0,
        np.zeros(3),
        np.zeros(3),
        True,
    )
    bands = {}  # band count -> (pixels, sum, sum of squares, first sample) of the TIFF / .npy members
    for r in results:
        want = expected[r["name"]]
        if want is not None and want != r["samples"]:
            errors.append(f"{r['name']}: {r['samples']} samples, manifest says {want}")
        errors += [f"{r['name']}: {key}: {why}" for key, why in r["problems"]]
        labels.update(r["labels"])
        sizes.update(r["sizes"])
        modes.update(r["modes"])
        n_pix, s, ss, gray = n_pix + r["n_pix"], s + r["sum"], ss + r["sumsq"], gray and r["gray"]
        for c, (n, bs, bss, first) in r["bands"].items():
            m = bands.get(c, (0, 0.0, 0.0, f"{r['name']}: {first}"))
            bands[c] = (m[0] + n, m[1] + bs, m[2] + bss, m[3])
    if manifest is not None:
        total = sum(r["samples"] for r in results)
        if (
            manifest.get("total") is not None
            and total != manifest["total"]
            and not any("missing" in e for e in errors)
        ):
            errors.append(f"{total} samples in the shards, manifest total says {manifest['total']}")
        num_classes = manifest.get("num_classes") or 0
        bad = [y for y in labels if num_classes and not 0 <= y < num_classes]
        if bad:
            errors.append(f"labels outside [0, {num_classes}): {sorted(bad)[:10]}")
    if len(bands) > 1:
        counts = ", ".join(f"{c} bands (first {bands[c][3]})" for c in sorted(bands))
        errors.append(f"TIFF / .npy samples with different band counts: {counts}; a model takes one in_chans")
    c = 1 if gray else 3
    mean, std = _stats(n_pix, s[:c], ss[:c])
    band_stats = {c: dict(zip(("mean", "std"), _stats(*bands[c][:3]))) for c in sorted(bands)}
    if n_pix == 0 and len(bands) == 1:  # arrays only: the dataset's statistics are theirs
        mean, std = band_stats[next(iter(bands))]["mean"], band_stats[next(iter(bands))]["std"]
    return {"directory": directory, "shards": len(results), "samples": sum(r["samples"] for r in results),
            "labels": dict(sorted(labels.items())), "sizes": dict(sizes), "modes": dict(modes), "mean": mean,
            "std": std, "band_stats": band_stats, "images": n_pix > 0, "classes": (manifest or {}).get("classes"),
            "errors": errors}  # fmt: skip


def print_report(rep: dict) -> None:
    print(f"{rep['directory']}: {rep['samples']} samples in {rep['shards']} shards")
    if rep["labels"]:
        names = rep["classes"] or []
        print(
            "labels:  "
            + "  ".join(f"{names[y] if y < len(names) else y}={n}" for y, n in rep["labels"].items())
        )
    else:
        print("labels:  none (unlabelled)")
    print("shorter side:  " + "  ".join(f"{b}: {rep['sizes'][b]}" for b in _bin_order(rep["sizes"])))
    print("modes:  " + "  ".join(f"{m}={n}" for m, n in sorted(rep["modes"].items())))
    rows = [("", rep["mean"], rep["std"])] if rep["images"] or not rep["band_stats"] else []
    rows += [(f" ({c} bands)", b["mean"], b["std"]) for c, b in rep["band_stats"].items()]
    for what, mean, std in rows:
        print(
            f"mean{what}:  "
            + ", ".join(f"{v:.4f}" for v in mean)
            + "   std:  "
            + ", ".join(f"{v:.4f}" for v in std)
        )
    for e in rep["errors"][:200]:
        print(f"ERROR {e}")
    if len(rep["errors"]) > 200:
        print(f"... and {len(rep['errors']) - 200} more errors")
    print(f"{len(rep['errors'])} problems found" if rep["errors"] else "OK")


def _bin_order(sizes: dict) -> list[str]:
    keys = [f"<={b}" for b in SIZE_BINS] + [f">{SIZE_BINS[-1]}"]
    return [k for k in keys if k in sizes]
