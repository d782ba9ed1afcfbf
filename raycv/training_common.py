"""Steps every training loop shares: the optimiser step (with or without AMP's scaler), sums over ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over all ranks (a no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def epoch_seed(seed: int, epoch: int) -> int:
    """The augmentation seed of an epoch: different every epoch, the same on every re-run."""
    return seed * 1_000_003 + epoch * 7919
