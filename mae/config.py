"""Configuration: recipes/base.yaml (every key) <- recipes/NAME.yaml (a delta) <- CLI `key=value`.

The schema is base.yaml itself: a key that base.yaml does not define is unknown, and a value must have
the type of the default it replaces. Derived quantities (effective batch, lr, step counts) are computed in
one place, `derive`, printed at start and saved with the resolved config.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# train.compile: auto, on/off, or a torch.compile mode; reduce-overhead replays the compiled forward and backward
# as CUDA graphs (on the CPU it compiles as default)
CHOICES = {
    "train.compile": ("auto", "true", "false", "default", "max-autotune-no-cudagraphs", "reduce-overhead"),
    "train.schedule": ("cosine", "poly", "step"),
    "train.eval_mode": ("whole", "slide"),
    "model.seg_head": ("upernet", "linear"),
    "model.pos_embed_adapt": ("recompute", "resample"),
}


class ConfigError(ValueError):
    """A user-facing configuration problem (one line; entry points exit with code 2)."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_type(key: str, value: Any, default: Any, where: str) -> Any:
    """Return `value` coerced to the type of `default`, or raise ConfigError naming the key."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key}={value!r} is not {expected} (default: {default!r})")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise bad("a boolean (true/false)")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 4e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if isinstance(default, str):
        # YAML reads `key=false` as a boolean; string keys such as log.progress (auto|true|false) take it
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad("a string")
    if isinstance(default, list):
        if not isinstance(value, list):
            raise bad("a list like [a, b]")
        if default:
            return [_check_type(f"{key}[{i}]", v, default[0], where) for i, v in enumerate(value)]
        return value
    return value


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _apply(flat: dict[str, Any], updates: dict[str, Any], base: dict[str, Any], where: str) -> None:
    for key, value in updates.items():
        if key not in base:
            raise _unknown(key, sorted(base), where)
        flat[key] = _check_type(key, value, base[key], where)
        if key in CHOICES and flat[key] not in CHOICES[key]:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(CHOICES[key])}")


# ----------------------------------------------------------------------------------------------------------
# Which keys a task reads. Each task declares its own set beside its build_task (mae/tasks/<task>.py,
# `READS`), built from the groups below; a key set in a recipe or on the command line that the task does not
# read is refused like an unknown one: a setting is used or refused, never accepted and ignored.

COMMON_KEYS = frozenset((
    "output_dir", "seed",
    "model.name", "model.img_size", "model.patch_size", "model.in_chans", "model.attn_backend", "model.embed_dim",
    "model.depth", "model.num_heads", "model.init", "model.pos_embed_adapt",
    "data.train", "data.val", "data.fmnist_dir", "data.num_workers", "data.shuffle_buffer", "data.epoch_samples",
    "data.resampled", "data.synthetic_samples", "data.label_fraction", "data.mean", "data.std", "data.scale_min",
    "data.hflip", "data.crop_pct",
    "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum", "train.blr", "train.lr",
    "train.min_lr", "train.warmup_epochs", "train.warmup_steps", "train.schedule", "train.weight_decay", "train.betas", "train.optimizer", "train.clip_grad",
    "train.precision", "train.compile",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.resume", "checkpoint.max_requeues",
    "checkpoint.stop_check_s", "checkpoint.lock_wait_s",
    "log.every_steps", "log.wandb", "log.wandb_project", "log.tensorboard", "log.progress",
))  # fmt: skip
# The keys of the classification loaders (shards, label subsets, the synthetic set, classification crops): tasks
# on image / mask pairs or COCO annotations leave them out.
CLASSIFICATION_DATA_KEYS = frozenset((
    "data.shuffle_buffer", "data.resampled", "data.synthetic_samples", "data.label_fraction", "data.scale_min",
    "data.crop_pct",
))  # fmt: skip


def _unused_with(flat: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, the setting that leaves it unused, what it belongs to) for keys another key's value turns off: set
    on the command line they are refused, from a recipe (written for the other setting) they get a note."""
    out = []
    if flat["train.optimizer"] == "lars":
        out.append(("train.betas", "train.optimizer=lars", "AdamW's"))
    if flat.get("model.seg_head") == "linear":
        out += [(k, "model.seg_head=linear", "UPerNet's") for k in ("model.seg_channels", "model.aux_weight")]
    if not flat["model.init"]:
        out.append(("model.pos_embed_adapt", "model.init empty", "model.init's"))
    if flat["train.schedule"] == "step":
        out.append(("train.min_lr", "train.schedule=step", "the cosine and poly schedules'"))
    if flat.get("train.eval_mode") == "whole":
        out.append(("train.eval_stride", "train.eval_mode=whole", "sliding-window evaluation's"))
    return out


