"""Semantic segmentation: metrics from a confusion matrix, the losses, and per-class pixel counts.

Conventions: label maps hold one class index per pixel, ``0 .. K-1``; pixels labelled :data:`IGNORE_INDEX`
(255, the VOC/Cityscapes "void") count nowhere: not in the metrics, not in the losses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from raycv.data.formats import Dataset, read_masks
from raycv.data.images import decode_png_mask
from raycv.data.loader import Transform
from raycv.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_pair,
    normalize,
    per_band,
    resize_mask,
    to_tensor_resized,
)
from raycv.tasks.confusion import ConfusionEvaluator
from raycv.tasks.registry import MIXUP_IS_CLASSIFICATION_ONLY, StepContext, Task, register_task

IGNORE_INDEX = 255

LossKind = Literal["ce", "dice", "ce+dice"]
LOSS_KINDS: tuple[str, ...] = ("ce", "dice", "ce+dice")


def confusion_matrix(
    targets: torch.Tensor, preds: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """[K, K] int64 pixel counts; row = true class, column = predicted class.

    Args:
        targets: [N, H, W] integer label maps. Pixels equal to ``ignore_index``, or outside ``0 .. K-1``,
            are left out.
        preds: [N, H, W] integer predicted classes (the argmax of the logits), on the same device.
    """
    if targets.shape != preds.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} and preds {tuple(preds.shape)} differ in shape; "
            "resize the predictions to the mask size before counting."
        )
    t = targets.reshape(-1).to(torch.int64)
    p = preds.reshape(-1).to(torch.int64)
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    t, p = t[keep], p[keep]
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(
            f"preds hold classes {int(p.min())}..{int(p.max())} but num_classes={num_classes}; "
            "pass the argmax over the model's K output channels."
        )
    idx = t * num_classes + p
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """mIoU, per-class IoU, mean Dice and pixel accuracy from a confusion matrix summed over the whole set.

    IoU_k = TP / (TP + FP + FN) and Dice_k = 2TP / (2TP + FP + FN). The means run over the classes present in
    the targets or the predictions: a class absent from both has no defined IoU (``None`` in
    ``iou_per_class``) and is left out, while a class that is only predicted (or only true) counts with 0.

    Returns:
        ``{"miou": float, "iou_per_class": list[float | None] (K), "dice": float, "pixel_accuracy": float}``.
    """
    m = np.asarray(cm, dtype=np.float64)
    total = m.sum()
    tp = np.diag(m)
    union = m.sum(axis=0) + m.sum(axis=1)  # 2TP + FP + FN
    present = union > 0
    iou = np.divide(tp, union - tp, out=np.zeros_like(tp), where=present)
    dice = np.divide(2 * tp, union, out=np.zeros_like(tp), where=present)
    per_class = [float(v) if ok else None for v, ok in zip(iou, present, strict=True)]
    if not present.any():
        return {"miou": 0.0, "iou_per_class": per_class, "dice": 0.0, "pixel_accuracy": 0.0}
    return {
        "miou": float(iou[present].mean()),
        "iou_per_class": per_class,
        "dice": float(dice[present].mean()),
        "pixel_accuracy": float(tp.sum() / total),
    }


def _checked_targets(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets as int64 with ignored pixels set to 0, and the [N, H, W] mask of pixels that count."""
    if logits.ndim != 4 or targets.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match: expected logits "
            "[N, K, H, W] and targets [N, H, W]; upsample the logits to the mask size first."
        )
    k = logits.shape[1]
    t = targets.to(torch.int64)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= k))
    if bool(bad.any()):
        raise ValueError(
            f"targets hold class {int(t[bad][0])} but the model has {k} classes; "
            f"labels must be 0..{k - 1}, or {ignore_index} for pixels to ignore."
        )
    return torch.where(valid, t, torch.zeros_like(t)), valid


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1.0
) -> torch.Tensor:
    """Soft multi-class Dice loss, 1 - mean_k Dice_k, on softmax probabilities.

    Each class's soft Dice, (2 sum p*y + eps) / (sum p + sum y + eps), sums over every pixel of the batch
    (not per image), so a class missing from one image does not score 0 there. ``eps`` keeps a class that is
    neither true nor predicted in the batch at Dice 1 instead of 0/0.

    Args:
        logits: [N, K, H, W] raw scores.
        targets: [N, H, W] int labels, ``ignore_index`` for pixels that count nowhere.

    Returns:
        A scalar in [0, 1].
    """
    t, valid = _checked_targets(logits, targets, ignore_index)
    # float32 even under autocast: the sums run over millions of pixels
    probs = logits.float().softmax(dim=1)
    mask = valid.unsqueeze(1).to(probs.dtype)
    one_hot = F.one_hot(t, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype) * mask
    probs = probs * mask
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    cardinality = probs.sum(dims) + one_hot.sum(dims)
    return 1.0 - ((2.0 * intersection + eps) / (cardinality + eps)).mean()


