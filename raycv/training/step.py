"""Steps every training loop shares: the optimiser step (with or without AMP's scaler), sums over ranks."""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def say(message: str) -> None:
    """Print a line from a Ray Train worker so that the driver shows it once.

    Ray Train V2 patches ``print`` in its workers to also log each line through the root logger, whose console
    handler writes to stderr: the driver showed every line twice (the worker's stdout and its stderr). Writing
    to the process's own stdout stream bypasses the patch; Ray still streams it to the driver.
    """
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: Any) -> None:
    """Backward and step; with fp16 AMP through the GradScaler, which skips steps with inf/NaN gradients."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


class GradientAccumulation:
    """One optimiser step every ``steps`` batches of an epoch of ``batches`` batches (``train.grad_accum_steps``).

    The batches of a window add their gradients locally: under DDP they run forward and backward inside
    ``model.no_sync()``, so the all-reduce happens once per window, on the window's last backward. Each
    loss is divided by the window's size (the last window of an epoch may be shorter), so a window of
    ``steps`` batches of ``b`` images gives the gradient of one batch of ``steps * b`` (without BatchNorm
    statistics, which stay per batch). ``steps=1`` is :func:`optimizer_step`.

        acc = GradientAccumulation(model, opt, scaler, steps, batches)
        for i, batch in enumerate(loader):
            with acc.window(i):
                acc.backward(i, loss_of(batch))
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, steps: int, batches: int):
        self.model, self.opt, self.scaler = model, opt, scaler
        self.steps, self.batches = max(1, steps), batches
        self.full_windows = batches // self.steps
        opt.zero_grad(set_to_none=True)

    def ends_window(self, i: int) -> bool:
        """Whether batch ``i`` (0-based) is the last of its window: its backward syncs and the step follows."""
        return (i + 1) % self.steps == 0 or i + 1 == self.batches

    def _window_size(self, i: int) -> int:
        return (
            self.steps
            if i // self.steps < self.full_windows
            else self.batches - self.full_windows * self.steps
        )

    def window(self, i: int) -> contextlib.AbstractContextManager[Any]:
        """The context of batch ``i``'s forward and backward: DDP's ``no_sync()`` unless it ends a window."""
        if not self.ends_window(i) and hasattr(self.model, "no_sync"):
            return self.model.no_sync()  # type: ignore[operator,no-any-return]
        return contextlib.nullcontext()

    def backward(self, i: int, loss: torch.Tensor) -> None:
        """Backward of batch ``i``'s loss (scaled to the window); the optimiser step if it ends the window."""
        loss = loss / self._window_size(i)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.ends_window(i):
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def batches_of(indices: list[int], batch_size: int) -> int:
    """How many batches ``indices`` make (the last may be smaller)."""
    return math.ceil(len(indices) / batch_size)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over all ranks (a no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def epoch_seed(seed: int, epoch: int) -> int:
    """The augmentation seed of an epoch: different every epoch, the same on every re-run."""
    return seed * 1_000_003 + epoch * 7919