def check_reads(
    task: str, explicit: dict[str, str], flat: dict[str, Any], reads: Mapping[str, frozenset]
) -> list[str]:
    """Refuse a key set in the recipe or on the command line (`explicit`: key -> where it was set) that `task`
    does not read (`reads`: every task's keys, to name the tasks that do); returns the notes for keys that
    another setting leaves unused."""
    notes = []
    for key, where in explicit.items():
        if key not in reads[task]:
            by = [t for t, keys in reads.items() if key in keys]
            raise ConfigError(
                f"{where}: {key} is not read by {task} (read by: {', '.join(by) or 'no entry point'}); remove it"
            )
    for key, setting, unused in _unused_with(flat):
        if key not in explicit:
            continue
        where = explicit[key]
        if where == "command line":
            raise ConfigError(f"command line: {key} is not read with {setting} ({unused}); remove it")
        notes.append(f"note: {key} ({where}) is {unused}; {setting} does not use it")
    return notes


def task_of_recipe(recipe: str | None, tasks: Iterable[str]) -> str:
    """The task a recipe is written for, by its name: `<task>_*` for every task but pretrain, else pretrain."""
    stem = Path(recipe).stem if recipe else ""
    return next((t for t in tasks if t != "pretrain" and stem.startswith(t + "_")), "pretrain")


def recipe_path(recipe: str) -> Path:
    """recipes/NAME.yaml, or a YAML file given by its path."""
    return Path(recipe) if recipe.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{recipe}.yaml"


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys")
    return data


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split `recipe=NAME key=value ...` into the recipe name and typed (YAML-parsed) overrides."""
    recipe, overrides = None, {}
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"argument '{arg}' is not of the form key=value")
        key, raw = arg.split("=", 1)
        key = key.lstrip("-").strip()
        if key == "recipe":
            recipe = raw
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        overrides[key] = "" if value is None else value
    return recipe, overrides


def load_config(
    argv: list[str] | None = None,
    *,
    reads: Mapping[str, frozenset[str]],
    task: str | None = None,
    default_recipe: str | None = None,
    log=None,
    notes: Callable[[dict, dict], list[str]] | None = None,
) -> DictConfig:
    """Merge base.yaml <- recipe <- CLI overrides into a read-only, attribute-accessible config.

    `reads`: the keys of every task (mae.tasks.READS); `task` (default: the recipe's, by its name) refuses the
    keys it does not read (`check_reads`). Notes (keys another setting leaves unused, and the task's own
    `notes(flat, explicit)`) go to `log`."""
    recipe, overrides = parse_overrides(list(argv or []))
    recipe = recipe or default_recipe
    task = task or task_of_recipe(recipe, reads)
    base = _flatten(load_yaml(RECIPES_DIR / "base.yaml"))
    flat, explicit = dict(base), {}
    if recipe:
        path = recipe_path(recipe)
        if not path.is_file():
            names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base")
            raise ConfigError(f"recipe '{recipe}' not found; available: {', '.join(names)}")
        delta = _flatten(load_yaml(path))
        _apply(flat, delta, base, f"recipe {path.name}")
        explicit.update(dict.fromkeys(delta, f"recipe {path.name}"))
    _apply(flat, overrides, base, "command line")
    explicit.update(dict.fromkeys(overrides, "command line"))
    said = check_reads(task, explicit, flat, reads) + (notes(flat, explicit) if notes else [])
    for note in said:
        if log is not None:
            log(note)
    flat["recipe"] = recipe or ""
    flat["task"] = task
    if not flat["output_dir"]:
        flat["output_dir"] = str(Path("runs") / (Path(recipe).stem if recipe else "default"))
    cfg = OmegaConf.create(_unflatten(flat))
    OmegaConf.set_readonly(cfg, True)
    OmegaConf.set_struct(cfg, True)
    return cfg


def resolve_compile(value: str, device_type: str) -> tuple[str | None, str]:
    """train.compile -> (torch.compile mode, or None for eager; why, for the log).

    auto: compile on CUDA, where it fuses the memory-bound work around the matmuls (ViT-L/16 on an H200:
    1.3x); eager on the CPU, where it gains a few percent but its warm-up costs more than a demo-length
    run gains (docs/performance.md), and wherever Triton, which Inductor needs on CUDA, is missing.
    """
    if value in ("false", "true"):
        return ("default" if value == "true" else None), f"train.compile={value}"
    if value != "auto":
        return value, f"train.compile={value}"
    if device_type != "cuda":
        return None, f"train.compile=auto on {device_type}"
    if importlib.util.find_spec("triton") is None:
        return None, "train.compile=auto: Triton is not installed"
    return "default", "train.compile=auto on cuda"


def record_of(
    cfg: DictConfig, derived: Derived | None = None, resolved: Mapping[str, Any] | None = None
) -> dict:
    """What a run records as its config (config.yaml): the resolved config, with the values the task found in
    the data (`resolved`, dotted keys: model.num_classes=0 -> the classes found) and the derived values."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key, value in (resolved or {}).items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    if derived is not None:
        data = {**data, "derived": asdict(derived)}
    return data


def to_yaml(cfg: DictConfig | dict, derived: Derived | None = None) -> str:
    data = cfg if isinstance(cfg, dict) else record_of(cfg, derived)
    return yaml.safe_dump(data, sort_keys=False)


@dataclass(frozen=True)
class Derived:
    """Quantities computed from the config and the launch; the single place they are defined."""

    world_size: int
    effective_batch: int  # images per optimizer step over all processes
    lr: float  # absolute peak lr
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int
    warmup_steps: int
    epochs: float  # epochs the run will cover


def derive(cfg: DictConfig, world_size: int, loader_steps_per_epoch: int) -> Derived:
    """Effective batch, lr = blr * effective_batch / 256 (Goyal et al. scaling), and step counts."""
    t = cfg.train
    effective_batch = t.batch_size * t.grad_accum * world_size
    lr = t.lr if t.lr > 0 else t.blr * effective_batch / 256
    steps_per_epoch = loader_steps_per_epoch // t.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.batch_size={t.batch_size} x grad_accum={t.grad_accum} x {world_size} processes is larger "
            f"than one epoch of data ({loader_steps_per_epoch} batches per process)"
        )
    total = t.max_steps if t.max_steps > 0 else int(math.ceil(t.epochs * steps_per_epoch))
    warmup = min(
        t.warmup_steps if t.warmup_steps > 0 else int(round(t.warmup_epochs * steps_per_epoch)), total
    )
    return Derived(
        world_size=world_size,
        effective_batch=effective_batch,
        lr=lr,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        epochs=total / steps_per_epoch,
    )


