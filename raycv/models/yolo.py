"""YOLO detectors: the classic YOLOv1 grid and a modern anchor-free multi-scale YOLO (``yolo_n``, ``yolo_s``).

Every model follows torchvision's detection interface, so training and annotation treat all detectors alike:

- ``model(images, targets)`` in train mode returns ``dict[str, Tensor]`` of losses; their sum is minimised.
- ``model(images)`` in eval mode returns one ``dict`` per image: ``boxes`` [N, 4] float, (x1, y1, x2, y2) in
  that input image's pixels; ``scores`` [N]; ``labels`` [N] int64 in 1..num_classes (0 is background, as in
  torchvision), after the score threshold and class-wise NMS. ``score_thresh`` (0.05), ``nms_thresh`` (0.5)
  and ``detections_per_img`` (100) are plain attributes.

``images`` is a list of [C, H, W] float normalised tensors, of any sizes; the model letterboxes each one into a
square ``image_size`` canvas (resize keeping the aspect ratio so the longer side fits, zero padding on the
bottom and right) and maps the boxes back. ``targets`` is a list of ``{"boxes": [M, 4] (x1, y1, x2, y2) in
the input image's pixels, "labels": [M] int64 in 1..num_classes}``; M = 0 is allowed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision import ops

from raycv.models.registry import register_model

_TASK = "detection"
MAX_STRIDE = 32
# What `raycv export-model` cannot do with the YOLOs (measured with torch 2.14); yolo_v1 shares it.
EXPORT_NOTES = {
    "onnx": "cannot, because tracing its letterbox calls Python's round() on a traced size (TypeError)",
    "pt2": (
        "cannot, because torch.export stops on the data-dependent number of boxes before NMS (a guard in "
        "torchvision's batched_nms)"
    ),
    "torchscript": "cannot, because torch.jit.script does not compile its Python forward (lists of modules "
    "and tensors iterated together)",
}
_PRE_NMS_TOP_K = 1000


# -- The shared interface ------------------------------------------------------------------------------------


class YoloDetector(nn.Module):
    """Letterboxing, target checks and postprocessing shared by the YOLO models."""

    head_modules: tuple[str, ...] = ("head",)  # read by raycv.models.transfer.head_module_names

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        if image_size % MAX_STRIDE:
            raise ValueError(
                f"image_size must be a multiple of {MAX_STRIDE}, got {image_size}. "
                f"Use {max(MAX_STRIDE, round(image_size / MAX_STRIDE) * MAX_STRIDE)}."
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.score_thresh = 0.05
        self.nms_thresh = 0.5
        self.detections_per_img = 100

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in train mode (``targets`` required), detections in eval mode (see the module docstring)."""
        self._check_images(images)
        batch, scales = letterbox(images, self.image_size)
        if self.training:
            if targets is None:
                raise ValueError("In train mode the model needs targets; call model.eval() to detect.")
            self._check_targets(targets, len(images))
            # Boxes in canvas pixels: the same per-axis scales as the images.
            scaled = [
                {"boxes": t["boxes"].to(batch) * scale, "labels": t["labels"].to(batch.device)}
                for t, scale in zip(targets, scales, strict=True)
            ]
            return self.compute_loss(batch, scaled)
        boxes, scores = self.predict(batch)
        return [
            self._postprocess(b, s, scale, image.shape[-2:])
            for b, s, scale, image in zip(boxes, scores, scales, images, strict=True)
        ]

    def compute_loss(self, batch: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Candidate boxes [N, P, 4] in canvas pixels and class scores [N, P, num_classes]."""
        raise NotImplementedError

    def _postprocess(
        self, boxes: Tensor, scores: Tensor, scale: Tensor, image_size: torch.Size
    ) -> dict[str, Tensor]:
        point, cls = torch.nonzero(scores > self.score_thresh, as_tuple=True)
        kept = scores[point, cls]
        if kept.numel() > _PRE_NMS_TOP_K:
            kept, order = kept.topk(_PRE_NMS_TOP_K)
            point, cls = point[order], cls[order]
        height, width = image_size
        # Back to the input's pixels: undo the per-axis resize, then clip to the image (not the padding).
        candidates = boxes[point] / scale
        candidates[:, 0::2] = candidates[:, 0::2].clamp(0, width)
        candidates[:, 1::2] = candidates[:, 1::2].clamp(0, height)
        keep = ops.batched_nms(candidates, kept, cls, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": candidates[keep], "scores": kept[keep], "labels": cls[keep].to(torch.int64) + 1}

    def _check_images(self, images: list[Tensor]) -> None:
        if not isinstance(images, list | tuple) or not images:
            raise ValueError(
                f"Expected a non-empty list of [C, H, W] image tensors, got {type(images).__name__}."
            )
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[0] != self.in_channels:
                raise ValueError(
                    f"images[{i}] has shape {tuple(image.shape)}; expected [{self.in_channels}, H, W]. "
                    "Pass a list of single images, not a batched [N, C, H, W] tensor."
                )

    def _check_targets(self, targets: list[dict[str, Tensor]], n_images: int) -> None:
        if len(targets) != n_images:
            raise ValueError(f"Got {n_images} images but {len(targets)} targets; pass one dict per image.")
        for i, target in enumerate(targets):
            boxes, labels = target["boxes"], target["labels"]
            if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
                raise ValueError(
                    f"targets[{i}] has boxes {tuple(boxes.shape)} and labels {tuple(labels.shape)}; "
                    "expected boxes [M, 4] (x1, y1, x2, y2) and labels [M]."
                )
            if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > self.num_classes):
                raise ValueError(
                    f"targets[{i}]['labels'] must lie in 1..{self.num_classes} (0 is background), got "
                    f"{sorted(set(labels.tolist()))}."
                )


def letterbox(images: list[Tensor], size: int) -> tuple[Tensor, Tensor]:
    """Resizes each image so that its longer side is ``size`` and pads it to a ``size`` square.

    Args:
        images: [C, H, W] tensors of any sizes.
        size: Side of the square canvas.

    Returns:
        batch: [N, C, size, size], each image in the top left corner, zeros (the normalised mean) elsewhere.
        scales: [N, 4], (sx, sy, sx, sy) per image: canvas pixels per input pixel along x and y.
    """
    batch = images[0].new_zeros((len(images), images[0].shape[0], size, size))
    scales = []
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        ratio = size / max(height, width)
        new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
        if (new_h, new_w) != (height, width):
            image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        batch[i, :, :new_h, :new_w] = image
        scales.append([new_w / width, new_h / height, new_w / width, new_h / height])
    return batch, torch.tensor(scales, dtype=batch.dtype, device=batch.device)


def conv(
    c_in: int, c_out: int, kernel: int = 3, stride: int = 1, act: type[nn.Module] = nn.SiLU
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), act()
    )


# -- Anchor-free multi-scale YOLO ----------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(conv(channels, channels), conv(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class _CSPBlock(nn.Module):
    """C2f-style: split into two halves, chain bottlenecks on one, concatenate every intermediate, merge."""

    def __init__(self, c_in: int, c_out: int, depth: int) -> None:
        super().__init__()
        hidden = c_out // 2
        self.split = conv(c_in, 2 * hidden, 1)
        self.blocks = nn.ModuleList(_Bottleneck(hidden) for _ in range(depth))
        self.merge = conv((2 + depth) * hidden, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        outputs = list(self.split(x).chunk(2, dim=1))
        for block in self.blocks:
            outputs.append(block(outputs[-1]))
        return self.merge(torch.cat(outputs, dim=1))


class _PANNeck(nn.Module):
    """FPN top-down then PAN bottom-up over the stride 8/16/32 features (channels c3, c4, c5)."""

    def __init__(self, c3: int, c4: int, c5: int, depth: int) -> None:
        super().__init__()
        self.reduce5 = conv(c5, c4, 1)
        self.top_down4 = _CSPBlock(2 * c4, c4, depth)
        self.reduce4 = conv(c4, c3, 1)
        self.top_down3 = _CSPBlock(2 * c3, c3, depth)
        self.down3 = conv(c3, c3, 3, 2)
        self.bottom_up4 = _CSPBlock(2 * c3, c4, depth)
        self.down4 = conv(c4, c4, 3, 2)
        self.bottom_up5 = _CSPBlock(2 * c4, c5, depth)

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor) -> list[Tensor]:
        lateral5 = self.reduce5(p5)
        lateral4 = self.reduce4(self.top_down4(torch.cat([F.interpolate(lateral5, scale_factor=2.0), p4], 1)))
        out3 = self.top_down3(torch.cat([F.interpolate(lateral4, scale_factor=2.0), p3], 1))
        out4 = self.bottom_up4(torch.cat([self.down3(out3), lateral4], 1))
        out5 = self.bottom_up5(torch.cat([self.down4(out4), lateral5], 1))
        return [out3, out4, out5]


class _DecoupledHead(nn.Module):
    """Per level: a class branch (K logits) and a box branch (4 distances l, t, r, b and 1 objectness logit)."""

    def __init__(self, channels: list[int], num_classes: int) -> None:
        super().__init__()
        self.cls = nn.ModuleList(nn.Sequential(conv(c, c), nn.Conv2d(c, num_classes, 1)) for c in channels)
        self.box = nn.ModuleList(nn.Sequential(conv(c, c), nn.Conv2d(c, 5, 1)) for c in channels)
        # Start near p = 0.01 so that the many negatives do not swamp the loss in the first steps.
        prior = -math.log((1 - 0.01) / 0.01)
        with torch.no_grad():
            for branch in self.cls:
                _last_bias(branch).fill_(prior)
            for branch in self.box:
                bias = _last_bias(branch)
                bias[4:] = prior
                # Distances start at 2 strides (softplus(1.85) = 2), the size of a typical object near its cell.
                bias[:4] = math.log(math.e**2 - 1)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Class logits [N, P, K] and box outputs [N, P, 5] over the P points of all levels, row-major."""
        cls = [head(x).flatten(2).transpose(1, 2) for head, x in zip(self.cls, features, strict=True)]
        box = [head(x).flatten(2).transpose(1, 2) for head, x in zip(self.box, features, strict=True)]
        return torch.cat(cls, 1), torch.cat(box, 1)


class YoloAnchorFree(YoloDetector):
    """Anchor-free YOLO in the manner of YOLOX/YOLOv8, small enough to train from scratch on a CPU.

    Backbone: a stride-2 stem and four stride-2 stages of C2f-style CSP blocks (widths ``widths``), giving
    features at strides 8, 16 and 32; a PAN neck (top-down FPN, then bottom-up); a decoupled head per level.
    Each point (the centre of a cell) predicts class logits, an objectness logit and its distances
    (l, t, r, b) = softplus(raw) * stride to the box sides. Score of class k: ``sigmoid(obj) * sigmoid(cls_k)``.

    Assignment (centre sampling, as FCOS/YOLOX): on every level a point is positive for an object when it is
    the cell holding the object's centre, or when it lies inside the box and within ``center_radius`` strides
    of its centre; a point claimed by several objects takes the smallest.

    Losses, each divided by the number of positives: ``loss_box`` = ``box_weight`` * sum of (1 - CIoU)
    over the positives (``torchvision.ops.complete_box_iou_loss``); ``loss_obj`` = BCE of objectness over all
    points (1 for positives, 0 elsewhere); ``loss_cls`` = BCE of the class logits over the positives (one-hot).
    """

    strides: tuple[int, ...] = (8, 16, 32)

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        widths: tuple[int, int, int, int, int],
        depth: int,
        center_radius: float = 2.5,
        box_weight: float = 5.0,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        self.center_radius, self.box_weight = center_radius, box_weight
        stem, c2, c3, c4, c5 = widths
        self.stem = conv(in_channels, stem, 3, 2)
        self.stages = nn.ModuleList(
            nn.Sequential(conv(c_in, c_out, 3, 2), _CSPBlock(c_out, c_out, depth))
            for c_in, c_out in [(stem, c2), (c2, c3), (c3, c4), (c4, c5)]
        )
        self.neck = _PANNeck(c3, c4, c5, depth)
        self.head = _DecoupledHead([c3, c4, c5], num_classes)

    def _outputs(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Class logits [N, P, K], objectness logits [N, P], boxes [N, P, 4] xyxy canvas pixels, and the
        points [P, 2] (x, y) with their strides [P]."""
        x = self.stem(batch)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        levels = self.neck(*features[1:])
        cls, box = self.head(levels)
        points, strides = _points([level.shape[-2:] for level in levels], self.strides, batch)
        distances = F.softplus(box[..., :4]) * strides[:, None]
        boxes = torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)
        return cls, box[..., 4], boxes, points, strides

    def predict(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        cls, obj, boxes, _, _ = self._outputs(batch)
        return boxes, obj.sigmoid()[..., None] * cls.sigmoid()

    def compute_loss(self, batch: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        cls, obj, boxes, points, strides = self._outputs(batch)
        positives, matched_boxes, matched_labels = [], [], []
        for target in targets:
            positive, index = self._assign(points, strides, target["boxes"])
            positives.append(positive)
            matched_boxes.append(target["boxes"][index[positive]])
            matched_labels.append(target["labels"][index[positive]])
        positive = torch.stack(positives)
        n_positive = max(int(positive.sum()), 1)
        loss_obj = F.binary_cross_entropy_with_logits(obj, positive.to(obj.dtype), reduction="sum")
        goal_cls = F.one_hot(torch.cat(matched_labels) - 1, self.num_classes).to(cls.dtype)
        loss_cls = F.binary_cross_entropy_with_logits(cls[positive], goal_cls, reduction="sum")
        loss_box = ops.complete_box_iou_loss(boxes[positive], torch.cat(matched_boxes), reduction="sum")
        return {
            "loss_box": self.box_weight * loss_box / n_positive,
            "loss_obj": loss_obj / n_positive,
            "loss_cls": loss_cls / n_positive,
        }

    def _assign(self, points: Tensor, strides: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
        """Positive mask [P] and the index of each point's object [P] (meaningful where positive)."""
        if not len(gt):
            return torch.zeros(len(points), dtype=torch.bool, device=points.device), points.new_zeros(
                len(points), dtype=torch.int64
            )
        px, py = points[:, 0, None], points[:, 1, None]  # [P, 1]
        cx, cy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2  # [M]
        stride = strides[:, None]
        inside = (px > gt[:, 0]) & (px < gt[:, 2]) & (py > gt[:, 1]) & (py < gt[:, 3])
        radius = self.center_radius * stride
        near = ((px - cx).abs() < radius) & ((py - cy).abs() < radius)
        # The cell holding the centre is always positive, so that objects smaller than a cell are learned too.
        centre_cell = (
            torch.div(px, stride, rounding_mode="floor") == torch.div(cx, stride, rounding_mode="floor")
        ) & (torch.div(py, stride, rounding_mode="floor") == torch.div(cy, stride, rounding_mode="floor"))
        candidate = (inside & near) | centre_cell
        area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).expand_as(candidate)
        index = torch.where(candidate, area, torch.full_like(area, math.inf)).argmin(dim=1)
        return candidate.any(dim=1), index


def _last_bias(branch: nn.Module) -> Tensor:
    conv = list(branch.children())[-1]
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None  # built that way in _DecoupledHead
    return conv.bias


def _points(sizes: list[torch.Size], strides: tuple[int, ...], like: Tensor) -> tuple[Tensor, Tensor]:
    """Cell centres [P, 2] (x, y) in canvas pixels and their strides [P], level by level, row-major."""
    points, point_strides = [], []
    for (height, width), stride in zip(sizes, strides, strict=True):
        ys = (torch.arange(height, dtype=like.dtype, device=like.device) + 0.5) * stride
        xs = (torch.arange(width, dtype=like.dtype, device=like.device) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1))
        point_strides.append(
            torch.full((height * width,), float(stride), dtype=like.dtype, device=like.device)
        )
    return torch.cat(points), torch.cat(point_strides)


# -- Builders ------------------------------------------------------------------------------------------------


@register_model("yolo_n", task=_TASK, min_input_size=MAX_STRIDE, source="raycv", export_notes=EXPORT_NOTES)
def yolo_n(*, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> YoloAnchorFree:
    """Anchor-free YOLO, nano: strides 8/16/32, PAN neck, centre sampling, CIoU + BCE; trains on a CPU."""
    return YoloAnchorFree(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size or 320,
        widths=(8, 16, 32, 64, 128),
        depth=1,
    )


@register_model("yolo_s", task=_TASK, min_input_size=MAX_STRIDE, source="raycv", export_notes=EXPORT_NOTES)
def yolo_s(*, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> YoloAnchorFree:
    """Anchor-free YOLO, small: strides 8/16/32, PAN neck, centre sampling, CIoU + BCE."""
    return YoloAnchorFree(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size or 320,
        widths=(16, 32, 64, 128, 256),
        depth=2,
    )
