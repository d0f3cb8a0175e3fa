"""The one training loop shared by pretraining, fine-tuning and linear probing.

Entry points build a `Task` (model, parameter groups, data, loss, optional evaluation / monitor /
checkpoint hooks); `train` does the rest: Accelerate (DDP over processes and nodes, bf16/fp16/fp32),
gradient accumulation, warmup + cosine lr, clipping, logging to stdout / metrics.jsonl / wandb,
atomic checkpoints with auto-resume, graceful stop on SIGUSR1/SIGTERM (with SLURM requeue), and a
hard stop on a non-finite loss that never checkpoints the bad state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig
from torch import nn

from mae import checkpoint as ckpt
from mae import fsdp, trackers
from mae.config import ConfigError, Derived, check_compatible, derive, resolve_compile, to_yaml
from mae.meter import Meter, loader_hint
from mae.optim import build_optimizer, lr_at, set_lr
from mae.runlock import claim_output_dir
from mae.runtime import STOP, StopExchange, fmt_time, peak_mem_gb, precision_reason, request_requeue

PACE_STEPS = 5  # steps after the warm-up step before the first ETA is printed (when no log line came yet)


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, failed checkpoint write); exit code 1."""


@dataclass
class Task:
    model: nn.Module  # unwrapped; the engine prepares it
    groups: list[dict]  # optimizer parameter groups (mae.optim.param_groups)
    loader: object  # mae.data.TrainLoader
    # (prepared model, images, labels, step, micro_step) -> scalar loss
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, int, int], torch.Tensor]
    evaluate: Callable[[nn.Module, int], dict] | None = None  # (unwrapped model, step) -> metrics (all ranks)
    monitor: Callable[[nn.Module, int], dict] | None = None  # every `monitor_every` steps (all ranks)
    monitor_every: int = 0
    # after a commit: on rank 0, or on every rank when the model is sharded (its forward is collective)
    on_checkpoint: Callable[[nn.Module, Path, int], None] | None = None
    on_eval: Callable[[nn.Module, dict, int], None] | None = None  # after each evaluation (all ranks)


# ----------------------------------------------------------------------------- setup


def prepare_output_dir(cfg: DictConfig, accelerator: Accelerator) -> Path | None:
    """Validate the run directory and return the checkpoint to resume from (None = fresh start)."""
    out = Path(cfg.output_dir)
    saved = out / "config.yaml"
    latest = ckpt.latest_checkpoint(out)
    if saved.is_file():
        check_compatible(cfg, saved)
    if latest is not None and not cfg.checkpoint.resume:
        raise ConfigError(
            f"output_dir {out} has checkpoints and checkpoint.resume=false; choose an empty output_dir"
        )
    accelerator.wait_for_everyone()
    return latest if cfg.checkpoint.resume else None


