"""Experiment trackers through Accelerate: wandb (`log.wandb`) and TensorBoard (`log.tensorboard`).

A resumed run continues the same curves: wandb by the run id kept in output_dir/wandb_id, TensorBoard by
writing to the same output_dir/tensorboard/ with `purge_step`, which hides the events an interrupted run
logged after its last checkpoint (as metrics.jsonl drops those rows).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import yaml
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker
from omegaconf import DictConfig

TENSORBOARD_DIR = "tensorboard"  # under output_dir


def log_with(cfg: DictConfig) -> list | None:
    """Accelerator(log_with=...) for the config: "wandb" and/or a TensorBoard tracker writing to
    output_dir/tensorboard/ (built here so that the directory does not depend on the wandb project name);
    None when both are off."""
    out = []
    if cfg.log.wandb != "disabled":
        out.append("wandb")
    if cfg.log.tensorboard:
        out.append(TensorBoardTracker(TENSORBOARD_DIR, cfg.output_dir))
    return out or None


def start(acc: Accelerator, cfg: DictConfig, config: dict, step: int) -> None:
    """Start every tracker of `acc` (all ranks call this) for a run that is at `step` (0 = fresh start)."""
    if not acc.log_with:
        return
    out = Path(cfg.output_dir)
    kwargs = {}
    if cfg.log.wandb != "disabled":
        id_file = out / "wandb_id"
        if acc.is_main_process and not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])  # kept with the run: a resumed run continues it
        acc.wait_for_everyone()
        kwargs["wandb"] = {
            "id": id_file.read_text().strip(),
            "resume": "allow",
            "dir": str(out),
            "mode": cfg.log.wandb,
            "name": out.name,
        }
    for tracker in acc.log_with:
        if isinstance(tracker, TensorBoardTracker) and (out / TENSORBOARD_DIR).is_dir():
            # events of an earlier attempt after the checkpoint this run starts from (step 0: none) are stale
            tracker.init_kwargs["purge_step"] = step + 1
    # config=None: TensorBoard's hparams plugin would add a run per start and rejects nested values;
    # each tracker gets the config its own way below
    acc.init_trackers(cfg.log.wandb_project, config=None, init_kwargs=kwargs)
    if not acc.is_main_process:
        return
    for tracker in acc.trackers:
        if tracker.name == "wandb":
            tracker.store_init_configuration(config)
        elif tracker.name == "tensorboard":
            text = yaml.safe_dump(config, sort_keys=False)
            tracker.writer.add_text("config", "```\n" + text + "```", global_step=step)


def log_image(acc: Accelerator, name: str, path: Path, step: int) -> None:
    """Log the PNG at `path` as image `name` to every tracker that is on (rank 0)."""
    if not acc.is_main_process or not acc.trackers:
        return
    import numpy as np
    from PIL import Image

    for tracker in acc.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(str(path))}, step=step)
        elif tracker.name == "tensorboard":
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
            tracker.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
            tracker.writer.flush()
