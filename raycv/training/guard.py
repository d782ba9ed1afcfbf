"""The learning-rate schedule (warmup x cosine/step x halvings) and the guard against a diverging run.

A step whose loss (or gradient norm) is NaN/inf on any rank is skipped by every rank; after
:data:`PATIENCE` such steps in a row the guard restores the last good weights and optimiser state (held in
memory: those of the last epoch that ended finite, or the initial ones) and halves the lr. When that has
happened :data:`MAX_HALVINGS` times and the loss still does not stay finite, the run is diverged: every rank
stops after reporting that epoch, and the driver raises :class:`TrainingDivergedError` (exit 1).
Every decision rests on flags all-reduced over the ranks, so all ranks take the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raycv.errors import RaycvError
from raycv.tasks.registry import get_task
from raycv.training.step import agree_any, say

if TYPE_CHECKING:
    from raycv.config import TrainConfig

WARMUP_START_FACTOR = 0.001  # torchvision's detection references: lr x 0.001 at the first iteration
PATIENCE = 3  # non-finite steps in a row before restoring the last good state and halving the lr
MAX_HALVINGS = 3


class TrainingDivergedError(RaycvError, RuntimeError):
    """The training loss stayed NaN/inf after the lr was halved :data:`MAX_HALVINGS` times."""


def warmup_epochs_of(cfg: TrainConfig) -> float:
    """``train.warmup_epochs``, or the task's default when it is None (1 for detection tasks, else 0)."""
    if cfg.train.warmup_epochs is not None:
        return cfg.train.warmup_epochs
    return get_task(cfg.task).warmup_epochs


def clip_grad_norm_of(cfg: TrainConfig) -> float | None:
    """``train.clip_grad_norm`` (0 = off), or the task's default when it is None (10 for detection tasks)."""
    value = cfg.train.clip_grad_norm
    if value is None:
        return get_task(cfg.task).clip_grad_norm
    return value or None


