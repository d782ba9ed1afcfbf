"""The classification and semantic segmentation pieces of the training loop: transforms, one epoch of
training (the task's loss from :mod:`raycv.tasks`) and the validation confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.train
import torch
from torch import nn

from raycv.config import TrainConfig
from raycv.data.loader import BatchLoader, Target, Transform
from raycv.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment,
    augment_pair,
    normalize,
    resize_mask,
    to_tensor_resized,
)
from raycv.tasks import TaskOps
from raycv.tasks import classification as cls_task
from raycv.training_common import GradientAccumulation, add_loss, batches_of, epoch_seed, mean_loss
from raycv.training_guard import clip_grad_norm_of


def make_transforms(cfg: TrainConfig) -> tuple[Transform, Transform]:
    """The train and eval transforms of ``cfg``: (image, target, rng) -> (normalised tensor, target).

    Label maps get the image's geometric augmentations (nearest neighbour) and never its colour ones.
    """
    size = cfg.data.size_hw
    aug = cfg.train.augment

    def train_tf(image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[torch.Tensor, Any]:
        if isinstance(target, np.ndarray):
            t, m = augment_pair(
                image,
                target,
                size,
                rng,
                hflip=aug.hflip,
                vflip=aug.vflip,
                rotate=aug.rotate,
                color_jitter=aug.color_jitter,
                crop_scale=aug.crop_scale,
            )
            return normalize(t, IMAGENET_MEAN, IMAGENET_STD), m
        t = augment(
            to_tensor_resized(image, size),
            rng,
            hflip=aug.hflip,
            vflip=aug.vflip,
            rotate=aug.rotate,
            color_jitter=aug.color_jitter,
        )
        return normalize(t, IMAGENET_MEAN, IMAGENET_STD), target

    def eval_tf(image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[torch.Tensor, Any]:
        t = normalize(to_tensor_resized(image, size), IMAGENET_MEAN, IMAGENET_STD)
        return t, resize_mask(target, size) if isinstance(target, np.ndarray) else target

    return train_tf, eval_tf


def _freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Keep the running statistics of frozen BatchNorm layers fixed: a frozen backbone stays as loaded."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters()
        ):
            m.eval()


def train_epoch(
    model, loader, indices, opt, scaler, autocast, cfg, ops, num_classes, epoch, device, guard
) -> float:  # type: ignore[no-untyped-def]
    """One epoch of classification or segmentation; the mean finite loss over all ranks (NaN if none)."""
    model.train()
    if cfg.model.freeze_backbone:
        _freeze_frozen_batchnorm(model)
    aug = cfg.train.augment
    rng = np.random.default_rng([cfg.train.seed, epoch, ray.train.get_context().get_world_rank()])
    total = torch.zeros(2, dtype=torch.float64)
    n = batches_of(indices, loader.batch_size)
    acc = GradientAccumulation(
        model, opt, scaler, cfg.train.grad_accum_steps, n, clip_grad_norm=clip_grad_norm_of(cfg), guard=guard
    )
    for i, (images, labels) in enumerate(loader.iterate(indices, seed=epoch_seed(cfg.train.seed, epoch))):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        targets: torch.Tensor = labels
        if aug.mixup > 0:
            images, targets = cls_task.mixup(images, labels, num_classes, aug.mixup, rng)
        with acc.window(i):
            with autocast:
                loss = ops.loss(model(images), targets, cfg)
            acc.backward(i, loss)
        add_loss(total, loss, len(labels))
        if guard.diverged:  # every rank agrees: the decision rests on all-reduced flags
            break
    return mean_loss(total)


@torch.no_grad()
def evaluate_confusion(
    model: nn.Module, loader: BatchLoader, indices: list[int], ops: TaskOps, num_classes: int, device: Any
) -> torch.Tensor:
    """The [K, K] confusion matrix of ``model``'s argmax predictions on ``indices`` (this rank's part).

    Classification compares one label per image, segmentation one per pixel: both argmax over dim 1.
    """
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, targets in loader.iterate(indices):
        preds = model(images.to(device)).argmax(dim=1).cpu()
        cm += ops.confusion(targets, preds, num_classes)
    return cm
