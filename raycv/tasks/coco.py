"""COCO mAP (``map`` = mAP@[.5:.95], ``map_50``) of boxes or instance masks, with faster-coco-eval.

Conventions as in :mod:`raycv.tasks.detection`: boxes ``(x1, y1, x2, y2)`` in pixels, labels ``1 .. K``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from torch import Tensor

from raycv.data.rle import encode_rle

IouType = Literal["bbox", "segm"]


def coco_metrics(
    predictions: Sequence[dict[str, Any]],
    targets: Sequence[dict[str, Any]],
    *,
    num_classes: int,
    iou_type: IouType = "bbox",
) -> dict[str, float]:
    """COCO AP of a set of images, with faster-coco-eval (pycocotools' algorithm, in C++).

    Image ``i`` of the set is ``predictions[i]`` against ``targets[i]``; images without ground truth objects
    count too (their detections are false positives). Category ids are the labels ``1 .. num_classes``.

    Args:
        predictions: Per image ``boxes`` [N, 4] (x1, y1, x2, y2), ``scores`` [N], ``labels`` [N] in
            ``1 .. num_classes``; for ``"segm"`` also ``masks`` [N, 1, H, W] probabilities (kept where >= 0.5)
            or [N, H, W] bool. Tensors or arrays.
        targets: Per image ``boxes`` [M, 4], ``labels`` [M]; for ``"segm"`` also ``masks`` [M, H, W] bool/uint8.
        num_classes: K, the number of object classes.
        iou_type: ``"bbox"`` compares boxes, ``"segm"`` masks.

    Returns:
        ``{"map": AP@[.5:.95], "map_50": AP@.5}``; 0.0 for both when nothing is evaluable (no ground truth).
    """
    if len(predictions) != len(targets):
        raise ValueError(
            f"Got {len(predictions)} predictions for {len(targets)} targets; pass one per image."
        )
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}.")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    for image_id, (prediction, target) in enumerate(zip(predictions, targets, strict=True)):
        height, width = _image_size(prediction, target, iou_type)
        images.append({"id": image_id, "height": height, "width": width})
        for obj in _objects(target, iou_type, threshold=None):
            annotations.append({**obj, "id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0})
        for obj in _objects(prediction, iou_type, threshold=0.5):
            detections.append({**obj, "image_id": image_id})
    if not annotations or not detections:
        return {"map": 0.0, "map_50": 0.0}
    ground_truth = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k} for k in range(1, num_classes + 1)],
    }
    return _evaluate(ground_truth, detections, iou_type)


def _evaluate(
    ground_truth: dict[str, Any], detections: list[dict[str, Any]], iou_type: str
) -> dict[str, float]:
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(ground_truth)
    coco_dt = coco_gt.loadRes(detections)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=lambda *_: None)
    with contextlib.redirect_stdout(io.StringIO()):  # summarize() prints the table
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # -1 marks "no ground truth in this range": nothing evaluable counts as 0.
    return {"map": max(float(evaluator.stats[0]), 0.0), "map_50": max(float(evaluator.stats[1]), 0.0)}


def _image_size(prediction: dict[str, Any], target: dict[str, Any], iou_type: str) -> tuple[int, int]:
    for source in (target, prediction):
        masks = source.get("masks")
        if masks is not None and len(masks):
            return int(masks.shape[-2]), int(masks.shape[-1])
    if iou_type == "segm":
        return 1, 1  # no masks on this image: its size matters to no IoU
    boxes = np.concatenate(
        [_numpy(target["boxes"]).reshape(-1, 4), _numpy(prediction["boxes"]).reshape(-1, 4)]
    )
    return (
        (int(np.ceil(boxes[:, 3].max())) + 1, int(np.ceil(boxes[:, 2].max())) + 1) if len(boxes) else (1, 1)
    )


def _objects(source: dict[str, Any], iou_type: str, threshold: float | None) -> list[dict[str, Any]]:
    """COCO annotation dicts (bbox xywh, area, category_id[, score][, segmentation]) of one image."""
    boxes = _numpy(source["boxes"]).reshape(-1, 4).astype(np.float64)
    labels = _numpy(source["labels"]).reshape(-1)
    scores = _numpy(source["scores"]).reshape(-1) if threshold is not None else None
    masks = _binary_masks(source.get("masks"), threshold) if iou_type == "segm" else None
    if masks is not None and len(masks) != len(boxes):
        raise ValueError(f"Got {len(masks)} masks for {len(boxes)} boxes; pass one mask per object.")
    objects = []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        obj: dict[str, Any] = {
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": (x2 - x1) * (y2 - y1),
            "category_id": int(labels[i]),
        }
        if scores is not None:
            obj["score"] = float(scores[i])
        if masks is not None:
            size, counts = encode_rle(masks[i])
            obj["segmentation"] = {"size": size, "counts": counts}
            obj["area"] = float(masks[i].sum())
        objects.append(obj)
    return objects


def _binary_masks(masks: Any, threshold: float | None) -> np.ndarray:
    if masks is None:
        raise ValueError("iou_type='segm' needs 'masks' in every prediction and target.")
    array = _numpy(masks)
    if array.ndim == 4:  # [N, 1, H, W] from Mask R-CNN
        array = array[:, 0]
    if array.dtype == bool:
        return array
    return array >= threshold if threshold is not None and array.dtype.kind == "f" else array > 0


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
