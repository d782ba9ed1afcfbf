"""One epoch of any task: training steps through the Task's loss, and validation through its evaluator.

The loop owns what every task shares: the shard of each rank, gradient accumulation, AMP, the clip and the
divergence guard; the Task owns what differs: the batch's loss and how predictions are scored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from raycv.data.loader import BatchLoader
from raycv.tasks.registry import StepContext, Task
from raycv.training.step import GradientAccumulation, add_loss, batches_of, epoch_seed, mean_loss


def to_device(value: Any, device: Any) -> Any:
    """Tensors (also inside lists and dicts, e.g. detection targets) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Keep the running statistics of frozen BatchNorm layers fixed: a frozen backbone stays as loaded."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters()
        ):
            m.eval()


def train_epoch(
    model: nn.Module,
    task: Task,
    loader: BatchLoader,
    indices: list[int],
    opt: torch.optim.Optimizer,
    amp: tuple[Any, Any],
    ctx: StepContext,
    *,
    seed: int,
    epoch: int,
    grad_accum_steps: int,
    clip_grad_norm: float | None,
    guard: Any,
    frozen_backbone: bool,
) -> float:
    """One epoch on this rank's ``indices``; the mean finite loss over all ranks (NaN if none was finite).

    ``guard`` sets the lr before each step and counts the skipped (NaN/inf) ones; the epoch ends early when
    it says the run ``diverged`` (every rank alike: it decides on all-reduced flags).
    """
    model.train()
    if frozen_backbone:
        freeze_frozen_batchnorm(model)
    autocast, scaler = amp
    total = torch.zeros(2, dtype=torch.float64)
    acc = GradientAccumulation(
        model,
        opt,
        scaler,
        grad_accum_steps,
        batches_of(indices, loader.batch_size),
        clip_grad_norm=clip_grad_norm,
        guard=guard,
    )
    for i, (images, targets) in enumerate(loader.iterate(indices, seed=epoch_seed(seed, epoch))):
        images, targets = to_device(images, ctx.device), to_device(targets, ctx.device)
        with acc.window(i):
            with autocast:
                loss = task.loss(model, images, targets, ctx)
            acc.backward(i, loss)
        add_loss(total, loss, len(images))
        if guard.diverged:
            break
    return mean_loss(total)


@torch.no_grad()
def validate(
    model: nn.Module, task: Task, loader: BatchLoader, indices: list[int], num_classes: int, device: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics over every rank's ``indices``, extras for the model card); every rank must call it."""
    model.eval()
    evaluator = task.evaluator(num_classes, device)
    for images, targets in loader.iterate(indices):
        evaluator.update(model, images, targets)
    return evaluator.compute()


def step_context(cfg: Any, device: Any, num_classes: int, epoch: int, rank: int) -> StepContext:
    """The context of this rank's steps in ``epoch`` (its own seeded rng: mixup draws differ by rank)."""
    rng = np.random.default_rng([cfg.train.seed, epoch, rank])
    return StepContext(
        device=device, num_classes=num_classes, rng=rng, augment=cfg.train.augment, loss=cfg.train.loss
    )