# Keys whose change makes an existing run directory belong to a different run.
IDENTITY_KEYS = (
    "model.name",
    "model.img_size",
    "model.patch_size",
    "model.in_chans",
    "model.embed_dim",
    "model.depth",
    "model.num_heads",
    "model.decoder_embed_dim",
    "model.decoder_depth",
    "model.decoder_num_heads",
    "model.global_pool",
    "model.num_classes",
    "model.seg_head",
    "model.seg_blocks",
    "model.seg_channels",
    "model.window_size",
    "model.fpn_channels",
    "model.anchor_sizes",
)


# Keys whose change on resume would change what the weights mean, not how they go on training: the inputs they
# were trained to read (normalisation, the label mapping) and the decoder's target. Refused on resume.
TRAINED_WITH_KEYS = ("data.mean", "data.std", "data.reduce_zero_label", "model.norm_pix_loss")

# Keys that change how a run is carried out, not what it computes: neither recorded as a change nor refused.
RUNTIME_KEYS = (
    "output_dir", "checkpoint.resume", "checkpoint.keep", "checkpoint.max_requeues", "checkpoint.stop_check_s",
    "checkpoint.lock_wait_s", "log.progress", "log.wandb", "log.wandb_project", "log.tensorboard",
    "data.num_workers", "data.decode", "train.compile", "model.attn_backend", "model.grad_checkpointing",
)  # fmt: skip


def flatten(d: Mapping) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a config (or config.yaml's content) as dotted keys."""
    return _flatten(dict(d))


def check_compatible(new: dict[str, Any], old: dict[str, Any], out: Path, found: Iterable[str] = ()) -> None:
    """Refuse to use an output_dir whose recorded run (`old`, flat) is of another task or model than `new`.
    `found`: keys whose value this run took from its data (model.num_classes=0); a recorded 0 (runs from before
    the count was recorded) says nothing."""
    diffs = [k for k in IDENTITY_KEYS if k in old and old[k] != new.get(k)]
    diffs = [k for k in diffs if not (k == "model.num_classes" and old[k] == 0)]
    if old.get("task") and old.get("task") != new.get("task"):
        diffs.insert(0, "task")
    if diffs:
        k = diffs[0]
        now = f"{new.get(k)!r}" + (" (found in the data)" if k in found else "")
        raise ConfigError(
            f"output_dir {out} holds another run ({k}={old.get(k)!r}, now {now}); "
            "choose a new output_dir or checkpoint.resume=false with an empty directory"
        )


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, now)} of the settings (and derived values) whose values differ between a recorded run and
    this one; runtime keys and keys the record does not have (added since it was written) left out."""
    return {
        k: (old[k], new[k])
        for k in new
        if k in old and k not in RUNTIME_KEYS and _plain(old[k]) != _plain(new[k])
    }


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v
