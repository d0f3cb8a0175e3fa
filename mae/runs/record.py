"""What a run directory records and where: its checkpoints, `checkpoint-last`, `checkpoint-best`, and the
resolved configuration (`config.yaml`) the tools read a run's sizes and statistics from."""

from __future__ import annotations

import re
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
    with open(run_dir / "config.yaml") as f:
        data = yaml.safe_load(f)
    data.pop("derived", None)
    return OmegaConf.create(data)


def task_run(run_dir: str | Path, task: str, which: str = "best") -> tuple[DictConfig, Path]:
    """(config, weights file) of a `task` run directory: its best checkpoint (`which="best"`, when it has one) or
    its latest. ConfigError when it is no run of that task."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_run_config(run)
    if cfg.get("task") != task:
        raise ConfigError(f"{run_dir}: a {cfg.get('task')!r} run, not a {task} run (mae/{task}.py)")
    path = run / BEST / "model.safetensors"
    if which == "last" or not path.is_file():
        path = resolve_checkpoint(run)[0] / "model.safetensors"
    return cfg, path


def run_config_of(source: str | Path) -> DictConfig | None:
    """The run's config for a run dir, a checkpoint dir or a file inside one; else None."""
    source = Path(source)
    for d in [source, *source.parents][:3]:
        if d.is_dir() and (d / "config.yaml").is_file():
            return load_run_config(d)
    return None
