"""Training checkpoints: atomic directories, auto-resume, safe loading.

Layout of a run directory:

    output_dir/checkpoint-00001000/   model.safetensors   weights (fp32, unwrapped model)
                                      state.pt            optimizer (keyed by parameter name), scaler, step, epoch
                                                          (weights_only-loadable)
                                      rng-rank{R}.pt      each process's RNG states
                                      meta.json           step, epoch, time; written last
    output_dir/checkpoint-last -> checkpoint-00001000     symlink, replaced atomically

A checkpoint is written into `checkpoint-XXXXXXXX.tmp` and renamed when complete, so a directory with the
final name is always whole; leftovers of an interrupted write are removed on the next start. Nothing is
ever unpickled: weights are safetensors and the rest loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mae.config import ConfigError

CKPT_RE = re.compile(r"^checkpoint-(\d{8})$")
LAST = "checkpoint-last"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded: unreadable, cut short, or holding objects other than tensors and
    plain data (which are refused, never unpickled). One line; entry points exit with code 2."""


def ckpt_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (name matches and meta.json present), oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def remove_partial(output_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted writes (`*.tmp` checkpoint directories)."""
    removed = []
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob("checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch reports a failed write (full disk, quota) as a RuntimeError
            raise OSError(f"writing {path.name}: {_first_line(e)}") from None
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tmp_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{ckpt_name(step)}.tmp"


def write_rank_files(tmp: Path, rank: int) -> None:
    """Every rank: its own RNG states (the model and optimizer are written by rank 0)."""
    _torch_save(rng_state(), tmp / f"rng-rank{rank}.pt")


def write_main_files(tmp: Path, model_state: dict, train_state: dict, meta: dict) -> None:
    """Rank 0: weights (safetensors), optimizer & counters, and meta.json last."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    except SafetensorError as e:  # e.g. "I/O error: No space left on device (os error 28)"
        raise OSError(f"writing model.safetensors: {_first_line(e)}") from None
    _torch_save(train_state, tmp / "state.pt")
    with open(tmp / "meta.json", "w") as f:
        json.dump({**meta, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, keep: int) -> Path:
    """Rank 0: rename the finished temp directory into place, move `checkpoint-last`, prune old ones."""
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    _fsync_dir(tmp)
    os.replace(tmp, final)
    link_tmp = final.parent / f".{LAST}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, final.parent / LAST)
    _fsync_dir(final.parent)
    if keep > 0:
        for _, old in list_checkpoints(final.parent)[:-keep]:
            doomed = old.with_name(old.name + ".tmp")  # renamed first: a kill mid-delete leaves only a *.tmp
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def load_train_state(ckpt: Path, rank: int) -> tuple[dict, dict, dict | None]:
    """(model state dict, train state, this rank's RNG state or None) of a complete checkpoint.
    Raises CheckpointError naming the file when one is unreadable or holds more than plain data."""
    path = ckpt / "model.safetensors"
    try:
        model_state = load_file(str(path))
        path = ckpt / "state.pt"
        train_state = torch.load(path, map_location="cpu", weights_only=True)
        path = ckpt / f"rng-rank{rank}.pt"
        rng = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    except pickle.UnpicklingError as e:
        why = next(
            (ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln), _first_line(e)
        )
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, refused unloaded ({why.split('. Please')[0]}); "
            f"move {ckpt.name} out of {ckpt.parent} to resume from an earlier checkpoint"
        ) from None
    except (OSError, RuntimeError, SafetensorError, EOFError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({_first_line(e)}); move {ckpt.name} out of {ckpt.parent} to resume from "
            "an earlier checkpoint"
        ) from None
    return model_state, train_state, rng


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop metric rows logged after `last_step` (work lost with the process); returns rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line cut short by a kill
            continue
        if row.get("step", 0) > last_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped
