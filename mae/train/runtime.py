"""The process around a run: precision and Accelerator, signals (graceful stop, SLURM requeue), and
the small measurements the log line shows."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

from mae.config import ConfigError
from mae.device import cpu_supports_bf16
from mae.train import trackers


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, failed checkpoint write); exit code 1."""


class ControlGroup:
    """Small agreements between the ranks of a launch on a CPU (gloo) group, whatever the training backend: no
    device sync. With one process every answer is local."""

    def __init__(self, num_processes: int):
        self.num_processes = num_processes
        self._group = None

    def max(self, values: list[int]) -> list[int]:
        """The element-wise maximum of `values` over the ranks (also a barrier)."""
        if self.num_processes == 1:
            return list(values)
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any."""
        return bool(self.max([int(flag)])[0])


def resolve_precision(precision: str, on_cuda: bool) -> str:
    """'auto' -> bf16 where the hardware runs it natively (recent GPUs; CPUs with avx512_bf16/AMX)."""
    if precision == "auto":
        if on_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and not on_cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision={precision!r}: expected auto, bf16, fp16 or fp32")
    return precision


def precision_reason(requested: str, device_type: str) -> str:
    """Why train.precision=auto chose what it did on a CPU, for the start line ("" otherwise)."""
    if requested != "auto" or device_type != "cpu":
        return ""
    if cpu_supports_bf16():
        return " (auto: this CPU has avx512_bf16/AMX, bf16 autocast runs natively)"
    return " (auto: this CPU has no avx512_bf16 or AMX, where bf16 is emulated and slower; fp32 it is)"


def make_accelerator(cfg: DictConfig) -> Accelerator:
    on_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in (
        "1",
        "true",
    )
    precision = resolve_precision(cfg.train.precision, on_cuda)
    if cfg.train.fsdp and precision == "fp16":
        raise ConfigError("train.fsdp=true runs in bf16 or fp32, not fp16 (set train.precision=bf16)")
    if cfg.log.wandb not in ("online", "offline", "disabled"):
        raise ConfigError(f"log.wandb={cfg.log.wandb!r}: expected online, offline or disabled")
    _reset_single_process_state()
    STOP.install()
    acc = Accelerator(
        mixed_precision={"fp32": "no"}.get(precision, precision),
        log_with=trackers.log_with(cfg),
        project_dir=cfg.output_dir,
        cpu=not on_cuda,
    )
    STOP.verbose = acc.is_main_process
    return acc


def local_accelerator(precision: str, device: torch.device) -> Accelerator:
    """A one-process Accelerator of `precision` (fp32, bf16, fp16) on `device`: the training loop's autocast,
    grad scaler and backward for an in-process measurement (mae-bench's step)."""
    _reset_single_process_state()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=device.type != "cuda")


def _reset_single_process_state() -> None:
    """Accelerate keeps one global state per process; a second in-process run (tests, notebooks) may
    need another precision. Only a non-distributed state is reset: a process group is never torn down."""
    from accelerate.state import AcceleratorState, DistributedType

    shared = AcceleratorState._shared_state
    if shared and shared.get("distributed_type", DistributedType.NO) == DistributedType.NO:
        AcceleratorState._reset_state(reset_partial_state=True)


class _Stop:
    """Signal flag: SIGUSR1 (time limit ahead: checkpoint, requeue), SIGTERM (checkpoint, exit 0) or SIGINT
    (Ctrl-C: checkpoint, exit 130; a second Ctrl-C aborts at once with exit 130, losing the work since the
    last checkpoint, as a kill would)."""

    INT_NOTICE = "stopping after this step; press Ctrl-C again to abort"

    def __init__(self) -> None:
        self.signum = 0
        self.verbose = True  # rank 0 says what a Ctrl-C does; the other ranks stay quiet
        self._interrupted = False
        self._old = {}

    def install(self) -> None:
        if self._old:
            return
        self.signum, self._interrupted = 0, False
        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._interrupted:
                self._say("aborted (second Ctrl-C): a re-run resumes from the last checkpoint")
                os._exit(130)  # at once, even inside a collective or a checkpoint write
            self._interrupted = True
            self._say(self.INT_NOTICE)
        self.signum = signum

    def _say(self, msg: str) -> None:
        """One line straight to the stdout file descriptor: a handler may interrupt a print() in progress,
        and re-entering its buffer would raise."""
        if not self.verbose:
            return
        try:
            os.write(sys.stdout.fileno(), (msg + "\n").encode())
        except (AttributeError, OSError, ValueError):  # no file descriptor behind sys.stdout (notebooks)
            pass

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


# Installed as soon as an entry point makes its Accelerator, so that a signal arriving while the model and
# data are still being built is not lost: the loop sees it at its first step.
STOP = _Stop()


class Interrupted(Exception):
    """A stop signal arrived during an evaluation or the k-NN monitor: abandoned on every rank, the step is
    checkpointed and the evaluation runs again when the run resumes."""


class Watch:
    """The batches of an evaluation until a stop signal arrives; then the iteration ends early and `stopped` is
    true. Evaluations that take minutes (a test set, sliding windows) so end within a batch of the signal, inside
    a cluster's grace period. `agree(flag)` (a collective, true on every rank when true on any) is asked at each
    batch where every rank iterates the same batches in lockstep (a sharded model's forward is collective)."""

    def __init__(self, batches, agree=None):
        self.batches, self.agree, self.stopped = batches, agree, False

    def __iter__(self):
        for batch in self.batches:
            stop = bool(STOP.signum)
            if self.agree is not None:
                stop = self.agree(stop)
            if stop:
                self.stopped = True
                return
            yield batch


class StopExchange:
    """When the ranks of a multi-process run compare their stop flags (a CPU all-reduce, which every rank must
    reach before any goes on). Every step would tie the hosts of all ranks together at every step; every k
    steps with a fixed k is either too often for a 30 ms step or too rare for a 3 s one. So the ranks agree,
    at each exchange, on the next one: about `every_s` seconds ahead at the slowest rank's recent step time
    (at least 1 step, at most MAX_STEPS). A signal then stops the run at most ~`every_s` plus one step after
    it arrives, small against a cluster's grace period (SLURM's KillWait is often 30 s), at the cost of one
    small exchange per `every_s` seconds; all ranks still stop at the same step."""

    MAX_STEPS = 1000

    def __init__(self, every_s: float):
        self.every_s = float(every_s)
        self.next_step = 0  # the first step of a run is an exchange
        self.count = 0
        self._last: tuple[int, float] | None = None  # (step, time) of the previous exchange

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def proposal(self, step: int, now: float) -> int:
        """Steps to the next exchange, as this rank sees it."""
        if self._last is None or step <= self._last[0]:
            return 1
        step_s = (now - self._last[1]) / (step - self._last[0])
        return int(min(max(self.every_s / max(step_s, 1e-6), 1), self.MAX_STEPS))

    def agreed(self, step: int, now: float, steps: int) -> None:
        self.next_step, self._last, self.count = step + steps, (step, now), self.count + 1


def peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def request_requeue(max_requeues: int) -> str:
    """Ask SLURM to requeue this job (rank 0 only), unless it has been requeued too often."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not under SLURM: no requeue"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        return f"requeued {restarts} times already (checkpoint.max_requeues={max_requeues}): not requeueing"
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed: {e}"
    if r.returncode < 0:  # SLURM stops every process of the job for the requeue, scontrol included
        return f"scontrol requeue {job} ended by signal {-r.returncode} (the job is being stopped for the requeue)"
    if r.returncode != 0:
        return f"scontrol requeue {job} failed: {r.stderr.strip()}"
    return f"requeued SLURM job {job} (restart {restarts + 1} of at most {max_requeues})"
