"""Configuration: recipes/base.yaml (every key) <- recipes/NAME.yaml (a delta) <- CLI `key=value`.

The schema is base.yaml itself: a key that base.yaml does not define is unknown, and a value must have
the type of the default it replaces. Derived quantities (effective batch, lr, step counts) are computed in
one place, `derive`, printed at start and saved with the resolved config.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
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
# Which keys each entry point reads. A key set in a recipe or on the command line that the entry point does not
# read is refused like an unknown one: a setting is used or refused, never accepted and ignored.

_ALL_TASKS = (
    "output_dir", "seed",
    "model.name", "model.img_size", "model.patch_size", "model.in_chans", "model.attn_backend", "model.embed_dim",
    "model.depth", "model.num_heads", "model.init",
    "data.train", "data.val", "data.fmnist_dir", "data.num_workers", "data.shuffle_buffer", "data.epoch_samples",
    "data.resampled", "data.synthetic_samples", "data.label_fraction", "data.mean", "data.std", "data.scale_min",
    "data.hflip", "data.crop_pct",
    "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum", "train.blr", "train.lr",
    "train.min_lr", "train.warmup_epochs", "train.warmup_steps", "train.schedule", "train.weight_decay", "train.betas", "train.optimizer", "train.clip_grad",
    "train.precision", "train.compile",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.resume", "checkpoint.max_requeues",
    "checkpoint.stop_check_s", "checkpoint.lock_wait_s",
    "log.every_steps", "log.wandb", "log.wandb_project", "log.tensorboard", "log.progress",
)  # fmt: skip
# Segmentation reads image / mask folders and its own scenes: none of the shard, label-subset, synthetic and
# classification-crop keys.
_SEGMENT_TASK = tuple(k for k in _ALL_TASKS if k not in (
    "data.shuffle_buffer", "data.resampled", "data.synthetic_samples", "data.label_fraction", "data.scale_min",
    "data.crop_pct",
))  # fmt: skip
READS: dict[str, frozenset[str]] = {
    "pretrain": frozenset((*_ALL_TASKS,
        "model.norm_pix_loss", "model.mask_ratio", "model.decoder_embed_dim", "model.decoder_depth",
        "model.decoder_num_heads", "model.drop_path", "model.grad_checkpointing", "data.decode", "train.fsdp",
        "log.viz_images", "log.knn_every_steps", "log.knn_k", "log.knn_train_samples", "log.knn_val_samples",
    )),
    "finetune": frozenset((*_ALL_TASKS,
        "model.drop_path", "model.global_pool", "model.num_classes", "model.grad_checkpointing",
        "data.auto_augment", "data.reprob", "train.layer_decay", "train.fsdp", "train.smoothing", "train.mixup",
        "train.cutmix", "train.eval_every",
    )),
    "linprobe": frozenset((*_ALL_TASKS,
        "model.global_pool", "model.num_classes", "train.smoothing", "train.eval_every",
    )),
    "segment": frozenset((*_SEGMENT_TASK,
        "model.drop_path", "model.num_classes", "model.grad_checkpointing", "model.seg_head", "model.seg_blocks",
        "model.seg_channels", "model.aux_weight", "data.reduce_zero_label", "data.resize", "data.ratio_range",
        "data.cat_max_ratio", "data.photometric", "train.layer_decay", "train.eval_every", "train.eval_mode",
        "train.eval_stride", "train.freeze_encoder",
    )),
    "detect": frozenset((*_SEGMENT_TASK,
        "model.drop_path", "model.num_classes", "model.grad_checkpointing", "model.window_size", "model.fpn_channels",
        "model.anchor_sizes", "model.proposals", "model.roi_samples", "model.detections", "data.ratio_range",
        "train.layer_decay", "train.eval_every",
    )),
}  # fmt: skip
# Keys only some data sources use: set with another source they get a note, not an error (a recipe sets them for
# real data; `synthetic` batches are drawn on the device, uncropped, unflipped, without loader workers).
SYNTHETIC_IGNORES = ("data.scale_min", "data.hflip", "data.num_workers")


def _unused_with(flat: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, the setting that leaves it unused, what it belongs to) for keys another key's value turns off: set
    on the command line they are refused, from a recipe (written for the other setting) they get a note."""
    out = []
    if flat["train.optimizer"] == "lars":
        out.append(("train.betas", "train.optimizer=lars", "AdamW's"))
    if flat.get("model.seg_head") == "linear":
        out += [(k, "model.seg_head=linear", "UPerNet's") for k in ("model.seg_channels", "model.aux_weight")]
    if flat["train.schedule"] == "step":
        out.append(("train.min_lr", "train.schedule=step", "the cosine and poly schedules'"))
    if flat.get("train.eval_mode") == "whole":
        out.append(("train.eval_stride", "train.eval_mode=whole", "sliding-window evaluation's"))
    return out


