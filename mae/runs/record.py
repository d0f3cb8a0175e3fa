"""What a run directory records and where: its checkpoints, `checkpoint-last`, `checkpoint-best`, and the
resolved configuration (`config.yaml`) the tools read a run's sizes and statistics from."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from mae.config import ConfigError

CKPT_RE = re.compile(r"^checkpoint-(\d{8})$")
LAST = "checkpoint-last"
BEST = "checkpoint-best"


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


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) for a run directory or one of its checkpoint directories."""
    p = Path(path)
    if (p / "model.safetensors").is_file() and (p.parent / "config.yaml").is_file():
        return p, p.parent
    if (p / "config.yaml").is_file():
        last = p / LAST
        ck = last.resolve() if last.exists() else latest_checkpoint(p)
        if ck is None or not (ck / "model.safetensors").is_file():
            raise ConfigError(f"{p} has no checkpoint yet")
        return ck, p
    raise ConfigError(f"{p} is neither a run directory (config.yaml) nor one of its checkpoints")


def load_run_config(run_dir: Path) -> DictConfig:
    with open(run_dir / CONFIG) as f:
        data = yaml.safe_load(f)
    data.pop("derived", None)
    return OmegaConf.create(data)


def task_run(run_dir: str | Path, task: str, which: str = "best") -> tuple[DictConfig, Path]:
    """(config the weights were trained with, weights file) of a `task` run directory: its best checkpoint
    (`which="best"`, when it has one) or its latest. ConfigError when it is no run of that task."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_run_config(run)
    if cfg.get("task") != task:
        raise ConfigError(f"{run_dir}: a {cfg.get('task')!r} run, not a {task} run (mae/{task}.py)")
    path = run / BEST / "model.safetensors"
    if which == "last" or not path.is_file():
        path = resolve_checkpoint(run)[0] / "model.safetensors"
    return checkpoint_config(path.parent), path  # the config these weights were trained with


def checkpoint_config(ck: Path) -> DictConfig:
    """The config a checkpoint's weights were trained with: its own config.yaml, else (older checkpoints) the
    run's."""
    return load_run_config(ck if (ck / CONFIG).is_file() else ck.parent)


def weights_checkpoint(source: str | Path) -> Path | None:
    """The checkpoint directory whose weights `source` means: a run directory's checkpoint-last (else its latest
    checkpoint), a checkpoint directory, or a file inside one; None for anything else."""
    p = Path(source)
    if p.is_file():
        p = p.parent
    if (p / "model.safetensors").is_file() and (p.parent / CONFIG).is_file():
        return p
    if (p / CONFIG).is_file() and not (p / "model.safetensors").is_file():
        last = p / LAST
        return last.resolve() if last.exists() else latest_checkpoint(p)
    return None


def run_config_of(source: str | Path) -> DictConfig | None:
    """The config the weights behind `source` (a run dir, a checkpoint dir or a file inside one) were trained
    with: the checkpoint's own record, else the run's config.yaml; None when `source` is not in a run."""
    ck = weights_checkpoint(source)
    if ck is not None and ((ck / CONFIG).is_file() or (ck.parent / CONFIG).is_file()):
        return checkpoint_config(ck)
    source = Path(source)
    for d in [source, *source.parents][:3]:
        if d.is_dir() and (d / CONFIG).is_file():
            return load_run_config(d)
    return None


# ----------------------------------------------------------------------------------------------------------
# what the weights were trained with, and what changed on the way

HISTORY = "config-history.jsonl"  # one row per resume that changed settings: from which step, what changed
CONFIG = (
    "config.yaml"  # in the run directory (the run as it goes on) and in each checkpoint (its weights' own)
)


def recorded_config(ck: Path) -> dict | None:
    """The settings (flat dotted keys) the weights of checkpoint `ck` were trained with: its own config.yaml,
    else (checkpoints written before they held one) the run's; None when neither is there."""
    for path in (ck / CONFIG, ck.parent / CONFIG):
        if path.is_file():
            from mae.config import flatten

            with open(path) as f:
                return flatten(yaml.safe_load(f) or {})
    return None


def truncate_history(out: Path, step: int) -> None:
    """Drop the history rows of resumes at `step` or later (that work is lost; a resume there writes its own)."""
    from mae.runs.files import atomic_text

    path = out / HISTORY
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if _row_step(line) < step]
    if len(kept) != len(rows):
        atomic_text(path, "".join(line + "\n" for line in kept))


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a row cut short by a kill: dropped with the later ones


def append_history(out: Path, step: int, changes: dict[str, tuple]) -> None:
    """One row: the settings that changed when the run resumed at `step` ({key: [before, after]})."""
    from mae.runs.files import atomic_text

    path = out / HISTORY
    old = path.read_text() if path.is_file() else ""
    row = {"step": step, "time": time.time(), "changed": {k: [a, b] for k, (a, b) in changes.items()}}
    atomic_text(path, old + json.dumps(row) + "\n")


def resume_point(out: Path, record: dict, resume: bool, found=()) -> Path | None:
    """The checkpoint a run in `out` resumes from (None: a fresh start), after checking that the directory holds
    this run (`record`: its settings, flat; `found`: the keys it took from its data; mae.config.check_compatible)."""
    from mae.config import check_compatible, flatten, load_yaml

    latest = latest_checkpoint(out)
    if (out / CONFIG).is_file():
        check_compatible(record, flatten(load_yaml(out / CONFIG)), out, found)
    if latest is not None and not resume:
        raise ConfigError(
            f"output_dir {out} has checkpoints and checkpoint.resume=false; choose an empty output_dir"
        )
    return latest if resume else None


def refuse_trained_with(out: Path, changes: dict[str, tuple]) -> None:
    """A resume may not change what the weights were trained to read (mae.config.TRAINED_WITH_KEYS)."""
    from mae.config import TRAINED_WITH_KEYS

    key = next((k for k in TRAINED_WITH_KEYS if k in changes), None)
    if key is not None:
        was, now = changes[key]
        raise ConfigError(
            f"output_dir {out}: its weights were trained with {key}={was}, not {now}; a resumed run keeps it "
            f"(pass {key}={was} or leave it out), or start a new output_dir with model.init={out}"
        )


def describe_changes(changes: dict[str, tuple], derived: bool = True) -> str:
    """'key before -> after, ...' (the derived values too, with `derived`)."""
    items = [(k, v) for k, v in changes.items() if derived or not k.startswith("derived.")]
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in items)


def write_record(out: Path, text: str, step: int, changes: dict[str, tuple]) -> str:
    """What a run that starts (step 0) or resumes at `step` records: config.yaml (`text`), and the history of
    changed settings (rows of lost work dropped; a row for `changes`). Returns the line to log ("" if none)."""
    from mae.runs.files import atomic_text

    truncate_history(out, step)  # resumes whose work was lost (every row, on a fresh start)
    said = ""
    if changes:
        append_history(out, step, changes)
        said = (f"resuming at step {step} with settings changed since its checkpoint: {describe_changes(changes)} "
                f"(recorded in {out / HISTORY})")  # fmt: skip
    atomic_text(out / CONFIG, text)
    return said
