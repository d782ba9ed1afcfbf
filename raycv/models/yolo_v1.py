"""YOLOv1 (Redmon et al. 2016) as in the seeds: an S x S grid, B boxes per cell, the sum-squared loss with lambda_coord, lambda_noobj and square-root width/height."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision import ops

from raycv.models.registry import register_model
from raycv.models.yolo import EXPORT_NOTES, MAX_STRIDE, YoloDetector, conv

# -- YOLOv1 --------------------------------------------------------------------------------------------------


class YoloV1(YoloDetector):
    """YOLOv1 (Redmon et al., 2016): one S x S grid, B boxes and one class distribution per cell.

    A Darknet-like conv backbone (stride 32, LeakyReLU) is pooled to S x S and two fully connected layers
    predict ``[N, S, S, 5B + K]``: per box ``(x, y, w, h, c)`` through a sigmoid (x, y: the box centre
    relative to its cell; w, h: relative to the image; c: confidence), then K class probabilities (softmax).
    At inference a box's score for class k is ``c * p(k)``; the loss is :func:`yolo_v1_loss`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        grid_size: int,
        boxes_per_cell: int,
        width: int,
        lambda_coord: float,
        lambda_noobj: float,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        self.grid_size, self.boxes_per_cell = grid_size, boxes_per_cell
        self.lambda_coord, self.lambda_noobj = lambda_coord, lambda_noobj
        widths = [width * 2**i for i in range(5)]
        leaky = _LeakyReLU
        pairs = zip([in_channels, *widths[:-1]], widths, strict=True)
        layers = [conv(c_in, c_out, 3, 2, leaky) for c_in, c_out in pairs]
        self.backbone = nn.Sequential(*layers, conv(widths[-1], widths[-1], 3, 1, leaky))
        outputs = 5 * boxes_per_cell + num_classes
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(grid_size),
            conv(widths[-1], 2 * width, 1, 1, leaky),  # fewer inputs to the fully connected layer
            nn.Flatten(),
            nn.Linear(2 * width * grid_size**2, 512),
            nn.LeakyReLU(0.1),
            nn.Dropout(0.5),
            nn.Linear(512, grid_size**2 * outputs),
        )

    def grid_predictions(self, batch: Tensor) -> Tensor:
        """``[N, S, S, 5B + K]`` after the activations (see the class docstring)."""
        s, b = self.grid_size, self.boxes_per_cell
        raw = self.head(self.backbone(batch)).view(len(batch), s, s, -1)
        return torch.cat([raw[..., : 5 * b].sigmoid(), raw[..., 5 * b :].softmax(-1)], dim=-1)

    def compute_loss(self, batch: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return yolo_v1_loss(
            self.grid_predictions(batch),
            targets,
            image_size=self.image_size,
            boxes_per_cell=self.boxes_per_cell,
            lambda_coord=self.lambda_coord,
            lambda_noobj=self.lambda_noobj,
        )

    def predict(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        predictions = self.grid_predictions(batch)
        b = self.boxes_per_cell
        boxes = _v1_boxes(predictions[..., : 5 * b].unflatten(-1, (b, 5)), self.image_size)  # [N, S, S, B, 4]
        confidence = predictions[..., 4 : 5 * b : 5]  # [N, S, S, B]
        scores = confidence[..., None] * predictions[..., None, 5 * b :]  # [N, S, S, B, K]
        return boxes.flatten(1, 3), scores.flatten(1, 3)


class _LeakyReLU(nn.LeakyReLU):
    def __init__(self) -> None:
        super().__init__(0.1)


def _v1_boxes(boxes: Tensor, image_size: int) -> Tensor:
    """Boxes [..., S, S, B, >=4] as (x, y, w, h) cell/image-relative -> [..., S, S, B, 4] xyxy pixels."""
    s = boxes.shape[-3]
    cells = torch.arange(s, device=boxes.device, dtype=boxes.dtype)
    cx = (cells.view(1, s, 1) + boxes[..., 0]) / s  # the column is the last grid axis
    cy = (cells.view(s, 1, 1) + boxes[..., 1]) / s
    w, h = boxes[..., 2], boxes[..., 3]
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * image_size


def yolo_v1_loss(
    predictions: Tensor,
    targets: list[dict[str, Tensor]],
    *,
    image_size: int,
    boxes_per_cell: int,
    lambda_coord: float = 5.0,
    lambda_noobj: float = 0.5,
) -> dict[str, Tensor]:
    r"""The YOLOv1 sum-squared loss, averaged over the images of the batch.

    .. math::

        L = \lambda_{coord} \sum_i \sum_j 1^{obj}_{ij} [(x_i - \hat x_{ij})^2 + (y_i - \hat y_{ij})^2
              + (\sqrt{w_i} - \sqrt{\hat w_{ij}})^2 + (\sqrt{h_i} - \sqrt{\hat h_{ij}})^2]
          + \sum_i \sum_j 1^{obj}_{ij} (C_{ij} - \hat C_{ij})^2
          + \lambda_{noobj} \sum_i \sum_j (1 - 1^{obj}_{ij}) \hat C_{ij}^2
          + \sum_i 1^{obj}_i \sum_k (p_i(k) - \hat p_i(k))^2

    over the S x S cells i and the B boxes j of each cell. ``1^{obj}_i`` is 1 when the centre of an object
    lies in cell i (at most one object per cell: the first one listed wins); ``1^{obj}_{ij}`` is 1 for the
    box j of that cell whose prediction has the largest IoU with the object (it is "responsible");
    ``C_{ij}`` is that IoU (no gradient); x, y are the object's centre relative to its cell, w, h its size
    relative to the image; ``p_i(k)`` is 1 for the object's class.

    Args:
        predictions: [N, S, S, 5B + K] after the activations: per box (x, y, w, h, C), then K class
            probabilities; the last grid axis is the column (x).
        targets: Per image, ``boxes`` [M, 4] (x1, y1, x2, y2) in pixels of the ``image_size`` square and
            ``labels`` [M] in 1..K.
        image_size: Side of the square image, in pixels.
        boxes_per_cell: B.
        lambda_coord, lambda_noobj: The weights of the box and of the no-object confidence terms.

    Returns:
        ``loss_box`` (the weighted coordinate terms), ``loss_obj``, ``loss_noobj`` (weighted), ``loss_cls``.
    """
    n, s = predictions.shape[:2]
    b = boxes_per_cell
    boxes = predictions[..., : 5 * b].unflatten(-1, (b, 5))  # [N, S, S, B, 5]
    probs = predictions[..., 5 * b :]
    pixel_boxes = _v1_boxes(boxes.detach(), image_size)
    responsible = torch.zeros(boxes.shape[:-1], dtype=torch.bool, device=predictions.device)
    target_xywh = torch.zeros((n, s, s, 4), dtype=predictions.dtype, device=predictions.device)
    target_iou = torch.zeros(boxes.shape[:-1], dtype=predictions.dtype, device=predictions.device)
    target_cls = torch.zeros_like(probs)
    occupied = torch.zeros((n, s, s), dtype=torch.bool, device=predictions.device)
    for i, target in enumerate(targets):
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            cx, cy = (box[0] + box[2]) / 2 / image_size * s, (box[1] + box[3]) / 2 / image_size * s
            col, row = min(max(int(cx), 0), s - 1), min(max(int(cy), 0), s - 1)
            if occupied[i, row, col]:
                continue
            ious = ops.box_iou(pixel_boxes[i, row, col], torch.tensor([box]).to(pixel_boxes))[:, 0]
            j = int(ious.argmax())
            occupied[i, row, col] = True
            responsible[i, row, col, j] = True
            target_iou[i, row, col, j] = ious[j]
            target_xywh[i, row, col] = torch.tensor(
                [cx - col, cy - row, (box[2] - box[0]) / image_size, (box[3] - box[1]) / image_size]
            )
            target_cls[i, row, col, int(label) - 1] = 1.0
    chosen = boxes[responsible]  # [P, 5], in the same order as the cells of `occupied`
    goal = target_xywh[occupied]
    coord = (chosen[:, :2] - goal[:, :2]).square().sum() + (
        chosen[:, 2:4].sqrt() - goal[:, 2:].clamp(min=0).sqrt()
    ).square().sum()
    confidence = boxes[..., 4]
    return {
        "loss_box": lambda_coord * coord / n,
        "loss_obj": (target_iou - confidence)[responsible].square().sum() / n,
        "loss_noobj": lambda_noobj * confidence[~responsible].square().sum() / n,
        "loss_cls": (target_cls - probs)[occupied].square().sum() / n,
    }


@register_model(
    "yolo_v1", task="detection", min_input_size=MAX_STRIDE, source="raycv", export_notes=EXPORT_NOTES
)
def yolo_v1(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    grid_size: int = 7,
    boxes_per_cell: int = 2,
    width: int = 16,
    lambda_coord: float = 5.0,
    lambda_noobj: float = 0.5,
) -> YoloV1:
    """YOLOv1: S x S grid, B boxes per cell, the sum-squared loss with lambda_coord and sqrt(w), sqrt(h).

    Args:
        num_classes: Object classes (no background); labels are 1..num_classes.
        in_channels: Channels of the input images.
        image_size: Side of the square canvas the images are letterboxed into; a multiple of 32 (default 320).
        grid_size: S.
        boxes_per_cell: B.
        width: Channels of the first backbone conv; they double at each of the five stride-2 convs.
        lambda_coord, lambda_noobj: Loss weights, 5 and 0.5 in the paper.
    """
    return YoloV1(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size or 320,
        grid_size=grid_size,
        boxes_per_cell=boxes_per_cell,
        width=width,
        lambda_coord=lambda_coord,
        lambda_noobj=lambda_noobj,
    )
