"""The training loop's clock: img/s, the fraction of time spent waiting for data, and the ETA per log window."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class Reading:
    img_per_s: float
    data_wait: float  # fraction of the window's training time spent waiting for the next batch
    eta_s: float


class Meter:
    """Counts optimizer steps and times the window between two log lines.

    img/s and data_wait cover training only: the first step of a process (torch.compile, allocator and
    worker warm-up) and everything inside `paused()` (monitor, evaluation, checkpoints) are left out.
    The ETA extrapolates the wall time per step over the last `eta_windows` log windows, pauses included
    (monitor and checkpoints recur, so they count on average): a stall, a suspended job or a neighbour that
    leaves the machine stops weighing on it once it is that many windows old.
    """

    def __init__(self, total_steps: int, start_step: int, images_per_step: int, eta_windows: int = 50):
        self.total, self.start_step, self.images_per_step = total_steps, start_step, images_per_step
        self.window_t = time.perf_counter()
        # (time, step) of the last reads
        self.marks = deque([(self.window_t, start_step)], maxlen=eta_windows)
        self.window_steps, self.window_waited = 0, 0.0  # the whole window, warm-up included
        self._restart(self.window_t)

    def _restart(self, now: float) -> None:
        """Start timing training afresh (after the warm-up step, or a read)."""
        self.t0, self.steps, self.paused_s, self.waited = now, 0, 0.0, 0.0

    def batches(self, it: Iterable) -> Iterator:
        """Yield from `it`, timing every wait for the next item."""
        it = iter(it)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            dt = time.perf_counter() - t
            self.waited += dt
            self.window_waited += dt
            yield item

    def step_done(self, step: int, synchronize=None) -> None:
        """After optimizer step `step`. The first step of the process is warm-up: the window restarts after
        it (`synchronize` first, so the warm-up's queued device work is not billed to the next steps)."""
        self.steps += 1
        self.window_steps += 1
        if step == self.start_step + 1 and step < self.total:
            if synchronize is not None:
                synchronize()
            self._restart(time.perf_counter())

    @contextlib.contextmanager
    def paused(self):
        """Time spent in here is not training (monitor, evaluation, checkpoints)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def pace(self, step: int) -> tuple[float, float] | None:
        """(seconds per step, ETA) over the steps since the warm-up, pauses left out, without starting a new
        window; None before the first step after the warm-up."""
        if not self.steps:
            return None
        per_step = max(time.perf_counter() - self.t0 - self.paused_s, 0.0) / self.steps
        return per_step, per_step * (self.total - step)

    def read(self, step: int) -> Reading:
        """The window since the last read (a log at the very first step times the warm-up itself), then
        start a new one."""
        now = time.perf_counter()
        if self.steps:
            busy = max(now - self.t0 - self.paused_s, 1e-9)
            steps, waited = self.steps, self.waited
        else:  # a log at the very first step: nothing but the warm-up to time
            busy = max(now - self.window_t, 1e-9)
            steps, waited = self.window_steps, self.window_waited
        since_t, since_step = self.marks[0]
        eta = (now - since_t) / max(step - since_step, 1) * (self.total - step)
        self.marks.append((now, step))
        reading = Reading(steps * self.images_per_step / busy, round(min(waited / busy, 1.0), 4), eta)
        self.window_t, self.window_steps, self.window_waited = now, 0, 0.0
        self._restart(now)
        return reading


def loader_hint(data_wait: float, num_workers: int, cores: int, threshold: float = 0.3) -> str | None:
    """The one-line advice when the steps wait for data (`data_wait` >= `threshold` of the training time) while
    this process has CPU cores that no loader worker uses (one is the training process's own); else None."""
    if data_wait < threshold or num_workers >= cores - 1:
        return None
    suggest = min(cores - 1, max(8, 2 * num_workers))
    return (
        f"the input pipeline is the bottleneck: data_wait {data_wait:.0%} with data.num_workers={num_workers} "
        f"and {cores} CPU cores for this process; try data.num_workers={suggest}"
    )
