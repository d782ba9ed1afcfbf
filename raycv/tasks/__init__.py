"""Per-task pieces: losses, metrics, post-processing, and :func:`task_ops` that training picks them by.

Classification and semantic segmentation share one evaluation shape: a [K, K] confusion matrix of
``argmax`` predictions, summed over every rank, from which the task's metrics are computed exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TaskOps:
    """What the training loop needs to know about a task."""

    primary_metric: str  # the validation metric that picks the best epoch (higher is better)
    confusion: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (targets, preds, K) -> [K, K]
    metrics: Callable[[Any], dict[str, Any]]  # confusion matrix -> metrics
    loss: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (logits, targets, cfg) -> loss


def task_ops(task: str) -> TaskOps:
    if task == "classification":
        from raycv.tasks import classification as c

        return TaskOps(
            "accuracy",
            c.confusion_matrix,
            c.metrics_from_confusion,
            lambda logits, targets, cfg: c.soft_cross_entropy(
                logits, targets, cfg.train.augment.label_smoothing
            ),
        )
    if task == "semantic_segmentation":
        from raycv.tasks import segmentation as s

        return TaskOps(
            "miou",
            lambda targets, preds, k: s.confusion_matrix(targets, preds, k, ignore_index=s.IGNORE_INDEX),
            s.metrics_from_confusion,
            lambda logits, targets, cfg: s.segmentation_loss(
                logits, targets, kind=cfg.train.loss, label_smoothing=cfg.train.augment.label_smoothing
            ),
        )
    raise NotImplementedError(f"task '{task}' is not supported yet by raycv training")
