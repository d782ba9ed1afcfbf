"""Detection and instance segmentation: COCO metrics, RLE masks, merging tiled detections, augmentation.

Conventions: boxes are ``[N, 4]`` float ``(x1, y1, x2, y2)`` in pixels of the image they were predicted on;
labels are ``1 .. K`` (0 is the background of torchvision's detectors, see :mod:`raycv.models.detection`);
masks are COCO compressed RLE (``size = [h, w]``, ``counts`` a str) when stored, as in the ``objects`` table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from raycv.data.formats import DetectionDataset, DetectionSample, read_coco, read_yolo
from raycv.data.loader import Transform
from raycv.tasks.coco import coco_metrics
from raycv.tasks.registry import (
    LOSS_IS_SEGMENTATION_ONLY,
    MIXUP_IS_CLASSIFICATION_ONLY,
    STAGED_OBJECTS,
    StepContext,
    Task,
    register_task,
)

# -- Augmentation ----------------------------------------------------------------------------------------------


def augment_detection(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None,
    rng: np.random.Generator,
    *,
    size: int,
    hflip: bool | float = True,
    scale_jitter: tuple[float, float] = (1.0, 1.0),
    color_jitter: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Box-aware training augmentation: letterbox to a ``size`` square with scale jitter, flip, colour.

    The longer side is resized to ``size * s`` with ``s ~ U(scale_jitter)`` and the result is placed at the
    top left of a ``size`` square (zero padding) or, when larger, cropped at a random offset. A horizontal
    flip follows with probability ``hflip`` (``True`` = 0.5, ``False`` = never). Brightness, contrast and
    saturation factors drawn from ``U(1 - color_jitter, 1 + color_jitter)`` change the image only. Boxes and masks follow every geometric
    step; boxes are clipped to the square and those left under 1 px wide or high are dropped, with their
    labels and masks.

    Args:
        image: [H, W, 3] uint8 RGB.
        boxes: [M, 4] (x1, y1, x2, y2) in pixels of ``image``.
        labels: [M] class labels, passed through unchanged.
        masks: [M, H, W] bool/uint8 instance masks, or ``None``.
        rng: The only source of randomness.
        size: Side of the output square.

    Returns:
        ``image`` [3, size, size] float32 in 0..1 and the target ``{"boxes": [K, 4] float32, "labels": [K]
        int64[, "masks": [K, size, size] uint8]}``, the torchvision detectors' format.
    """
    height, width = image.shape[:2]
    scale = size / max(height, width) * float(rng.uniform(*scale_jitter))
    new_h, new_w = max(round(height * scale), 1), max(round(width * scale), 1)
    # The crop offset when the resized image is larger than the square; 0 (letterbox) otherwise.
    oy, ox = int(rng.integers(0, max(new_h - size, 0) + 1)), int(rng.integers(0, max(new_w - size, 0) + 1))
    # True means the usual 0.5; a float is the probability itself (the config's train.augment.hflip).
    flip_probability = 0.5 if hflip is True else float(hflip)
    flip = bool(rng.random() < flip_probability)

    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255
    pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    out_image = _place(pixels[0].clamp(0, 1), oy, ox, size, flip)
    if color_jitter > 0:
        out_image = _color_jitter(out_image, rng, color_jitter)

    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
    b -= torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
    b = b.clamp(0, size)
    if flip:
        b = torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], dim=1)
    keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
    target = {"boxes": b[keep], "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1)[keep]}
    if masks is not None:
        m = torch.as_tensor(np.asarray(masks, dtype=np.uint8)).reshape(-1, height, width)
        m = F.interpolate(m[:, None].float(), size=(new_h, new_w), mode="nearest")[:, 0]
        target["masks"] = _place(m, oy, ox, size, flip).to(torch.uint8)[keep]
    return out_image, target


def _place(planes: Tensor, oy: int, ox: int, size: int, flip: bool) -> Tensor:
    """[C, h, w] -> [C, size, size]: crop from (oy, ox), pad zeros bottom/right, optionally flip columns."""
    cropped = planes[:, oy : oy + size, ox : ox + size]
    out = planes.new_zeros((planes.shape[0], size, size))
    out[:, : cropped.shape[1], : cropped.shape[2]] = cropped
    return out.flip(-1) if flip else out


def _color_jitter(image: Tensor, rng: np.random.Generator, strength: float) -> Tensor:
    from torchvision.transforms.v2 import functional as TF  # here: see raycv.data.transforms

    low, high = max(0.0, 1 - strength), 1 + strength
    image = TF.adjust_brightness(image, float(rng.uniform(low, high)))
    image = TF.adjust_contrast(image, float(rng.uniform(low, high)))
    return TF.adjust_saturation(image, float(rng.uniform(low, high))).clamp(0, 1)


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
            counts = seg["counts"]
            rle = {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
        masks[i] = mask_utils.decode(rle)
    return masks


class CocoEvaluator:
    """Validation predictions of every rank gathered, so COCO mAP is computed once over the whole set."""

    def __init__(self, num_classes: int, device: Any, *, masks: bool) -> None:
        self.k, self.device, self.masks = num_classes, device, masks
        self.preds: list[dict[str, Any]] = []
        self.truths: list[dict[str, Any]] = []

    def update(self, model: nn.Module, images: Any, targets: Any) -> None:
        for out, t in zip(model([im.to(self.device) for im in images]), targets, strict=True):
            self.preds.append({k: v.cpu() for k, v in out.items()})
            self.truths.append({k: v.cpu() for k, v in t.items()})

    def compute(self) -> tuple[dict[str, Any], dict[str, Any]]:
        preds, truths = self.preds, self.truths
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (preds, truths))
            preds = [p for ps, _ in gathered for p in ps]
            truths = [t for _, ts in gathered for t in ts]
        metrics = coco_metrics(preds, truths, num_classes=self.k, iou_type="bbox")
        if self.masks:
            metrics["mask_map"] = coco_metrics(preds, truths, num_classes=self.k, iou_type="segm")["map"]
        return metrics, {}


class Detection(Task):
    """Boxes with labels, from a COCO or YOLO dataset; COCO mAP. Detectors follow torchvision's interface:
    in train mode ``model(images, targets)`` returns a dict of losses, in eval mode a list of ``{boxes,
    scores, labels[, masks]}``. Labels inside the model are 1..K (0 is background); datasets and outputs
    use 0..K-1."""

    name = "detection"
    formats: ClassVar[tuple[str, ...]] = ("coco", "yolo")
    primary_metric = "map"
    metrics: ClassVar[tuple[str, ...]] = ("map", "map_50")
    image_fields = STAGED_OBJECTS
    objects = True
    unit_pixels = True
    export_formats = ("coco", "yolo", "geojson")
    # torchvision's detection references warm up linearly; without it SGD diverges in a few steps
    warmup_epochs = 1.0
    clip_grad_norm = 10.0
    find_unused_parameters = True  # detectors skip some heads on images without objects
    annotator = "raycv.annotation.detector:Detector"

    def read_dataset(self, fmt: str, root: str, store: Any, num_classes: int | None) -> DetectionDataset:
        return read_coco(root, store) if fmt == "coco" else read_yolo(root, store)

    def load_target(self, sample: Any, fetch: Callable[[str], bytes]) -> DetectionSample:
        return sample  # the transform reads boxes, labels and masks from the sample

    def transforms(
        self, size_hw: tuple[int, int], augment: Any, bands: int = 3
    ) -> tuple[Transform, Transform]:
        """(image, sample, rng) -> (image [3, s, s] float 0..1, target dict with 1-based labels)."""

        def build(train: bool) -> Transform:
            def tf(image: np.ndarray, sample: DetectionSample, rng: np.random.Generator) -> tuple[Any, Any]:
                h, w = image.shape[:2]
                boxes = np.asarray(sample.boxes, np.float32).reshape(-1, 4)
                if sample.normalized:
                    boxes = boxes * np.array([w, h, w, h], np.float32)
                return augment_detection(
                    image,
                    boxes,
                    np.asarray(sample.labels, np.int64) + 1,
                    sample_masks(sample, h, w) if self.instance_masks else None,
                    rng,
                    size=size_hw[0],
                    hflip=augment.hflip if train else 0.0,
                    scale_jitter=(0.75, 1.25) if train and augment.crop_scale < 1 else (1.0, 1.0),
                    color_jitter=augment.color_jitter if train else 0.0,
                )

            return tf

        return build(True), build(False)

    def collate(self, items: list[tuple[Any, Any]]) -> tuple[torch.Tensor, list[dict[str, Tensor]]]:
        return torch.stack([im for im, _ in items]), [t for _, t in items]

    def loss(self, model: nn.Module, images: Any, targets: Any, ctx: StepContext) -> torch.Tensor:
        losses = model(list(images), targets)
        return sum(losses.values())  # type: ignore[return-value]

    def evaluator(self, num_classes: int, device: Any) -> CocoEvaluator:
        return CocoEvaluator(num_classes, device, masks=self.instance_masks)

    def check_train_config(self, cfg: Any) -> str | None:
        if cfg.train.loss != "ce":
            return LOSS_IS_SEGMENTATION_ONLY
        if cfg.train.augment.mixup > 0:
            return MIXUP_IS_CLASSIFICATION_ONLY
        return None


class InstanceSegmentation(Detection):
    """Detection with a mask per object (COCO polygons or RLE); also ``mask_map``."""

    name = "instance_segmentation"
    formats = ("coco",)
    metrics = ("map", "map_50", "mask_map")
    instance_masks = True


DETECTION = register_task(Detection())
INSTANCE_SEGMENTATION = register_task(InstanceSegmentation())
