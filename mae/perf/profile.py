"""mae-bench --profile: a few training steps under torch.profiler, summarised as the top ops by device time."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def profile_steps(step, images: torch.Tensor, device: torch.device, path: str, title: str = "",
                  steps: int = 3, rows: int = 25) -> str:  # fmt: skip
    """Run `step(images)` `steps` times under torch.profiler; write and return the op table, sorted by self CUDA
    time on a GPU (the kernels an op launched itself, so compiled graphs and autograd wrappers do not hide them),
    by self CPU time elsewhere."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    step(images)  # a step outside the trace: nothing of the timed part's tail is billed to it
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)
    text = (f"{title}\n{steps} steps under torch.profiler in {wall * 1e3:.1f} ms wall time (profiler overhead "
            f"included), {images.shape[0]} images per step, sorted by {sort}\n\n{table}\n")  # fmt: skip
    Path(path).write_text(text)
    return text
