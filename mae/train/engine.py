"""The one training loop shared by every task.

Tasks build a `Task` (model, parameter groups, data, loss, model.init, optional evaluation / monitor /
checkpoint hooks); the Trainer does the rest: Accelerate (DDP over processes and nodes, bf16/fp16/fp32),
gradient accumulation, warmup + cosine lr, clipping, logging to stdout / metrics.jsonl / wandb,
atomic checkpoints with auto-resume, graceful stop on SIGUSR1/SIGTERM (with SLURM requeue), and a
hard stop on a non-finite loss that never checkpoints the bad state.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mae.config import Derived, derive, flatten, record_of, resolve_compile, setting_changes, to_yaml
from mae.runs.record import describe_changes, recorded_config, refuse_trained_with, resume_point, write_record
from mae.train import checkpoint as ckpt
from mae.train import fsdp, trackers
from mae.train.meter import Meter, loader_hint
from mae.train.optim import build_optimizer, lr_at
from mae.train.runtime import (
    STOP,
    ControlGroup,
    Interrupted,
    StopExchange,
    TrainingError,
    fmt_time,
    peak_mem_gb,
    precision_reason,
    request_requeue,
)
from mae.train.state import inner_optimizer
from mae.train.step import LossFn, StepRunner

PACE_STEPS = 5  # steps after the warm-up step before the first ETA is printed (when no log line came yet)


@dataclass
class Task:
    model: nn.Module  # unwrapped; the engine prepares it
    groups: list[dict]  # optimizer parameter groups (mae.train.optim.param_groups)
    loader: object  # mae.data.TrainLoader
    loss_fn: LossFn  # (prepared model, images, labels, step, micro_step) -> scalar loss
    # model.init: called on a fresh start only (a resumed run's weights come from its checkpoint), before the
    # model is sharded or prepared
    init_weights: Callable[[], None] | None = None
    evaluate: Callable[[nn.Module, int], dict] | None = None  # (unwrapped model, step) -> metrics (all ranks)
    monitor: Callable[[nn.Module, int], dict] | None = None  # every `monitor_every` steps (all ranks)
    monitor_every: int = 0
    # after a commit: on rank 0, or on every rank when the model is sharded (its forward is collective)
    on_checkpoint: Callable[[nn.Module, Path, int], None] | None = None
    on_eval: Callable[[nn.Module, dict, int], None] | None = None  # after each evaluation (all ranks)
    # what the config left to the data, recorded as the run's own values and checked on resume like the rest
    # (model.num_classes=0: the classes the task found), as dotted keys
    record: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- setup


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
        self.pending: dict | None = None  # evaluations of this step that a stop signal interrupted
        self.hinted = False  # the loader advice is given once per process
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        self.cores = len(os.sched_getaffinity(0)) // local  # this process's share of the machine's cores
        self.stop = STOP
        self.exchange = StopExchange(cfg.checkpoint.stop_check_s)
        self.ranks = ControlGroup(accelerator.num_processes)
        self.checkpoints = ckpt.Checkpointer(
            self.out, accelerator, self.sharded, cfg.checkpoint.keep, self.ranks.any, self.log
        )

    def log(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)

    # ---- state

    def resume(self, path: Path) -> None:
        train_state = self.checkpoints.resume(path, self.raw_model, self.optimizer, self.groups)
        if train_state.get("scaler") is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(train_state["scaler"])
        self.step = int(train_state["step"])
        self.bad_samples = int(train_state.get("bad_samples", 0))
        self.pending = train_state.get("pending")
        if train_state.get("world_size") not in (None, self.acc.num_processes):
            self.log(
                f"warning: resuming a {train_state['world_size']}-process run on {self.acc.num_processes} "
                "processes: the data order from here on differs from the original run"
            )
        if self.acc.is_main_process:  # a pending step's row is written when its evaluations have run
            dropped = ckpt.truncate_metrics(self.metrics_path, self.step - bool(self.pending))
            if dropped:
                self.log(f"dropped {dropped} metrics rows logged after step {self.step} (work since lost)")
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        """All ranks: an atomic checkpoint of the current step (mae.train.checkpoint), then the task's
        on_checkpoint hook. Never checkpoints a state that a non-finite loss has reached."""
        self._check_finite()
        train = {
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
            "step": self.step,
            "epoch": self.step // self.derived.steps_per_epoch,
            "bad_samples": self.bad_samples,
            "world_size": self.acc.num_processes,
        }
        if self.pending:  # evaluations a stop signal interrupted, and the metrics row they belong to
            train["pending"] = self.pending
        meta = {
            "step": self.step,
            "epoch": train["epoch"],
            "task": self.cfg.task,
            "pending": bool(self.pending),
        }
        final = self.checkpoints.save(
            self.step, self.raw_model, self.optimizer, self.groups, train, meta, self.record_text
        )
        if self.task.on_checkpoint is not None and (self.acc.is_main_process or self.sharded):
            self.task.on_checkpoint(self.raw_model, final, self.step)
        return final

    # ---- checks

    def _check_finite(self) -> None:
        first_bad = self.runner.first_bad
        bad = (
            int(self.acc.reduce(first_bad.clone(), reduction="max").item())
            if self.acc.num_processes > 1
            else int(first_bad.item())
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
        now = time.monotonic()
        # one MAX all-reduce: the highest signal and the smallest proposed interval (negated)
        signum, neg_steps = self.ranks.max([self.stop.signum, -self.exchange.proposal(self.step, now)])
        self.exchange.agreed(self.step, now, -neg_steps)
        return signum

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

        handle = inner_optimizer(self.optimizer).register_step_post_hook(hook)

    # ---- main

    def run(self) -> int:
        cfg, acc, d = self.cfg, self.acc, self.derived
        record = record_of(cfg, d, self.task.record)
        resume_from = resume_point(self.out, flatten(record), cfg.checkpoint.resume, self.task.record)
        acc.wait_for_everyone()
        changes = {}
        if resume_from is not None:
            changes = setting_changes(recorded_config(resume_from) or {}, flatten(record))
            done, pending = ckpt.checkpoint_step(resume_from)
            if done >= d.total_steps and not pending:
                return self._finished(done, changes)  # nothing runs: nothing is written
            refuse_trained_with(self.out, changes)
        if resume_from is None and self.task.init_weights is not None:
            self.task.init_weights()  # model.init: a fresh start only
        elif resume_from is not None and cfg.model.init:
            self.log(f"resuming in {self.out}: weights come from its checkpoint, model.init is not read")
        if self.sharded:
            self.groups = fsdp.shard(self.raw_model, self.groups, acc.mixed_precision)
        elif cfg.train.fsdp:
            self.log("train.fsdp=true with one process: nothing to shard, the model runs whole")
        self.optimizer = build_optimizer(self.groups, cfg.train.optimizer, d.lr, cfg.train.betas)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            for p in ckpt.remove_partial(self.out):
                self.log(f"removed incomplete checkpoint {p.name} (interrupted write)")
            if resume_from is None and (dropped := ckpt.truncate_metrics(self.metrics_path, 0)):
                self.log(f"dropped {dropped} metrics rows of an earlier attempt that left no checkpoint")
        acc.wait_for_everyone()
        if resume_from is not None:
            self.resume(resume_from)
        self._write_record(record, changes)
        self.log(
            f"{cfg.task}: {acc.num_processes} process(es) on {acc.device.type}"
            f"{' (FSDP: parameters, gradients and optimizer state sharded)' if self.sharded else ''}, "
            f"precision {acc.mixed_precision}{precision_reason(cfg.train.precision, acc.device.type)}; "
            f"effective batch {d.effective_batch} = {cfg.train.batch_size} x {cfg.train.grad_accum} accum x "
            f"{d.world_size}; lr {d.lr:.3g} (blr {cfg.train.blr:g} x {d.effective_batch}/256"
            f"{', overridden by train.lr' if cfg.train.lr > 0 else ''}); {d.steps_per_epoch} steps/epoch, "
            f"{d.total_steps} steps ({d.epochs:.2f} epochs), {d.warmup_steps} warmup"
        )
        self._prove_attention()
        model = self._compile(self.raw_model)
        if self.sharded:  # already distributed: Accelerate wraps the optimizer only, autocast is the loop's
            self.model, self.optimizer = model, acc.prepare(self.optimizer)
        else:
            self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.runner = StepRunner(acc, self.model, self.raw_model, self.optimizer, self.task.loss_fn,
                                 grad_accum=cfg.train.grad_accum, clip_grad=cfg.train.clip_grad,
                                 sharded=self.sharded)  # fmt: skip
        self._init_trackers()
        self.stop.install()  # no-op when make_accelerator did it
        try:
            if model is not self.raw_model:
                self._log_first_step_once()
            if self.pending and (stopped := self._run_pending()) is not None:
                return stopped
            return self._loop()
        finally:
            self.stop.restore()
            acc.end_training()

    def _finished(self, step: int, changes: dict[str, tuple]) -> int:
        """A re-run of a finished run: nothing trains, nothing is written; settings given for it are not applied,
        and it says which."""
        self.log(f"already complete at step {step}; outputs in {self.out}")
        if describe_changes(changes, derived=False):
            self.log(
                f"not applied (the run is finished; nothing was run or written): "
                f"{describe_changes(changes, derived=False)}; to train with them, start a new output_dir with "
                f"model.init={self.out}"
            )
        return 0

    def _write_record(self, record: dict, changes: dict[str, tuple]) -> None:
        """Once the run is known to start or resume: config.yaml (what the weights are trained with from here on,
        also written into each checkpoint) and the history of changed settings (mae.runs.record)."""
        self.record_text = to_yaml(record)
        if self.acc.is_main_process:
            said = write_record(self.out, self.record_text, self.step, changes)
            if said:
                self.log(said)

    def _loop(self) -> int:
        cfg, d = self.cfg, self.derived
        ga, spe = cfg.train.grad_accum, d.steps_per_epoch
        meter = Meter(d.total_steps, self.step, d.effective_batch)
        progress = _progress(cfg, self.acc, d.total_steps, self.step)
        self.model.train()
        while self.step < d.total_steps:
            epoch = self.step // spe
            micro, yielded = 0, 0
            for images, labels, n_bad in meter.batches(self._fetch(epoch, (self.step % spe) * ga)):
                yielded += 1
                self.bad_samples += int(n_bad)
                self.runner.forward_backward(images, labels, self.step, micro)
                micro = (micro + 1) % ga
                if micro:
                    continue
                self.runner.optimizer_step(
                    lr_at(
                        self.step, d.total_steps, d.warmup_steps, d.lr, cfg.train.min_lr, cfg.train.schedule
                    )
                )
                self.step += 1
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
            if not self._evaluations(row, monitor_due, eval_due):
                return self._stop_for_evaluation(row, monitor_due, eval_due, meter.start_step)
            if row:
                self.write_row(row)
            signum = self._should_stop()
            if final or signum or self.step % cfg.checkpoint.every_steps == 0:
                path = self.save()
                self.log(f"checkpoint {path}")
        if signum:
            return self._stopped(signum, meter.start_step)
        return None

    def _evaluations(self, row: dict, monitor_due: bool, eval_due: bool) -> bool:
        """The monitor and the evaluation due at this step, their figures into `row`; False when a stop signal
        abandoned them (every rank alike: the task's evaluators agree on it)."""
        task = self.task
        try:
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
        except Interrupted:
            self.model.train()
            return False
        return True

    def _stop_for_evaluation(self, row: dict, monitor_due: bool, eval_due: bool, start_step: int) -> int:
        """A stop signal during the step's evaluations: checkpoint the step with them pending (its metrics row
        kept for them) and exit; the resumed run runs them first (`_run_pending`)."""
        self.pending = {"row": row, "monitor": monitor_due, "evaluate": eval_due}
        signum = self.ranks.max([self.stop.signum])[0] or signal.SIGTERM  # a rank the signal missed agrees
        what = " and ".join(w for w, due in (("k-NN monitor", monitor_due), ("evaluation", eval_due)) if due)
        self.log(
            f"stop signal during the {what} at step {self.step}: abandoned; it runs when the run resumes"
        )
        self.log(f"checkpoint {self.save()}")
        return self._stopped(signum, start_step)

    def _run_pending(self) -> int | None:
        """After resuming from a checkpoint whose evaluations a stop signal interrupted: run them, write the step's
        metrics row, and checkpoint the step again without them pending. Returns an exit code if stopped again."""
        p = self.pending
        row = dict(p["row"])
        self.log(f"step {self.step}: running the evaluations a stop signal interrupted")
        if not self._evaluations(row, p["monitor"], p["evaluate"]):
            return self._stop_for_evaluation(row, p["monitor"], p["evaluate"], self.step)
        if row:
            self.write_row(row)
        self.pending = None
        self.log(f"checkpoint {self.save()}")
        return None

    def _log_row(self, meter: Meter) -> dict:
        """The metrics row of this step: mean loss over the window (one reduction), lr, img/s, data wait;
        printed on rank 0. Reading the loss is the only device sync of the window."""
        acc, d, ga = self.acc, self.derived, self.cfg.train.grad_accum
        self._check_finite()
        n = max(meter.window_steps * ga * acc.num_processes, 1)
        mean_loss = acc.reduce(self.runner.loss_sum, reduction="sum").item() / n
        self.runner.loss_sum.zero_()
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain(cfg: DictConfig) -> dict:
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
    """Run `task` in cfg.output_dir, holding the directory's lock (one run per directory) from before it is read
    or cleaned up until the run has ended. A run that fails before writing anything (a bad model.init, say)
    leaves no directory it created."""
    from mae.runs.lock import claim_output_dir, remove_if_unused

    out = Path(cfg.output_dir)
    created = accelerator.is_main_process and not out.exists()
    lock, finished = None, False
    try:
        lock = claim_output_dir(out, cfg.checkpoint.lock_wait_s, accelerator)
        rc = Trainer(cfg, accelerator, task).run()
        finished = True
        return rc
    finally:
        if lock is not None:
            lock.release()
        if created and not finished:
            remove_if_unused(out)
        STOP.restore()


def seed_everything(seed: int, rank: int) -> None:
    """Seed python/numpy/torch per process (data workers derive their own from the data seed)."""
    set_seed(seed + rank)
