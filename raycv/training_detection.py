"""Detection and instance segmentation pieces of the training loop (the model computes its own losses).

Detectors follow torchvision's interface: in train mode ``model(images, targets)`` returns a dict of
losses; in eval mode a list of ``{boxes, scores, labels[, masks]}``. Labels inside the model are
1..K (0 is background); datasets and outputs use 0..K-1. Validation predictions of every rank are
gathered so COCO mAP is computed once over the whole validation set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raycv.config import TrainConfig
from raycv.data.formats import DetectionSample
from raycv.data.loader import BatchLoader
from raycv.training_common import GradientAccumulation, StepGuard, add_loss, batches_of, mean_loss

DETECTION_TASKS = ("detection", "instance_segmentation")


def sample_masks(sample: DetectionSample, height: int, width: int) -> np.ndarray | None:
    """[M, H, W] uint8 instance masks of a sample's COCO segmentations (polygons or RLE), or None."""
    if sample.segmentations is None:
        return None
    from pycocotools import mask as mask_utils

    masks = np.zeros((len(sample.labels), height, width), np.uint8)
    for i, seg in enumerate(sample.segmentations):
        if not seg:
            continue
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = {
                "size": seg["size"],
                "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"],
            }
        masks[i] = mask_utils.decode(rle)
    return masks


def make_detection_transforms(cfg: TrainConfig) -> tuple[Any, Any]:
    """(image, DetectionSample, rng) -> (image [3, s, s] float 0..1, target dict with 1-based labels)."""
    from raycv.tasks.detection import augment_detection

    size = cfg.data.size_hw[0]
    aug = cfg.train.augment

    def build(train: bool) -> Any:
        def tf(
            image: np.ndarray, sample: DetectionSample, rng: np.random.Generator
        ) -> tuple[torch.Tensor, Any]:
            h, w = image.shape[:2]
            boxes = np.asarray(sample.boxes, np.float32).reshape(-1, 4)
            if sample.normalized:
                boxes = boxes * np.array([w, h, w, h], np.float32)
            labels = np.asarray(sample.labels, np.int64) + 1
            masks = sample_masks(sample, h, w) if cfg.task == "instance_segmentation" else None
            return augment_detection(
                image,
                boxes,
                labels,
                masks,
                rng,
                size=size,
                hflip=aug.hflip if train else 0.0,
                scale_jitter=(0.75, 1.25) if train and aug.crop_scale < 1 else (1.0, 1.0),
                color_jitter=aug.color_jitter if train else 0.0,
            )

        return tf

    return build(True), build(False)


def train_epoch_detection(
    model: nn.Module,
    loader: BatchLoader,
    indices: list[int],
    opt: Any,
    scaler: Any,
    autocast: Any,
    device: Any,
    seed: int,
    grad_accum_steps: int = 1,
    *,
    clip_grad_norm: float | None = None,
    guard: StepGuard | None = None,
) -> float:
    """One epoch of a detector's own losses; the mean finite loss over all ranks (NaN if none was finite).

    ``guard`` sets the lr before each step and counts the skipped (NaN/inf) ones; the epoch ends early when
    it says the run ``diverged`` (every rank alike).
    """
    model.train()
    total = torch.zeros(2, dtype=torch.float64)
    n = batches_of(indices, loader.batch_size)
    acc = GradientAccumulation(
        model, opt, scaler, grad_accum_steps, n, clip_grad_norm=clip_grad_norm, guard=guard
    )
    for i, (images, targets) in enumerate(loader.iterate(indices, seed=seed)):
        imgs = [im.to(device) for im in images]
        tgts = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with acc.window(i):
            with autocast:
                losses = model(imgs, tgts)
                loss = sum(losses.values())
            acc.backward(i, loss)  # type: ignore[arg-type]
        add_loss(total, loss, len(imgs))  # type: ignore[arg-type]
        if getattr(guard, "diverged", False):
            break
    return mean_loss(total)


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, loader: BatchLoader, indices: list[int], task: str, num_classes: int, device: Any
) -> dict[str, float]:
    """COCO ``map`` and ``map_50`` (and ``mask_map``) over the validation images of every rank."""
    from raycv.tasks.detection import coco_metrics

    model.eval()
    preds: list[dict[str, Any]] = []
    truths: list[dict[str, Any]] = []
    for images, targets in loader.iterate(indices):
        for out, t in zip(model([im.to(device) for im in images]), targets, strict=True):
            preds.append({k: v.cpu() for k, v in out.items()})
            truths.append({k: v.cpu() for k, v in t.items()})
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (preds, truths))
        preds = [p for ps, _ in gathered for p in ps]
        truths = [t for _, ts in gathered for t in ts]
    metrics = coco_metrics(preds, truths, num_classes=num_classes, iou_type="bbox")
    if task == "instance_segmentation":
        metrics["mask_map"] = coco_metrics(preds, truths, num_classes=num_classes, iou_type="segm")["map"]
    return metrics