def warmup_factor(step: int, warmup_steps: int, start: float = WARMUP_START_FACTOR) -> float:
    """The lr factor of optimiser step ``step`` (0-based, counted over the run): ``start`` at step 0, rising
    linearly to 1 at ``warmup_steps`` (as ``torch.optim.lr_scheduler.LinearLR``), 1 from then on."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * step / warmup_steps


def epoch_factor(scheduler: str, epoch: int, epochs: int) -> float:
    """The lr factor of ``epoch`` (0-based): ``CosineAnnealingLR(T_max=epochs)`` or ``StepLR(step_size=
    epochs // 3, gamma=0.1)`` stepped once per epoch, in closed form; 1 for ``none``."""
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if scheduler == "step":
        return float(0.1 ** (epoch // max(1, epochs // 3)))
    return 1.0


@dataclass
class LrSchedule:
    """lr = ``base_lr`` x ``scale`` (halvings) x epoch factor x warmup factor, set before every step."""

    base_lr: float
    scheduler: str
    epochs: int
    steps_per_epoch: int
    warmup_steps: int
    scale: float = 1.0

    @classmethod
    def from_config(cls, cfg: TrainConfig, steps_per_epoch: int) -> LrSchedule:
        """The schedule of ``cfg`` for epochs of ``steps_per_epoch`` optimiser steps."""
        t = cfg.train
        warmup = round(warmup_epochs_of(cfg) * steps_per_epoch)
        return cls(t.lr, t.scheduler, t.epochs, max(1, steps_per_epoch), warmup)

    def lr(self, epoch: int, step: int) -> float:
        """The lr of optimiser step ``step`` (0-based) of ``epoch`` (0-based)."""
        factor = epoch_factor(self.scheduler, epoch, self.epochs)
        return (
            self.base_lr
            * self.scale
            * factor
            * warmup_factor(epoch * self.steps_per_epoch + step, self.warmup_steps)
        )

    def apply(self, opt: torch.optim.Optimizer, epoch: int, step: int) -> float:
        """Set every parameter group's lr to that of ``step`` of ``epoch``; returns it."""
        lr = self.lr(epoch, step)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr


def _cpu_copy(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def state_is_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite on every rank."""
    bad = any(
        t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in model.state_dict().values()
    )
    return not agree_any(bad)


class DivergenceGuard:
    """Sets the lr before every optimiser step, counts the skipped (non-finite) ones and reacts to a streak.

    After ``patience`` skipped steps in a row: restore the last good state and halve the lr, or, when the lr
    was already halved ``max_halvings`` times, mark the run ``diverged`` (the loop then ends the epoch).

        guard = DivergenceGuard(model, opt, schedule, verbose=rank == 0)
        for epoch in ...:
            guard.start_epoch(epoch)
            ... GradientAccumulation(..., guard=guard) ...; stop the epoch early if guard.diverged
            guard.end_epoch()  # weights still finite? then they are the new last good state
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        schedule: LrSchedule,
        *,
        verbose: bool = True,
        patience: int = PATIENCE,
        max_halvings: int = MAX_HALVINGS,
    ):
        self.model, self.opt, self.schedule = model, opt, schedule
        self.verbose, self.patience, self.max_halvings = verbose, patience, max_halvings
        self.halvings = 0  # over the run
        self.streak = 0  # skipped steps in a row, across epochs
        self.epoch, self.step = 0, 0
        self.nonfinite_steps = 0  # this epoch
        self.lr_halved = 0  # this epoch
        self.diverged = False
        self.reason = ""  # why it diverged
        self._good: dict[str, Any] = {}
        self._good_epoch = 0
        self.remember(0)

    def remember(self, epoch: int) -> None:
        """Hold the current weights and optimiser state (on the CPU) as the last good state, of ``epoch``."""
        self._good = {
            "model": _cpu_copy(self.model.state_dict()),
            "optimizer": _cpu_copy(self.opt.state_dict()),
        }
        self._good_epoch = epoch

    def start_epoch(self, epoch: int) -> None:
        """Begin ``epoch`` (0-based): resets the per-epoch counts."""
        self.epoch, self.nonfinite_steps, self.lr_halved = epoch, 0, 0

    def before_step(self, step: int) -> None:
        """Set the lr of optimiser step ``step`` of the current epoch."""
        self.step = step
        self.schedule.apply(self.opt, self.epoch, step)

    def after_step(self, skipped: bool) -> None:
        """Count a step; a streak of ``patience`` skipped steps restores the last good state (or diverges)."""
        if not skipped:
            self.streak = 0
            return
        self.nonfinite_steps += 1
        self.streak += 1
        if self.streak >= self.patience and not self.diverged:
            self._recover(f"the loss was NaN/inf for {self.streak} steps in a row")

    def end_epoch(self) -> None:
        """After the epoch's training: restore the last good state if the weights (or BatchNorm statistics)
        are no longer finite, else hold them as the new last good state."""
        if self.diverged:
            return
        if not state_is_finite(self.model):
            self._recover("the weights became NaN/inf")
        else:
            self.remember(self.epoch + 1)

    def _recover(self, reason: str) -> None:
        where = f"[raycv] epoch {self.epoch + 1}: {reason}"
        if self.halvings >= self.max_halvings:
            self.diverged, self.reason = True, reason
            self._say(f"{where} after {self.halvings} lr halvings: training diverged, stopping")
            return
        self.model.load_state_dict(self._good["model"])
        self.opt.load_state_dict(_cpu_copy(self._good["optimizer"]))  # a copy: steps update it in place
        self.opt.zero_grad(set_to_none=True)
        self.schedule.scale *= 0.5
        self.schedule.apply(self.opt, self.epoch, self.step)  # the restored state holds the old lr
        self.halvings += 1
        self.lr_halved += 1
        self.streak = 0
        held = f"epoch {self._good_epoch}" if self._good_epoch else "the start"
        self._say(
            f"{where}: restored the weights and optimiser state of {held} and halved the lr "
            f"(halving {self.halvings}/{self.max_halvings}: lr x{self.schedule.scale:g})"
        )

    def _say(self, message: str) -> None:
        if self.verbose:
            say(message)

    def epoch_metrics(self) -> dict[str, Any]:
        """The fields of this epoch's metrics row: ``nonfinite_steps``, ``lr_halved`` (and ``diverged``)."""
        row: dict[str, Any] = {"nonfinite_steps": self.nonfinite_steps, "lr_halved": self.lr_halved}
        if self.diverged:
            row["diverged"] = self.reason
        return row

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the lr scale and the number of halvings so far."""
        return {"scale": self.schedule.scale, "halvings": self.halvings, "base_lr": self.schedule.base_lr}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Resume from :meth:`state_dict`; ignored when ``None`` (a checkpoint older than the guard) or when
        ``train.lr`` changed since (a re-run with a new lr starts that lr unhalved)."""
        if state and state.get("base_lr") == self.schedule.base_lr:
            self.schedule.scale = float(state["scale"])
            self.halvings = int(state["halvings"])


def divergence_message(cfg: TrainConfig, row: dict[str, Any]) -> str:
    """What the driver says when the metrics row ``row`` is marked ``diverged``: the epoch and the fixes."""
    clip = clip_grad_norm_of(cfg)
    return (
        f"training diverged at epoch {row['epoch']}: {row['diverged']} after {MAX_HALVINGS} lr halvings "
        f"({row.get('nonfinite_steps', 0)} non-finite steps in that epoch); "
        f"lower train.lr (now {cfg.train.lr:g}), raise train.warmup_epochs (now {warmup_epochs_of(cfg):g}) "
        f"or set train.clip_grad_norm (now {f'{clip:g}' if clip else 'off'})"
    )
