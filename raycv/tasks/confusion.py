"""Validation scored from one [K, K] confusion matrix of argmax predictions, summed over every rank.

Classification compares one label per image, semantic segmentation one per pixel: both argmax over dim 1,
and the task's metrics are computed exactly from the summed matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Confusion = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (targets, preds, K) -> [K, K]


class ConfusionEvaluator:
    """Accumulates this rank's confusion matrix; :meth:`compute` sums it over the ranks first.

    Args:
        num_classes: K.
        confusion: the task's (targets, preds, K) -> [K, K] counts.
        metrics: the task's metrics of a summed matrix.
        device: where the model runs.
        card_confusion: whether the model card keeps the matrix (classification's confusion.png).
    """

    def __init__(
        self,
        num_classes: int,
        confusion: Confusion,
        metrics: Callable[[Any], dict[str, Any]],
        device: Any,
        *,
        card_confusion: bool = False,
    ) -> None:
        self.k, self.confusion, self.metrics, self.device = num_classes, confusion, metrics, device
        self.card_confusion = card_confusion
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> None:
        preds = model(images.to(self.device)).argmax(dim=1).cpu()
        self.cm += self.confusion(targets.cpu(), preds, self.k)

    def compute(self) -> tuple[dict[str, Any], dict[str, Any]]:
        cm = self.cm.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(cm)
        return self.metrics(cm), {"confusion": cm.tolist()} if self.card_confusion else {}
