"""Persistence of a training run: its checkpoints (atomic directories, auto-resume, safe loading), the
best-so-far weights (`checkpoint-best/`) and the metrics rows that a resume drops. The Trainer calls it; nothing
else writes a checkpoint.

Layout of a run directory:

    output_dir/checkpoint-00001000/   model.safetensors   weights (fp32, unwrapped model)
                                      state.pt            optimizer (keyed by parameter name), scaler, step, epoch
                                                          (weights_only-loadable)
                                      rng-rank{R}.pt      each process's RNG states
                                      config.yaml         the settings these weights were trained with
                                      meta.json           step, epoch, time; written last
    output_dir/checkpoint-last -> checkpoint-00001000     symlink, replaced atomically

    output_dir/checkpoint-best/       model.safetensors, config.yaml, meta.json (step, the metric)   the best so far

A checkpoint is written into `checkpoint-XXXXXXXX.tmp` and renamed when complete, so a directory with the
final name is always whole; leftovers of an interrupted write are removed on the next start. Nothing is
ever unpickled: weights are safetensors and the rest loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mae.runs.files import atomic_dir, atomic_text, fsync_dir, recover_dir, replace_dir
from mae.runs.record import (  # noqa: F401
    BEST,
    CONFIG,
    LAST,
    CheckpointError,
    ckpt_name,
    latest_checkpoint,
    list_checkpoints,
    recorded_config,
)
from mae.train import state as st
from mae.train.runtime import TrainingError


def remove_partial(output_dir: str | Path) -> list[Path]:
    """Delete leftovers of interrupted writes (`*.tmp` checkpoint directories); put back a checkpoint (or
    checkpoint-best) that a kill caught between the two renames of its replacement."""
    removed = []
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob("checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        for p in root.glob("checkpoint-*.old"):
            if not recover_dir(p.with_name(p.name[: -len(".old")])):
                shutil.rmtree(p, ignore_errors=True)
    return removed


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


def tmp_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{ckpt_name(step)}.tmp"


def write_rank_files(tmp: Path, rank: int) -> None:
    """Every rank: its own RNG states (the model and optimizer are written by rank 0)."""
    _torch_save(st.rng_state(), tmp / f"rng-rank{rank}.pt")


def write_main_files(tmp: Path, model_state: dict, train_state: dict, meta: dict, record: str = "") -> None:
    """Rank 0: weights (safetensors), optimizer & counters, the config the weights were trained with (`record`,
    config.yaml), and meta.json last."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    except SafetensorError as e:  # e.g. "I/O error: No space left on device (os error 28)"
        raise OSError(f"writing model.safetensors: {_first_line(e)}") from None
    _torch_save(train_state, tmp / "state.pt")
    if record:
        (tmp / CONFIG).write_text(record)
    with open(tmp / "meta.json", "w") as f:
        json.dump({**meta, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, keep: int) -> Path:
    """Rank 0: rename the finished temp directory into place, move `checkpoint-last`, prune old ones."""
    final = replace_dir(tmp, tmp.with_name(tmp.name[: -len(".tmp")]))
    link_tmp = final.parent / f".{LAST}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, final.parent / LAST)
    fsync_dir(final.parent)
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


def checkpoint_step(ck: Path) -> tuple[int, bool]:
    """(the step a complete checkpoint holds, whether evaluations of it are pending), from its meta.json."""
    try:
        meta = json.loads((ck / "meta.json").read_text())
        return int(meta["step"]), bool(meta.get("pending"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ck}/meta.json cannot be read ({_first_line(e)}); move {ck.name} out of "
                              f"{ck.parent} to resume from an earlier checkpoint") from None  # fmt: skip


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
        atomic_text(path, "".join(line + "\n" for line in kept))
    return dropped


# ----------------------------------------------------------------------------------------------------------
# saving and resuming a run


class Checkpointer:
    """Writes and reads the checkpoints of one run directory for every rank of the launch.

    `any_rank(flag)` is true on every rank when `flag` is on any (and is a barrier): a write failure on one
    rank stops them all instead of leaving the others waiting at a barrier."""

    def __init__(self, out: Path, acc, sharded: bool, keep: int, any_rank: Callable[[bool], bool], log=print):
        self.out, self.acc, self.sharded, self.keep = Path(out), acc, sharded, keep
        self.any_rank, self.log = any_rank, log

    def save(self, step: int, model: torch.nn.Module, optimizer, groups: list[dict], train: dict, meta: dict,
             record: str = "") -> Path:  # fmt: skip
        """All ranks: an atomic checkpoint of `step`: weights, optimizer state (by parameter name), `train`
        (scaler, counters), the run's config (`record`) and `meta` in meta.json. A failure on any rank raises
        TrainingError on all, leaving the previous checkpoint as it was."""
        tmp = tmp_dir(self.out, step)
        main = self.acc.is_main_process
        err: OSError | None = None

        def attempt(fn) -> None:
            nonlocal err
            if err is None:
                try:
                    fn()
                except OSError as e:
                    err = e

        if main:
            attempt(lambda: (shutil.rmtree(tmp) if tmp.exists() else None, tmp.mkdir(parents=True)))
        self.acc.wait_for_everyone()
        attempt(lambda: write_rank_files(tmp, self.acc.process_index))
        # sharded: every rank takes part in gathering the full state; rank 0 alone holds and writes it
        gather = main or self.sharded
        model_state = st.model_state(model) if gather else None
        optim_state = st.optimizer_state(model, st.inner_optimizer(optimizer), groups) if gather else None
        if main:
            attempt(
                partial(write_main_files, tmp, model_state, {"optimizer": optim_state, **train}, meta, record)
            )
        del model_state, optim_state
        self._raise_if_any_failed(err, step)
        if main:
            attempt(lambda: commit(tmp, self.keep))
        self._raise_if_any_failed(err, step)
        return tmp.with_name(tmp.name[: -len(".tmp")])

    def _raise_if_any_failed(self, err: OSError | None, step: int) -> None:
        if self.any_rank(err is not None):
            why = f" ({err})" if err is not None else " on another process"
            raise TrainingError(
                f"checkpoint write at step {step} failed{why}; the previous checkpoint is intact"
            )

    def resume(self, path: Path, model: torch.nn.Module, optimizer, groups: list[dict]) -> dict:
        """Load a checkpoint into the model and optimizer (and this rank's RNG states); returns its train state
        (step, epoch, bad_samples, scaler, world_size). Settings of the optimizer's groups that differ from the
        checkpoint's are said in one line each."""
        model_state, train_state, rng = load_train_state(path, self.acc.process_index)
        try:
            st.load_model_state(model, model_state)
        except (
            RuntimeError
        ) as e:  # a size the config does not pin (a run recorded before its class count was)
            why = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), _first_line(e))
            raise CheckpointError(f"{path} does not fit the model this run builds ({why}); use a new "
                                  "output_dir, or the settings it was trained with") from None  # fmt: skip
        del model_state
        try:
            changes = st.load_optimizer_state(model, optimizer, groups, train_state.pop("optimizer"))
        except ValueError as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit this run: {e}") from None
        for line in changes:
            self.log(line)
        if rng is not None:
            st.set_rng_state(rng)
        return train_state


