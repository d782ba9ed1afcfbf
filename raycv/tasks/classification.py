"""Classification: metrics from a confusion matrix, the loss, and prediction post-processing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from raycv.data.formats import Dataset, read_imagefolder
from raycv.data.loader import Transform
from raycv.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, per_band, to_tensor_resized
from raycv.data.transforms import augment as augment_image
from raycv.tasks.confusion import ConfusionEvaluator
from raycv.tasks.registry import LOSS_IS_SEGMENTATION_ONLY, StepContext, Task, register_task


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] int64 counts; row = true class, column = predicted class."""
    idx = targets.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision, recall, F1 from a confusion matrix summed over the whole set.

    Classes absent from both targets and predictions are left out of the macro averages; a class that
    is predicted but never true (or the reverse) counts with 0 for the undefined ratio, as scikit-learn does.
    """
    m = np.asarray(cm, dtype=np.float64)
    total = m.sum()
    tp = np.diag(m)
    predicted = m.sum(axis=0)
    actual = m.sum(axis=1)
    present = (predicted + actual) > 0
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    if not present.any():
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
    }


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy for hard labels [N] (int64) or mixed soft labels [N, K] (from mixup)."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    k = logits.shape[1]
    soft = targets * (1.0 - label_smoothing) + label_smoothing / k
    return torch.sum(-soft * F.log_softmax(logits, dim=1), dim=1).mean()


def mixup(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): convex combinations of image pairs and of their one-hot labels.

    Args:
        images: [N, C, H, W] float.
        labels: [N] int64.
        alpha: Beta(alpha, alpha) concentration; 0 returns the inputs with one-hot labels.

    Returns:
        The mixed images [N, C, H, W] and soft labels [N, K].
    """
    one_hot = F.one_hot(labels, num_classes).to(images.dtype)
    if alpha <= 0:
        return images, one_hot
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(images.shape[0])).to(images.device)
    return lam * images + (1 - lam) * images[perm], lam * one_hot + (1 - lam) * one_hot[perm]


def topk_rows(probs: np.ndarray, class_names: list[str], k: int) -> list[list[dict[str, Any]]]:
    """Per image, the ``k`` most likely classes as ``{label, label_name, score}`` dicts, best first.

    Args:
        probs: [N, K] float softmax probabilities.
    """
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1)[:, :k]
    return [
        [{"label": int(c), "label_name": class_names[c], "score": float(p[c])} for c in row]
        for p, row in zip(probs, order, strict=True)
    ]


TOPK_TYPE = pa.list_(pa.struct([("label", pa.int32()), ("label_name", pa.string()), ("score", pa.float32())]))


class Classification(Task):
    """One label per image, from an imagefolder dataset; accuracy and macro precision/recall/F1."""

    name = "classification"
    formats = ("imagefolder",)
    primary_metric = "accuracy"
    metrics = ("accuracy", "precision", "recall", "f1")
    image_fields = (
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("topk", TOPK_TYPE),
    )
    image_labels = True
    export_formats = ()  # no boxes, masks or shapes: OUTPUT/images is the export
    decode_at_size = True
    annotator = "raycv.annotation.classifier:Classifier"

    def read_dataset(self, fmt: str, root: str, store: Any, num_classes: int | None) -> Dataset:
        return read_imagefolder(root, store)

    def transforms(
        self, size_hw: tuple[int, int], augment: Any, bands: int = 3
    ) -> tuple[Transform, Transform]:
        mean, std = per_band(IMAGENET_MEAN, bands), per_band(IMAGENET_STD, bands)  # the card's normalization

        def train_tf(image: np.ndarray, label: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
            t = augment_image(
                to_tensor_resized(image, size_hw),
                rng,
                hflip=augment.hflip,
                vflip=augment.vflip,
                rotate=augment.rotate,
                color_jitter=augment.color_jitter,
            )
            return normalize(t, mean, std), label

        def eval_tf(image: np.ndarray, label: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
            return normalize(to_tensor_resized(image, size_hw), mean, std), label

        return train_tf, eval_tf

    def collate(self, items: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([im for im, _ in items]), torch.tensor([t for _, t in items], dtype=torch.int64)

    def loss(self, model: nn.Module, images: Any, targets: Any, ctx: StepContext) -> torch.Tensor:
        if ctx.augment.mixup > 0:
            images, targets = mixup(images, targets, ctx.num_classes, ctx.augment.mixup, ctx.rng)
        return soft_cross_entropy(model(images), targets, ctx.augment.label_smoothing)

    def evaluator(self, num_classes: int, device: Any) -> ConfusionEvaluator:
        return ConfusionEvaluator(
            num_classes, confusion_matrix, metrics_from_confusion, device, card_confusion=True
        )

    def check_train_config(self, cfg: Any) -> str | None:
        if cfg.train.loss != "ce":
            return LOSS_IS_SEGMENTATION_ONLY
        if cfg.train.augment.crop_scale < 1:
            return "train.augment.crop_scale applies to segmentation and detection only; set it to 1"
        return None


CLASSIFICATION = register_task(Classification())
