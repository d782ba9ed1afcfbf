"""Steps every training loop shares: the optimiser step (with or without AMP's scaler, clipped, skipped when
the loss is NaN/inf on some rank), sums over ranks."""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Protocol

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


class StepGuard(Protocol):
    """What :class:`GradientAccumulation` calls around each optimiser step (``raycv.training.guard``)."""

    def before_step(self, step: int) -> None:
        """Set the lr of the epoch's optimiser step ``step`` (0-based)."""

    def after_step(self, skipped: bool) -> None:
        """Count a step; ``skipped``: its loss or gradients were NaN/inf on some rank, no update was made."""


class GradientAccumulation:
    """One optimiser step every ``steps`` batches of an epoch of ``batches`` batches (``train.grad_accum_steps``).

    The batches of a window add their gradients locally: under DDP they run forward and backward inside
    ``model.no_sync()``, so the all-reduce happens once per window, on the window's last backward. Each
    loss is divided by the window's size (the last window of an epoch may be shorter), so a window of
    ``steps`` batches of ``b`` images gives the gradient of one batch of ``steps * b`` (without BatchNorm
    statistics, which stay per batch).

    A window whose loss was NaN/inf on any rank (or, without AMP's scaler, whose gradient norm is) makes no
    update on every rank: the ranks agree through one small all-reduce per step. ``clip_grad_norm`` clips
    the global gradient norm before the step (after the scaler's unscale).

        acc = GradientAccumulation(model, opt, scaler, steps, batches)
        for i, batch in enumerate(loader):
            with acc.window(i):
                acc.backward(i, loss_of(batch))
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        scaler: Any,
        steps: int,
        batches: int,
        *,
        clip_grad_norm: float | None = None,
        guard: StepGuard | None = None,
    ):
        self.model, self.opt, self.scaler = model, opt, scaler
        self.steps, self.batches = max(1, steps), batches
        self.full_windows = batches // self.steps
        self.clip_grad_norm, self.guard = clip_grad_norm, guard
        self.nonfinite = False  # a loss of the current window was NaN/inf on this rank
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
        if not bool(torch.isfinite(loss.detach()).all()):
            self.nonfinite = True
        loss = loss / self._window_size(i)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.ends_window(i):
            self._step(i // self.steps)

    def _step(self, step: int) -> None:
        """Clip, then step unless some rank saw a NaN/inf loss (or gradient norm); always zero the gradients."""
        opt, scaler = self.opt, self.scaler
        if self.guard is not None:
            self.guard.before_step(step)
        unscaled, bad_norm = False, False
        if self.clip_grad_norm:
            if scaler is not None:
                scaler.unscale_(opt)
                unscaled = True
            params = [p for g in opt.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            # With fp16 AMP, inf gradients are the scaler's business: it skips the step and lowers its scale.
            bad_norm = scaler is None and not bool(torch.isfinite(norm))
        skipped = agree_any(self.nonfinite or bad_norm)
        self.nonfinite = False
        if scaler is not None and (unscaled or not skipped):
            if not skipped:
                scaler.step(opt)
            scaler.update()
        elif not skipped:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if self.guard is not None:
            self.guard.after_step(skipped)


def add_loss(total: torch.Tensor, loss: torch.Tensor, n: int) -> None:
    """Add a batch's loss times its ``n`` images to ``total`` (``[sum, count]``), unless it is NaN/inf."""
    value = float(loss.detach())
    if math.isfinite(value):
        total[0] += value * n
        total[1] += n


def mean_loss(total: torch.Tensor) -> float:
    """The mean loss of :func:`add_loss`'s ``total`` over all ranks; NaN when no batch had a finite one."""
    all_reduce_sum(total)
    return float(total[0]) / float(total[1]) if float(total[1]) > 0 else math.nan


def batches_of(indices: list[int], batch_size: int) -> int:
    """How many batches ``indices`` make (the last may be smaller)."""
    return math.ceil(len(indices) / batch_size)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _reduce_device() -> torch.device:
    """Where a tensor must be for a collective: the GPU under NCCL (which has no CPU tensors), else the CPU."""
    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over all ranks (a no-op outside a process group)."""
    if _distributed():
        device = _reduce_device()
        if t.device == device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            moved = t.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved)
    return t


def agree_any(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (``flag`` itself outside a process group): one all-reduce."""
    if not _distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64))[0] > 0)


def epoch_seed(seed: int, epoch: int) -> int:
    """The augmentation seed of an epoch: different every epoch, the same on every re-run."""
    return seed * 1_000_003 + epoch * 7919
