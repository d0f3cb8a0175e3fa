"""Whether data.val can score a model trained on data.train: the same classes, in the same label order.

Checked before anything is built or written, from what each source says about its classes without reading
images (built-in names, class subfolders, shard manifests). A score that compares different label sets (a
k-NN bank of digits queried with garments, a top-1 of a 10-class head on another 10 classes) is never
reported:
- data.val given with data.train (both on the command line, or both by the recipe) but other classes:
  a one-line error (exit 2).
- data.train given on the command line while data.val (and the use's switch, e.g. the k-NN monitor's cadence)
  still come from the recipe, and they differ: the recipe's data.val is dropped (the monitor off / no
  evaluation), said in one line.

Each task says how it reads data.val's labels (`ValLabels`): no task is named here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, read_write

from mae.config import ConfigError, parse_overrides
from mae.data.images import IMAGE_EXTS
from mae.data.shards import resolve_shards
from mae.data.sources import FMNIST_CLASSES, SYNTHETIC_CLASSES, is_shard_source, parse_builtin


@dataclass(frozen=True)
class LabelSet:
    num_classes: int  # 0 = unlabelled
    names: tuple[str, ...] | None  # None: only the count is known (a shard manifest without names)

    def differs_from(self, other: LabelSet) -> bool:
        if self.names is not None and other.names is not None:
            return self.names != other.names
        return self.num_classes != other.num_classes

    def describe(self) -> str:
        if self.num_classes == 0:
            return "no labels"
        if not self.names:
            return f"{self.num_classes} classes"
        shown = ", ".join(repr(n) for n in self.names[:2])
        return f"{self.num_classes} classes {shown}{', ...' if self.num_classes > 2 else ''}"


def label_set(data_cfg: DictConfig, source: str) -> LabelSet | None:
    """The classes of a data source, or None when they cannot be told without reading the data (shards with
    no manifest, a path that does not exist: the loader reports those)."""
    builtin = parse_builtin(source, "train")
    if builtin:
        names = (
            FMNIST_CLASSES
            if builtin[0] == "fashion-mnist"
            else [f"class_{c}" for c in range(SYNTHETIC_CLASSES)]
        )
        return LabelSet(len(names), tuple(names))
    if is_shard_source(source):
        shards = resolve_shards(source)
        if shards.classes:
            return LabelSet(len(shards.classes), tuple(shards.classes))
        return LabelSet(shards.num_classes, None) if shards.num_classes else None
    if os.path.isdir(source):
        names = tuple(d for d in _subdirs(source) if _has_image(os.path.join(source, d)))
        return LabelSet(len(names), names)
    return None


def _subdirs(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _has_image(folder: str) -> bool:
    """True at the first image file found below `folder` (the class rule of mae.data.scan_folder)."""
    for _, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") and f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS for f in filenames):
            return True
    return False


@dataclass(frozen=True)
class ValLabels:
    """How a task reads data.val's class labels: for what (`what`, in messages), and the key that turns that use
    off at 0 (`switch`, e.g. the k-NN monitor's cadence), or None when it is always on."""

    what: str
    switch: str | None = None


def uses_val_labels(cfg: DictConfig, use: ValLabels | None) -> bool:
    if use is None or not cfg.data.val:
        return False
    return use.switch is None or OmegaConf.select(cfg, use.switch) > 0


def pair_train_val(cfg: DictConfig, argv: list[str], use: ValLabels | None, log=print) -> DictConfig:
    """Check that data.val has data.train's classes where the task reads them (`use`; see the module
    docstring); returns the config, with the recipe's data.val dropped where that is the rule."""
    if not uses_val_labels(cfg, use):
        return cfg
    train, val = label_set(cfg.data, cfg.data.train), label_set(cfg.data, cfg.data.val)
    if train is None or val is None:
        return cfg
    if val.num_classes == 0:
        raise ConfigError(f"data.val={cfg.data.val!r} has no labels (class subfolders) for the {use.what}")
    if train.num_classes == 0 and use.switch is None:
        return cfg  # the loader's own error names it (training on labels needs labelled data.train)
    if not (train.num_classes == 0 or train.differs_from(val)):
        return cfg
    _, overrides = parse_overrides(argv)
    pair = f"data.val={cfg.data.val!r} ({val.describe()}) has other classes than data.train={cfg.data.train!r} ({train.describe()})"
    asked = "data.val" in overrides or use.switch in overrides
    if "data.train" in overrides and not asked:
        off = f"{use.what} off" if use.switch else "no evaluation"
        log(
            f"note: {pair}: the recipe's data.val is dropped ({off}); set data.val to held-out images of your classes"
        )
        with read_write(cfg):
            cfg.data.val = ""
            if use.switch:
                OmegaConf.update(cfg, use.switch, 0)
        return cfg
    fix = f", or {use.switch}=0" if use.switch else ""
    raise ConfigError(f"{pair}: give held-out images of data.train's classes as data.val{fix}")