def readers(key: str) -> list[str]:
    """The entry points that read `key`."""
    return [t for t, keys in READS.items() if key in keys]


def check_reads(task: str, explicit: dict[str, str], flat: dict[str, Any]) -> list[str]:
    """Refuse a key set in the recipe or on the command line (`explicit`: key -> where it was set) that `task`
    does not read; returns the notes for keys that only the chosen data source leaves unused."""
    reads, notes = READS[task], []
    for key, where in explicit.items():
        if key not in reads:
            by = readers(key)
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
    ignored = [k for k in SYNTHETIC_IGNORES if k in explicit]
    if task == "pretrain" and str(flat["data.train"]).partition(":")[0] == "synthetic" and ignored:
        notes.append(
            f"note: data.train=synthetic draws its images on the device, uncropped, unflipped and without loader "
            f"workers: {', '.join(ignored)} ({explicit[ignored[0]]}) take effect with image data only"
        )
    return notes


def task_of_recipe(recipe: str | None) -> str:
    """The entry point a recipe is written for, by its name: finetune_*, linprobe_*, segment_*, detect_*, else
    pretrain."""
    stem = Path(recipe).stem if recipe else ""
    return next((t for t in READS if t != "pretrain" and stem.startswith(t + "_")), "pretrain")


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _load_yaml(path: Path) -> dict:
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
    argv: list[str] | None = None, default_recipe: str | None = None, task: str | None = None, log=None
) -> DictConfig:
    """Merge base.yaml <- recipe <- CLI overrides into a read-only, attribute-accessible config.

    `task` (the entry point; default: the recipe's, by its name) refuses the keys it does not read
    (`check_reads`); its notes go to `log`."""
    recipe, overrides = parse_overrides(list(argv or []))
    recipe = recipe or default_recipe
    task = task or task_of_recipe(recipe)
    base = _flatten(_load_yaml(RECIPES_DIR / "base.yaml"))
    flat, explicit = dict(base), {}
    if recipe:
        path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{recipe}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base")
            raise ConfigError(f"recipe '{recipe}' not found; available: {', '.join(names)}")
        delta = _flatten(_load_yaml(path))
        _apply(flat, delta, base, f"recipe {path.name}")
        explicit.update(dict.fromkeys(delta, f"recipe {path.name}"))
    _apply(flat, overrides, base, "command line")
    explicit.update(dict.fromkeys(overrides, "command line"))
    for note in check_reads(task, explicit, flat):
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


def to_yaml(cfg: DictConfig, derived: Derived | None = None) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    if derived is not None:
        data = {**data, "derived": asdict(derived)}
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


def check_compatible(cfg: DictConfig, existing_yaml: Path) -> None:
    """Refuse to resume into an output_dir whose saved config describes a different model."""
    old = _flatten(_load_yaml(existing_yaml))
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    diffs = [k for k in IDENTITY_KEYS if k in old and old[k] != new.get(k)]
    if old.get("task") and old.get("task") != new.get("task"):
        diffs.insert(0, "task")
    if diffs:
        k = diffs[0]
        raise ConfigError(
            f"output_dir {existing_yaml.parent} holds another run ({k}={old.get(k)!r}, now {new.get(k)!r}); "
            "choose a new output_dir or checkpoint.resume=false with an empty directory"
        )