def segmentation_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: LossKind,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Pixel-wise cross-entropy, soft Dice, or their sum.

    Args:
        logits: [N, K, H, W] raw scores.
        targets: [N, H, W] int labels, ``ignore_index`` for pixels that count nowhere.
        kind: ``"ce"``, ``"dice"`` or ``"ce+dice"`` (the unweighted sum).
        label_smoothing: Applies to the cross-entropy term only.

    Returns:
        A scalar. A batch whose pixels are all ignored gives 0 (still attached to the graph), not NaN.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"Unknown segmentation loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}.")
    _, valid = _checked_targets(logits, targets, ignore_index)
    if not bool(valid.any()):
        # cross_entropy's mean over zero pixels is NaN, which would poison the weights in one step
        return logits.sum() * 0.0
    if kind == "dice":
        return dice_loss(logits, targets, ignore_index=ignore_index)
    ce = F.cross_entropy(
        logits, targets.to(torch.int64), ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    return ce if kind == "ce" else ce + dice_loss(logits, targets, ignore_index=ignore_index)


def class_pixels(label_map: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """Pixel count of every class present in a label map, as ``{label, label_name, pixels}``, by label.

    Args:
        label_map: [H, W] uint8 class indices (a predicted mask).
        class_names: The K class names, indexed by label.
    """
    k = len(class_names)
    counts = np.bincount(np.asarray(label_map).ravel(), minlength=k)
    unnamed = np.flatnonzero(counts[k:])
    if unnamed.size:
        raise ValueError(
            f"label map holds class {int(unnamed[0]) + k} but only {k} class names were given; "
            "pass the names of all the model's classes."
        )
    return [
        {"label": int(c), "label_name": class_names[c], "pixels": int(counts[c])}
        for c in np.flatnonzero(counts)
    ]


CLASS_PIXELS_TYPE = pa.list_(
    pa.struct([("label", pa.int32()), ("label_name", pa.string()), ("pixels", pa.int64())])
)


class SemanticSegmentation(Task):
    """One class per pixel, from a masks dataset; mIoU, Dice and pixel accuracy."""

    name = "semantic_segmentation"
    formats = ("masks",)
    primary_metric = "miou"
    metrics = ("miou", "dice", "pixel_accuracy")
    image_fields = (
        pa.field("mask_png", pa.binary()),  # PNG of the uint8 label map at the original resolution
        pa.field("class_pixels", CLASS_PIXELS_TYPE),
    )
    label_maps = True
    annotator = "raycv.annotation.segmenter:Segmenter"

    def read_dataset(self, fmt: str, root: str, store: Any, num_classes: int | None) -> Dataset:
        return read_masks(root, store, num_classes)

    def load_target(self, sample: Any, fetch: Callable[[str], bytes]) -> np.ndarray:
        return decode_png_mask(fetch(sample.mask_uri), sample.mask_uri)

    def transforms(
        self, size_hw: tuple[int, int], augment: Any, bands: int = 3
    ) -> tuple[Transform, Transform]:
        mean, std = per_band(IMAGENET_MEAN, bands), per_band(IMAGENET_STD, bands)  # the card's normalization
        """Label maps get the image's geometric augmentations (nearest neighbour), never its colour ones."""

        def train_tf(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[Any, Any]:
            t, m = augment_pair(
                image,
                mask,
                size_hw,
                rng,
                hflip=augment.hflip,
                vflip=augment.vflip,
                rotate=augment.rotate,
                color_jitter=augment.color_jitter,
                crop_scale=augment.crop_scale,
            )
            return normalize(t, mean, std), m

        def eval_tf(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[Any, Any]:
            t = normalize(to_tensor_resized(image, size_hw), mean, std)
            return t, resize_mask(mask, size_hw)

        return train_tf, eval_tf

    def collate(self, items: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        masks = [torch.as_tensor(m) for _, m in items]
        return torch.stack([im for im, _ in items]), torch.stack(masks).to(torch.int64)

    def loss(self, model: nn.Module, images: Any, targets: Any, ctx: StepContext) -> torch.Tensor:
        kind: Any = ctx.loss
        return segmentation_loss(
            model(images), targets, kind=kind, label_smoothing=ctx.augment.label_smoothing
        )

    def evaluator(self, num_classes: int, device: Any) -> ConfusionEvaluator:
        def confusion(targets: torch.Tensor, preds: torch.Tensor, k: int) -> torch.Tensor:
            return confusion_matrix(targets, preds, k, ignore_index=IGNORE_INDEX)

        return ConfusionEvaluator(num_classes, confusion, metrics_from_confusion, device)

    def check_train_config(self, cfg: Any) -> str | None:
        return MIXUP_IS_CLASSIFICATION_ONLY if cfg.train.augment.mixup > 0 else None


SEMANTIC_SEGMENTATION = register_task(SemanticSegmentation())