# ----------------------------------------------------------------------------------------------------------
# the best weights so far


def best_keeper(cfg, acc, log=print, metric: str = "top1", label: str = "top-1"):
    """on_eval hook: the weights with the highest `metric` so far (fine-tuning: top-1, segmentation: mIoU) go
    to output_dir/checkpoint-best/ (replaced whole and atomically; the best score so far is read back on
    resume)."""
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        recover_dir(out / BEST)  # a kill landed between the two renames of its last replacement
    meta_path = out / BEST / "meta.json"
    best = {metric: json.loads(meta_path.read_text())[metric] if meta_path.is_file() else float("-inf")}

    def on_eval(model: torch.nn.Module, metrics: dict, step: int) -> None:
        if metrics[metric] <= best[metric]:
            return
        best[metric] = metrics[metric]
        if acc.is_main_process or st.is_sharded(model):  # sharded: every rank gathers, rank 0 writes
            state = st.model_state(model)
        if acc.is_main_process:
            save_best(out, state, {"step": step, "task": cfg.task, **metrics})
            log(f"new best {label} {metrics[metric]:.2f}% at step {step}: {out / BEST}")

    return on_eval


def save_best(out: Path, state: dict, meta: dict) -> Path:
    """Write the weights `state` (model_state of the model), the run's config as it trained them and `meta` to
    out/checkpoint-best/, atomically."""
    with atomic_dir(out / BEST, tmp=out / f"{BEST}.tmp") as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if (out / CONFIG).is_file():
            (tmp / CONFIG).write_bytes((out / CONFIG).read_bytes())
        (tmp / "meta.json").write_text(json.dumps(meta))
    return out / BEST
