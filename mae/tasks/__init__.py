"""The tasks on the shared training engine. Each module here declares the keys it reads (`READS`) beside the
`build_task(cfg, accelerator) -> Task` that builds its model, data, loss and evaluation; the engine runs them
all alike and knows none by name.

A task module imports only the configuration at load time (its `build_task` imports the rest), so that
`--help` and the refusal of a key a task does not read answer before torch is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from omegaconf import DictConfig

from mae import config

TASKS = ("pretrain", "finetune", "linprobe", "segment", "detect")


def task_module(task: str) -> ModuleType:
    if task not in TASKS:
        raise config.ConfigError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return importlib.import_module(f"mae.tasks.{task}")


READS: dict[str, frozenset[str]] = {t: task_module(t).READS for t in TASKS}


def load_config(
    argv: list[str] | None = None, task: str | None = None, log=None, default_recipe: str | None = None
) -> DictConfig:
    """mae.config.load_config for `task` (default: the recipe's, by its name), refusing the keys it does not
    read, with the task's own notes."""
    task = task or config.task_of_recipe(config.parse_overrides(list(argv or []))[0] or default_recipe, TASKS)
    notes = getattr(task_module(task), "config_notes", None)
    return config.load_config(
        argv, reads=READS, task=task, default_recipe=default_recipe, log=log, notes=notes
    )
