"""The phases of one optimizer step, shared by the Trainer and `mae-bench`: forward and backward of each
micro-step under the right gradient-sync context, then clipping, the optimizer step and zero_grad. A speed-up
here shows in the benchmark, and the reverse.

Nothing is read back from the device: the loss is summed there and a non-finite one is remembered there
(`first_bad`, the first step whose loss was not finite), to be read at log and checkpoint time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from mae.train import fsdp

# (prepared model, images, labels, step, micro_step) -> scalar loss
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


class StepRunner:
    """`forward_backward` for each micro-step, then `optimizer_step`. `acc` is the run's Accelerator (autocast,
    backward with its grad scaler, no_sync, clipping); `model` the prepared (DDP / compiled) model and `raw` the
    module itself (sharded in place under FSDP, where autocast is this runner's, not DDP's)."""

    def __init__(self, acc, model: nn.Module, raw: nn.Module, optimizer, loss_fn: LossFn, *, grad_accum: int = 1,
                 clip_grad: float = 0.0, sharded: bool = False) -> None:  # fmt: skip
        self.acc, self.model, self.raw, self.optimizer, self.loss_fn = acc, model, raw, optimizer, loss_fn
        self.grad_accum, self.clip_grad, self.sharded = grad_accum, clip_grad, sharded
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.loss_sum = torch.zeros((), device=acc.device)  # summed over the micro-steps of a log window
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=acc.device)

    def _sync_context(self, last_micro: bool):
        if last_micro or self.acc.num_processes == 1:
            return contextlib.nullcontext()
        return fsdp.no_grad_sync(self.raw) if self.sharded else self.acc.no_sync(self.model)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, step: int, micro: int) -> None:
        """One micro-step of optimizer step `step` + 1: loss and gradients, synchronised over the processes only
        on the last micro-step. A batch whose every sample was corrupt (empty) runs a zero-gradient pass of two
        blank samples, which keeps the ranks in lockstep."""
        with self._sync_context(micro == self.grad_accum - 1):
            with self.acc.autocast() if self.sharded else contextlib.nullcontext():
                if images.shape[0] > 0:
                    loss = self.loss_fn(self.model, images, labels, step, micro)
                else:
                    blank = images.new_zeros(2, *images.shape[1:]), labels.new_zeros(2, *labels.shape[1:])
                    loss = self.loss_fn(self.model, *blank, step, micro) * 0.0
            self.acc.backward(loss / self.grad_accum)
        loss = loss.detach().float()
        self.loss_sum += loss
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step + 1, self.first_bad)

    def optimizer_step(self, lr: float) -> None:
        """Set the lr (times each group's lr_scale), clip, step, zero the gradients."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        if self.clip_grad > 0:
            self.acc.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
