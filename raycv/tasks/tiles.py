"""Detections of overlapping tiles merged into one image's: offsets, class-wise NMS, boxes cut by a tile edge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Window = tuple[int, int, int, int]  # (y0, x0, h, w), as raycv.annotation.tiling.tile_grid returns


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
    from torchvision.ops import batched_nms  # detection only: segmentation tiles never import torchvision

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