# ----------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, cfg: DictConfig, accelerator: Accelerator, task: Task):
        self.cfg, self.acc, self.task = cfg, accelerator, task
        self.out = Path(cfg.output_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self.raw_model = task.model
        self.groups = task.groups
        self.sharded = fsdp.enabled(cfg, accelerator.num_processes)
        self.derived: Derived = derive(cfg, accelerator.num_processes, task.loader.steps_per_epoch)
        self.step = 0
        self.bad_samples = 0
        self.hinted = False  # the loader advice is given once per process
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        self.cores = len(os.sched_getaffinity(0)) // local  # this process's share of the machine's cores
        self.stop = STOP
        self.exchange = StopExchange(cfg.checkpoint.stop_check_s)
        self._ctrl_group = None
        # Fault injection for the reliability tests (read at run time, never at import):
        # MAE_FAULT_NAN_STEP=k makes the loss of step k non-finite; MAE_FAULT_CKPT_DELAY=s sleeps s
        # seconds inside every checkpoint write, so that a kill can land in the middle of one.
        self.fault_nan_step = int(os.environ.get("MAE_FAULT_NAN_STEP", "0") or 0)
        self.fault_ckpt_delay = float(os.environ.get("MAE_FAULT_CKPT_DELAY", "0") or 0)

    def log(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)

    # ---- state

    def resume(self, path: Path) -> None:
        model_state, train_state, rng = ckpt.load_train_state(path, self.acc.process_index)
        fsdp.load_model_state(self.raw_model, model_state)
        del model_state
        try:
            changes = fsdp.load_optimizer_state(
                self.raw_model, self.optimizer, self.groups, train_state["optimizer"]
            )
        except ValueError as e:
            raise ckpt.CheckpointError(f"{path}: its optimizer state does not fit this run: {e}") from None
        for line in changes:
            self.log(line)
        if train_state.get("scaler") is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(train_state["scaler"])
        self.step = int(train_state["step"])
        self.bad_samples = int(train_state.get("bad_samples", 0))
        if rng is not None:
            ckpt.set_rng_state(rng)
        if train_state.get("world_size") not in (None, self.acc.num_processes):
            self.log(
                f"warning: resuming a {train_state['world_size']}-process run on {self.acc.num_processes} "
                "processes: the data order from here on differs from the original run"
            )
        if self.acc.is_main_process:
            dropped = ckpt.truncate_metrics(self.metrics_path, self.step)
            if dropped:
                self.log(f"dropped {dropped} metrics rows logged after step {self.step} (work since lost)")
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        """All ranks: write an atomic checkpoint of the current step. A write failure on any rank stops
        every rank (no rank waits forever at a barrier) and leaves the previous checkpoint as it was."""
        self._check_finite()
        tmp = ckpt.tmp_dir(self.out, self.step)
        main = self.acc.is_main_process
        err: OSError | None = None

        def attempt(fn) -> None:
            nonlocal err
            if err is None:
                try:
                    fn()
                except OSError as e:
                    err = e

        if main:
            attempt(lambda: (shutil.rmtree(tmp) if tmp.exists() else None, tmp.mkdir(parents=True)))
        self.acc.wait_for_everyone()
        attempt(lambda: ckpt.write_rank_files(tmp, self.acc.process_index))
        if self.fault_ckpt_delay:
            time.sleep(self.fault_ckpt_delay)
        # sharded: every rank takes part in gathering the full state; rank 0 alone holds and writes it
        model_state = fsdp.model_state(self.raw_model) if (main or self.sharded) else None
        optim_state = (
            fsdp.optimizer_state(self.raw_model, _inner(self.optimizer), self.groups)
            if (main or self.sharded)
            else None
        )
        if main:
            attempt(partial(self._write_main_files, model_state, optim_state))
        del model_state, optim_state
        self._raise_if_any_failed(err)
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        if main:
            attempt(lambda: ckpt.commit(tmp, self.cfg.checkpoint.keep))
        self._raise_if_any_failed(err)
        if self.task.on_checkpoint is not None and (main or self.sharded):
            self.task.on_checkpoint(self.raw_model, final, self.step)
        return final

    def _write_main_files(self, model_state: dict, optim_state: dict) -> None:
        train_state = {
            "optimizer": optim_state,
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
            "step": self.step,
            "epoch": self.step // self.derived.steps_per_epoch,
            "bad_samples": self.bad_samples,
            "world_size": self.acc.num_processes,
        }
        meta = {"step": self.step, "epoch": train_state["epoch"], "task": self.cfg.task}
        ckpt.write_main_files(ckpt.tmp_dir(self.out, self.step), model_state, train_state, meta)

    def _raise_if_any_failed(self, err: OSError | None) -> None:
        failed = self._any_rank(err is not None)
        if failed:
            why = f" ({err})" if err is not None else " on another process"
            raise TrainingError(
                f"checkpoint write at step {self.step} failed{why}; the previous checkpoint is intact"
            )

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a CPU gloo exchange; also a barrier)."""
        if self.acc.num_processes == 1:
            return flag
        if self._ctrl_group is None:
            self._ctrl_group = dist.new_group(backend="gloo")
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctrl_group)
        return bool(t.item())

    # ---- checks

    def _check_finite(self) -> None:
        bad = (
            int(self.acc.reduce(self.first_bad.clone(), reduction="max").item())
            if self.acc.num_processes > 1
            else int(self.first_bad.item())
        )
        if bad >= 0:
            raise TrainingError(
                f"non-finite loss at step {bad}; stopping without checkpointing this state "
                "(the last good checkpoint is kept). Try a lower lr, train.clip_grad, or fp32."
            )

    def _should_stop(self) -> int:
        """The stop signal all ranks agree on (0 = none). One process reads its flag every step (free); several
        exchange theirs on a CPU gloo group (no device sync) when `self.exchange` says (runtime.StopExchange)."""
        if self.acc.num_processes == 1:
            return self.stop.signum
        if not self.exchange.due(self.step):
            return 0
        if self._ctrl_group is None:
            self._ctrl_group = dist.new_group(backend="gloo")
        now = time.monotonic()
        # one MAX all-reduce: the highest signal and the smallest proposed interval (negated)
        t = torch.tensor([self.stop.signum, -self.exchange.proposal(self.step, now)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctrl_group)
        self.exchange.agreed(self.step, now, -int(t[1]))
        return int(t[0])

    # ---- logging

    def write_row(self, row: dict) -> None:
        if self.acc.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.acc.trackers:
            self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def _init_trackers(self) -> None:
        config = {**_plain(self.cfg), "derived": asdict(self.derived)}
        trackers.start(self.acc, self.cfg, config, self.step)

    # ---- the model the loop runs

    def _prove_attention(self) -> None:
        """Run each attention backend of the model once on this device and dtype before training relies on
        it; a broken optional kernel (an xformers built for another torch) is replaced, with one line."""
        from mae.models import ensure_attn_backends

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.acc.mixed_precision, torch.float32)
        for note in ensure_attn_backends(self.raw_model, self.acc.device, dtype):
            self.log(note)

    def _compile(self, model: nn.Module) -> nn.Module:
        mode, why = resolve_compile(self.cfg.train.compile, self.acc.device.type)
        if mode is None:
            return model
        self.log(f"torch.compile: mode {mode} ({why}); it compiles during the first step")
        return torch.compile(model, mode=mode)

    def _sync_buffers(self) -> None:
        """Every rank evaluates with rank 0's buffers (BatchNorm statistics), the ones DDP broadcasts before each
        forward and the checkpoint holds: without SyncBatchNorm, each rank's last step updated its own."""
        if self.acc.num_processes > 1 and not self.sharded:
            for b in self.raw_model.buffers():
                dist.broadcast(b.data, src=0)

    def _log_first_step_once(self) -> None:
        """Log how long the first optimizer step took (compilation happens there; img/s leaves it out)."""
        t0 = time.time()

        def hook(optimizer, args, kwargs) -> None:
            handle.remove()
            _synchronize(self.acc.device)
            self.log(f"torch.compile: first step took {time.time() - t0:.1f} s (compilation, data start-up)")

        handle = _inner(self.optimizer).register_step_post_hook(hook)

    # ---- main

    def run(self) -> int:
        cfg, acc, d = self.cfg, self.acc, self.derived
        if self.sharded:
            self.groups = fsdp.shard(self.raw_model, self.groups, acc.mixed_precision)
        elif cfg.train.fsdp:
            self.log("train.fsdp=true with one process: nothing to shard, the model runs whole")
        self.optimizer = build_optimizer(self.groups, cfg.train.optimizer, d.lr, cfg.train.betas)
        resume_from = prepare_output_dir(cfg, acc)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            for p in ckpt.remove_partial(self.out):
                self.log(f"removed incomplete checkpoint {p.name} (interrupted write)")
            if resume_from is None and (dropped := ckpt.truncate_metrics(self.metrics_path, 0)):
                self.log(f"dropped {dropped} metrics rows of an earlier attempt that left no checkpoint")
            (self.out / "config.yaml").write_text(to_yaml(cfg, d))
        acc.wait_for_everyone()
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=acc.device)
        if resume_from is not None:
            self.resume(resume_from)
        self.log(
            f"{cfg.task}: {acc.num_processes} process(es) on {acc.device.type}"
            f"{' (FSDP: parameters, gradients and optimizer state sharded)' if self.sharded else ''}, "
            f"precision {acc.mixed_precision}{precision_reason(cfg.train.precision, acc.device.type)}; "
            f"effective batch {d.effective_batch} = {cfg.train.batch_size} x {cfg.train.grad_accum} accum x "
            f"{d.world_size}; lr {d.lr:.3g} (blr {cfg.train.blr:g} x {d.effective_batch}/256"
            f"{', overridden by train.lr' if cfg.train.lr > 0 else ''}); {d.steps_per_epoch} steps/epoch, "
            f"{d.total_steps} steps ({d.epochs:.2f} epochs), {d.warmup_steps} warmup"
        )
        if self.step >= d.total_steps:
            self.log(f"already complete at step {self.step}; outputs in {self.out}")
            return 0

        self._prove_attention()
        model = self._compile(self.raw_model)
        if self.sharded:  # already distributed: Accelerate wraps the optimizer only, autocast is the loop's
            self.model, self.optimizer = model, acc.prepare(self.optimizer)
        else:
            self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self._init_trackers()
        self.stop.install()  # no-op when make_accelerator did it
        try:
            if model is not self.raw_model:
                self._log_first_step_once()
            return self._loop()
        finally:
            self.stop.restore()
            acc.end_training()

    def _loop(self) -> int:
        cfg, d = self.cfg, self.derived
        ga, spe = cfg.train.grad_accum, d.steps_per_epoch
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.loss_sum = torch.zeros((), device=self.acc.device)
        meter = Meter(d.total_steps, self.step, d.effective_batch)
        progress = _progress(cfg, self.acc, d.total_steps, self.step)
        self.model.train()
        while self.step < d.total_steps:
            epoch = self.step // spe
            micro, yielded = 0, 0
            for images, labels, n_bad in meter.batches(self._fetch(epoch, (self.step % spe) * ga)):
                yielded += 1
                self.bad_samples += int(n_bad)
                self._forward_backward(images, labels, micro, last_micro=micro == ga - 1)
                micro = (micro + 1) % ga
                if micro:
                    continue
                self._optimizer_step()
                meter.step_done(self.step, partial(_synchronize, self.acc.device))
                if progress is not None:
                    progress.update(1)
                done = self._bookkeeping(meter)
                if done is not None:
                    return done
                if self.step == d.total_steps or self.step % spe == 0:
                    break
            else:
                if yielded < ga:
                    raise TrainingError(
                        f"the training data yielded no full step in epoch {epoch} (step {self.step})"
                    )
                self.log(f"warning: the data of epoch {epoch} ran out at step {self.step}; continuing")
        if progress is not None:
            progress.close()
        self.log(f"done: {self.step} steps; outputs in {self.out}")
        return 0

    # ---- the phases of a step

    def _fetch(self, epoch: int, start_step: int):
        """(images, labels, n_bad) on the device for the micro-steps of `epoch` from `start_step` on: the data
        loader's prefetched device batches (uint8 cast and normalised there), or any iterable of CPU batches."""
        loader, device = self.task.loader, self.acc.device
        if hasattr(loader, "device_batches"):
            return loader.device_batches(epoch, start_step, device)
        return (
            (x.to(device, non_blocking=True), y.to(device, non_blocking=True), n)
            for x, y, n in loader.iterate(epoch, start_step=start_step)
        )

    def _forward_backward(
        self, images: torch.Tensor, labels: torch.Tensor, micro: int, last_micro: bool
    ) -> None:
        """One micro-step: loss and gradients, gradient sync only on the last micro-step. The loss is summed
        and checked for NaN on the device; nothing is read back here."""
        acc, task, ga = self.acc, self.task, self.cfg.train.grad_accum
        if last_micro or acc.num_processes == 1:
            ctx = _null()
        else:
            ctx = fsdp.no_grad_sync(self.raw_model) if self.sharded else acc.no_sync(self.model)
        with ctx:
            with acc.autocast() if self.sharded else _null():
                if images.shape[0] > 0:
                    loss = task.loss_fn(self.model, images, labels, self.step, micro)
                else:  # every sample was corrupt: a zero-gradient pass keeps the ranks in lockstep
                    dummy = images.new_zeros(2, *images.shape[1:])
                    loss = (
                        task.loss_fn(
                            self.model, dummy, labels.new_zeros(2, *labels.shape[1:]), self.step, micro
                        )
                        * 0.0
                    )
            if self.fault_nan_step == self.step + 1:
                loss = loss * float("nan")
            acc.backward(loss / ga)
        loss = loss.detach().float()
        self.loss_sum += loss
        self.first_bad = torch.where(
            (self.first_bad < 0) & ~torch.isfinite(loss), self.step + 1, self.first_bad
        )

    def _optimizer_step(self) -> None:
        cfg, d = self.cfg, self.derived
        lr = lr_at(self.step, d.total_steps, d.warmup_steps, d.lr, cfg.train.min_lr, cfg.train.schedule)
        set_lr(self.optimizer, lr)
        if cfg.train.clip_grad > 0:
            self.acc.clip_grad_norm_(self.params, cfg.train.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _bookkeeping(self, meter: Meter) -> int | None:
        """After an optimizer step: log, monitor, evaluate, checkpoint, obey a stop signal. Returns the exit
        code when the run stops here, None to go on."""
        cfg, d, task, spe = self.cfg, self.derived, self.task, self.derived.steps_per_epoch
        final = self.step == d.total_steps
        monitor_due = (
            task.monitor is not None and task.monitor_every > 0 and self.step % task.monitor_every == 0
        )
        eval_due = task.evaluate is not None and (
            final or (self.step % spe == 0 and (self.step // spe) % cfg.train.eval_every == 0)
        )
        row = {}
        if self.step % cfg.log.every_steps == 0 or final or monitor_due or eval_due:
            row = self._log_row(meter)
        elif self.step == meter.start_step + 1 + PACE_STEPS and self.step < cfg.log.every_steps:
            per_step, eta = meter.pace(self.step)  # the first ETA, long before the first log line
            self.log(f"pace: {per_step:.2f} s/step over {PACE_STEPS} steps; ETA {fmt_time(eta)}")
        with meter.paused():
            if monitor_due:
                row.update(task.monitor(self.raw_model, self.step))
                self.model.train()
            if eval_due:
                self._sync_buffers()
                metrics = task.evaluate(self.raw_model, self.step)
                self.model.train()
                row.update(metrics)
                self.log(f"eval at step {self.step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                if task.on_eval is not None:
                    task.on_eval(self.raw_model, metrics, self.step)
            if row:
                self.write_row(row)
            signum = self._should_stop()
            if final or signum or self.step % cfg.checkpoint.every_steps == 0:
                path = self.save()
                self.log(f"checkpoint {path}")
        if signum:
            return self._stopped(signum, meter.start_step)
        return None

    def _log_row(self, meter: Meter) -> dict:
        """The metrics row of this step: mean loss over the window (one reduction), lr, img/s, data wait;
        printed on rank 0. Reading the loss is the only device sync of the window."""
        acc, d, ga = self.acc, self.derived, self.cfg.train.grad_accum
        self._check_finite()
        n = max(meter.window_steps * ga * acc.num_processes, 1)
        mean_loss = acc.reduce(self.loss_sum, reduction="sum").item() / n
        self.loss_sum.zero_()
        m = meter.read(self.step)
        group = self.optimizer.param_groups[0]
        row = {
            "step": self.step,
            "epoch": round(self.step / d.steps_per_epoch, 4),
            "loss": mean_loss,
            "lr": group["lr"] / group.get("lr_scale", 1.0),
            "img_per_s": round(m.img_per_s, 2),
            "data_wait": m.data_wait,
            "bad_samples": self.bad_samples,
            "peak_mem_gb": round(peak_mem_gb(acc.device), 3),
        }
        self.log(
            f"step {self.step}/{d.total_steps} epoch {row['epoch']:.2f} loss {mean_loss:.4f} lr {row['lr']:.3g} "
            f"{m.img_per_s:.1f} img/s data_wait {m.data_wait:.1%} ETA {fmt_time(m.eta_s)} "
            f"peak {row['peak_mem_gb']:.2f} GB"
            + (f" skipped {self.bad_samples} bad samples" if self.bad_samples else "")
        )
        if not self.hinted and self.step > meter.start_step + 1:  # a window after the warm-up step
            hint = loader_hint(m.data_wait, int(self.cfg.data.num_workers), self.cores)
            if hint:
                self.hinted = True
                self.log(hint)
        return row

    def _stopped(self, signum: int, start_step: int) -> int:
        """After the checkpoint of a signalled step: say so, requeue on SIGUSR1 under SLURM; the exit status
        is 0, or 130 for Ctrl-C (the shell's code for an interrupted command, so `a && b` stops)."""
        name = signal.Signals(signum).name
        if self.acc.num_processes > 1:
            self.log(
                f"all {self.acc.num_processes} processes stop at step {self.step} (stop flags compared "
                f"{self.exchange.count} times in {self.step - start_step} steps, about every "
                f"{self.exchange.every_s:g} s: checkpoint.stop_check_s)"
            )
        self.log(f"{name} received: checkpointed step {self.step}, exiting")
        if signum == signal.SIGUSR1 and self.acc.is_main_process:
            self.log(request_requeue(self.cfg.checkpoint.max_requeues))
        return 130 if signum == signal.SIGINT else 0


def _inner(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _plain(cfg: DictConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _progress(cfg: DictConfig, acc: Accelerator, total: int, initial: int):
    show = cfg.log.progress
    if not acc.is_main_process or show == "false" or show is False:
        return None
    if show == "auto" and not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


def train(cfg: DictConfig, accelerator: Accelerator, task: Task) -> int:
    lock = None
    try:
        # one run per output_dir, from before it is read or cleaned up until the run has ended
        lock = claim_output_dir(Path(cfg.output_dir), cfg.checkpoint.lock_wait_s, accelerator)
        return Trainer(cfg, accelerator, task).run()
    finally:
        if lock is not None:
            lock.release()
        STOP.restore()


def seed_everything(seed: int, rank: int) -> None:
    """Seed python/numpy/torch per process (data workers derive their own from the data seed)."""
    set_seed(seed + rank)


def run_entry(
    task_name: str,
    argv: list[str] | None,
    build_task: Callable[[DictConfig, object], Task],
    *,
    class_folders: bool = True,
    steps_per_epoch: Callable[[DictConfig, int], int] | None = None,
) -> int:
    """The body of every entry point's `main`: config -> Accelerator -> task -> the loop. User errors (config,
    data, command line) print one line and return 2; a run that cannot go on returns 1.

    `class_folders`: data.val's classes are checked against data.train's as class folders and built-in sets name
    them (mae.labelsets); a task whose data carry their own classes (annotation files) checks them itself.
    `steps_per_epoch(cfg, world_size)`: what --print-config counts the steps with, for a task whose data the
    classification loaders do not read."""
    from mae import cli
    from mae.config import load_config
    from mae.data import DataError
    from mae.labelsets import pair_train_val
    from mae.runtime import make_accelerator

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, flags = cli.split_flags(argv)
        if "help" in flags:
            print(cli.usage(task_name, sys.modules[build_task.__module__].__doc__))
            return 0
        cfg = load_config(args, task=task_name, log=print if cli.is_main_rank() else None)
        if class_folders:
            cfg = pair_train_val(cfg, args, log=print if cli.is_main_rank() else lambda *a: None)
        if "print-config" in flags:
            return cli.print_config(cfg, steps_per_epoch)
        acc = make_accelerator(cfg)  # installs the stop-signal handlers
        try:
            seed_everything(cfg.seed, acc.process_index)
            rc = train(cfg, acc, build_task(cfg, acc))
        finally:  # also when building the task fails: the caller's own handlers come back
            STOP.restore()
    except (ConfigError, DataError) as e:
        if not getattr(e, "quiet", False):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if rc == 0 and acc.is_main_process:
        out = Path(cfg.output_dir)
        for name, label in (
            ("metrics.jsonl", "metrics"),
            ("checkpoint-last", "checkpoint"),
            ("checkpoint-best", "best"),
            ("reconstruction-last.png", "reconstruction"),
        ):
            if (out / name).exists():
                print(f"{label + ':':<16}{out / name}")
    return rc
