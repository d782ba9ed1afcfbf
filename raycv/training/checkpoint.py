"""A training run's record on the workers: its checkpoints, its best epoch and the epoch's console line.

The record is ``{"history": [metrics rows], "best": {epoch, metrics[, confusion]} | None,
"resumed_at_epochs": [...]}``; rank 0 writes it to the run directory after every epoch
(:func:`raycv.training.run_directory.write_run_dir`) and into each Ray Train checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import ray.train
import torch
from torch import nn

from raycv import storage
from raycv.config import TrainConfig
from raycv.models import saved
from raycv.storage import Storage
from raycv.training.run_directory import save_weights

CHECKPOINT_FILE = "state.pt"
# recorded per epoch, but not model quality
NOT_METRICS = ("lr", "epoch_s", "epoch_cpu_s", "nonfinite_steps", "lr_halved", "diverged")


def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """``ray.train.report`` with ``state`` (rank 0) as the checkpoint. report() copies the folder to the run's
    storage before it returns (Ray's default, synchronous upload), so the local copy is removed right after."""
    if state is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="raycv-ckpt-") as path:
        torch.save(state, os.path.join(path, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))


def restore(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict[str, Any], Any]:
    """Load the last reported checkpoint, if any.

    Returns:
        The epoch to start at, the run's record and the divergence guard's state (None if none).
    """
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, {"history": [], "best": None, "resumed_at_epochs": []}, None
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    start = int(state["epoch"]) + 1
    record = {
        "history": list(state["history"]),
        "best": state["best"],
        "resumed_at_epochs": [*state.get("resumed_at_epochs", []), start],
    }
    return start, record, state.get("guard")


def keep_best(
    cfg: TrainConfig,
    record: dict[str, Any],
    metrics: dict[str, Any],
    primary: str,
    model: nn.Module,
    extras: dict[str, Any],
    rank: int,
) -> None:
    """Make ``metrics`` the run's best epoch if it is one (:func:`is_better`), with the evaluator's
    ``extras`` (e.g. the confusion matrix); rank 0 then writes its weights to ``model.pt``."""
    best = record["best"]
    if not is_better(metrics, best["metrics"] if best else None, primary):
        return
    kept = {k: v for k, v in metrics.items() if k not in NOT_METRICS}
    record["best"] = {"epoch": metrics["epoch"], "metrics": kept, **extras}
    if rank == 0:
        uri = storage.join(cfg.output.dir, saved.WEIGHTS)
        save_weights(uri, model.state_dict(), Storage(endpoint_url=cfg.storage.endpoint_url))


def round_floats(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with every float rounded to 6 decimals."""
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def is_better(row: dict[str, Any], best: dict[str, Any] | None, primary: str) -> bool:
    """Whether the epoch of metrics ``row`` beats ``best`` (the best epoch's metrics so far, or None).

    An epoch whose train loss or ``primary`` metric is NaN/inf, or that diverged, is never best; the first
    finite epoch is; after that only a strictly higher ``primary`` wins (a tie keeps the earlier epoch).
    """
    loss, value = row.get("train_loss"), row.get(primary)
    if row.get("diverged") or not _finite(loss) or not _finite(value):
        return False
    return best is None or float(value) > float(best[primary])  # type: ignore[arg-type]


def best_of(history: list[dict[str, Any]], primary: str) -> dict[str, Any] | None:
    """The best epoch's row of ``history`` by :func:`is_better`, or None when no epoch qualifies."""
    best: dict[str, Any] | None = None
    for row in history:
        if is_better(row, best, primary):
            best = row
    return best


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
