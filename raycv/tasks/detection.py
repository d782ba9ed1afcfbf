"""Detection and instance segmentation: COCO metrics, RLE masks, merging tiled detections, augmentation.

Conventions: boxes are ``[N, 4]`` float ``(x1, y1, x2, y2)`` in pixels of the image they were predicted on;
labels are ``1 .. K`` (0 is the background of torchvision's detectors, see :mod:`raycv.models.detection`);
masks are COCO compressed RLE (``size = [h, w]``, ``counts`` a str) when stored, as in the ``objects`` table.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms
from torchvision.transforms.v2 import functional as TF

from raycv.data.rle import encode_rle
from raycv.tasks.registry import Task, register_task

IouType = Literal["bbox", "segm"]
Window = tuple[int, int, int, int]  # (y0, x0, h, w), as raycv.annotation.tiling.tile_grid returns

# -- COCO metrics ----------------------------------------------------------------------------------------------


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


# -- Tiles -----------------------------------------------------------------------------------------------------


def tile_offsets_to_image(boxes: Tensor, x0: float, y0: float) -> Tensor:
    """[N, 4] boxes (x1, y1, x2, y2) in a tile's pixels moved to the pixels of the image the tile starts in at
    column ``x0``, row ``y0``."""
    return boxes + torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype, device=boxes.device)


def merge_tile_detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    iou_threshold: float = 0.5,
    *,
    windows: Sequence[Window] | None = None,
    tile_ids: Tensor | None = None,
    edge_margin: float = 2.0,
    ios_threshold: float | None = 0.5,
) -> Tensor:
    """Indices of the detections to keep after merging overlapping tiles, so each object is reported once.

    Three steps:

    1. Cut boxes out (only with ``windows`` and ``tile_ids``): a box within ``edge_margin`` px of an interior
       edge of its tile (one that is not on the image border) was probably cut by that edge. It is dropped
       when another tile holds the whole box at least ``edge_margin`` px away from that tile's interior edges:
       the overlap is then large enough for the neighbour to see the object whole (or at least further), and
       the neighbour reports it. A cut box that no other tile holds (an object larger than the overlap) is
       kept, since it is the best view there is.
    2. Class-aware NMS (:func:`torchvision.ops.batched_nms`) over all tiles, which removes the duplicates of
       objects that lie whole in two overlapping tiles.
    3. Containment (only with ``windows`` and ``tile_ids``, and ``ios_threshold`` not None): a box whose
       area lies more than ``ios_threshold`` inside a higher-scored box of the same class is dropped
       (intersection over the smaller box, the match metric SAHI uses to merge sliced predictions). This
       catches what step 1 cannot: a partial view of a cut object whose predicted box stops a few pixels
       short of the tile edge, which overlaps the whole box too little for NMS (IoU) yet lies inside it.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2) in IMAGE pixels (see :func:`tile_offsets_to_image`).
        scores: [N].
        labels: [N] classes; boxes of different classes never suppress each other.
        iou_threshold: NMS IoU above which the lower-scored box is dropped.
        windows: The tiles, ``(y0, x0, h, w)`` in image pixels as :func:`raycv.annotation.tiling.tile_grid` gives them.
        tile_ids: [N] index into ``windows`` of the tile each box was predicted on.
        edge_margin: Distance in px from an interior tile edge within which a box counts as cut.
        ios_threshold: Intersection over the smaller box above which step 3 drops the lower-scored box.

    Returns:
        [K] int64 indices into the inputs, by decreasing score.
    """
    candidates = torch.arange(len(boxes), device=boxes.device)
    if windows is not None and tile_ids is not None and len(boxes):
        candidates = candidates[~_cut_by_tile_edge(boxes, tile_ids, windows, edge_margin)]
    keep = candidates[
        batched_nms(boxes[candidates].float(), scores[candidates].float(), labels[candidates], iou_threshold)
    ]
    if windows is not None and tile_ids is not None and ios_threshold is not None and len(keep) > 1:
        keep = keep[~_contained(boxes[keep].float(), labels[keep], ios_threshold)]
    return keep


def _contained(boxes: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """[N] bool for boxes sorted by decreasing score: lies > threshold inside a kept, better box of its class."""
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    ios = inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1e-6)
    overlapping = (ios > threshold) & (labels[:, None] == labels[None, :])
    dropped = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for i in range(len(boxes)):
        if not dropped[i]:
            later = overlapping[i].clone()
            later[: i + 1] = False
            dropped |= later
    return dropped


def _cut_by_tile_edge(boxes: Tensor, tile_ids: Tensor, windows: Sequence[Window], margin: float) -> Tensor:
    """[N] bool: the box touches an interior edge of its own tile and another tile holds it clear of edges."""
    tiles = torch.tensor(
        [[x0, y0, x0 + w, y0 + h] for y0, x0, h, w in windows], dtype=torch.float64, device=boxes.device
    )
    image_x2, image_y2 = tiles[:, 2].max(), tiles[:, 3].max()
    # Interior edges: margin px inwards from each tile side, or +-inf where the side is on the image border.
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=boxes.device)
    inner = torch.stack(
        [
            torch.where(tiles[:, 0] > 0, tiles[:, 0] + margin, -inf),
            torch.where(tiles[:, 1] > 0, tiles[:, 1] + margin, -inf),
            torch.where(tiles[:, 2] < image_x2, tiles[:, 2] - margin, inf),
            torch.where(tiles[:, 3] < image_y2, tiles[:, 3] - margin, inf),
        ],
        dim=1,
    )
    b = boxes.to(torch.float64)
    # clear[i, t]: box i lies in tile t at least margin px from t's interior edges.
    clear = (
        (b[:, None, 0] >= inner[None, :, 0])
        & (b[:, None, 1] >= inner[None, :, 1])
        & (b[:, None, 2] <= inner[None, :, 2])
        & (b[:, None, 3] <= inner[None, :, 3])
    )
    own = tile_ids.to(torch.int64)
    touches_edge = ~clear[torch.arange(len(b), device=b.device), own]
    clear[torch.arange(len(b), device=b.device), own] = False
    return touches_edge & clear.any(dim=1)


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
    low, high = max(0.0, 1 - strength), 1 + strength
    image = TF.adjust_brightness(image, float(rng.uniform(low, high)))
    image = TF.adjust_contrast(image, float(rng.uniform(low, high)))
    return TF.adjust_saturation(image, float(rng.uniform(low, high))).clamp(0, 1)


OBJECT_FIELDS = (
    pa.field("label", pa.int32()),
    pa.field("label_name", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in original-image pixels
    pa.field("mask_rle_size", pa.list_(pa.int32())),  # [h, w]; null for plain detection
    pa.field("mask_rle_counts", pa.string()),  # COCO compressed RLE; null for plain detection
)
OBJECTS_TYPE = pa.list_(pa.struct(list(OBJECT_FIELDS)))
_STAGED_OBJECTS = (pa.field("objects", OBJECTS_TYPE),)  # staged only: split into OUTPUT/objects

DETECTION = register_task(
    Task(
        name="detection",
        formats=("coco", "yolo"),
        primary_metric="map",
        metrics=("map", "map_50"),
        image_fields=_STAGED_OBJECTS,
        objects=True,
        unit_pixels=True,
        export_formats=("coco", "yolo", "geojson"),
    )
)
INSTANCE_SEGMENTATION = register_task(
    Task(
        name="instance_segmentation",
        formats=("coco",),
        primary_metric="map",
        metrics=("map", "map_50", "mask_map"),
        image_fields=_STAGED_OBJECTS,
        objects=True,
        instance_masks=True,
        unit_pixels=True,
        export_formats=("coco", "yolo", "geojson"),
    )
)
