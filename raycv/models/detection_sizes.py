"""What makes a torchvision detector give the same boxes in eager mode, TorchScript and ONNX, whatever the
images it saw before: its input size computed in integers, its ROI poolers' scales pinned.

Two torchvision behaviours make a detector's boxes depend on how it runs:

- ``GeneralizedRCNNTransform`` resizes by a float scale, ``min(min_size / short side, max_size / long
  side)``, and takes ``floor(side * scale)``: in float64 eagerly, float32 in TorchScript and in an ONNX
  graph. Measured over 400 random input sizes (16-300 px, ``image_size`` 64): TorchScript resized 193 of
  them to another size than eager mode, ONNX Runtime 75, by one pixel, so the model saw other pixels.
  :class:`ExactResizeTransform` computes the size in integers, exactly, in all three.
- ``MultiScaleRoIAlign`` infers its feature scales from the first batch it sees, rounding ``feature side /
  image side`` to a power of two on the unpadded height: after a first image much wider than high (80 x 112
  resized to 45 x 64 and padded to 64 x 64: 16 / 45 rounds to 1/2, not 1/4), the pooling reads the wrong
  places for the model's lifetime. :func:`pin_roi_scales` reads them from the backbone on a square probe.
"""

# No `from __future__ import annotations`: TorchScript reads these annotations as objects.

from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes, resize_keypoints
from torchvision.ops import MultiScaleRoIAlign

_PROBE_SIDE = 128  # a multiple of every pooled level's stride (4 .. 32 in torchvision's FPNs)


def exact_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """torchvision's resized size, ``floor(side * min(min_size / short, max_size / long))``, in integers."""
    short, long = min(height, width), max(height, width)
    if min_size * long <= max_size * short:
        num, den = min_size, short
    else:
        num, den = max_size, long
    return height * num // den, width * num // den


class ExactResizeTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` whose resize takes :func:`exact_size` (the module doc says why); the rest,
    normalisation, batching and the boxes back to the input's pixels, is torchvision's."""

    def resize(
        self,
        image: Tensor,
        target: Optional[dict[str, Tensor]] = None,  # noqa: UP045 (TorchScript)
    ) -> tuple[Tensor, Optional[dict[str, Tensor]]]:  # noqa: UP045
        h, w = image.shape[-2:]
        if self.training:
            if self._skip_resize:
                return image, target
            size = self.torch_choice(self.min_size)
        else:
            size = self.min_size[-1]
        if self.fixed_size is not None:
            out = [self.fixed_size[1], self.fixed_size[0]]
            image = F.interpolate(image[None], size=out, mode="bilinear", align_corners=False)[0]
        elif torchvision._is_tracing():
            image = self._resize_traced(image, size)
        else:
            oh, ow = exact_size(h, w, size, self.max_size)
            image = F.interpolate(image[None], size=[oh, ow], mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        if "masks" in target:
            masks = F.interpolate(target["masks"][:, None].float(), size=image.shape[-2:])
            target["masks"] = masks[:, 0].byte()
        target["boxes"] = resize_boxes(target["boxes"], [h, w], image.shape[-2:])
        if "keypoints" in target:
            target["keypoints"] = resize_keypoints(target["keypoints"], [h, w], image.shape[-2:])
        return image, target

    @torch.jit.unused
    def _resize_traced(self, image: Tensor, size: int) -> Tensor:
        """:func:`exact_size` in int64 tensor ops, so that a traced (ONNX) graph keeps dynamic sizes."""
        hw = torch._shape_as_tensor(image)[-2:]
        short, long = hw.min(), hw.max()
        lo, hi = torch.tensor(size, dtype=torch.int64), torch.tensor(self.max_size, dtype=torch.int64)
        by_short = lo * long <= hi * short
        out = hw * torch.where(by_short, lo, hi) // torch.where(by_short, short, long)
        size_hw: Any = (out[0], out[1])  # traced int64 scalars: the graph's Resize gets dynamic sizes
        return F.interpolate(image[None], size=size_hw, mode="bilinear", align_corners=False)[0]


def pin_roi_scales(model: nn.Module) -> nn.Module:
    """Sets the feature scales of each ``MultiScaleRoIAlign`` of an R-CNN from a square probe of its
    backbone (the module doc says why); returns ``model``."""
    from torchvision.ops.poolers import _setup_scales

    pools = [p for p in model.modules() if isinstance(p, MultiScaleRoIAlign)]
    backbone, transform = getattr(model, "backbone", None), getattr(model, "transform", None)
    if not pools or backbone is None or transform is None:
        return model
    bands = len(transform.image_mean)
    training = backbone.training
    backbone.eval()  # BatchNorm statistics untouched
    with torch.no_grad():
        features = backbone(torch.zeros(1, bands, _PROBE_SIDE, _PROBE_SIDE))
    backbone.train(training)
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    for pool in pools:
        pool.scales, pool.map_levels = _setup_scales(
            [v for k, v in features.items() if k in pool.featmap_names],  # as the pooler filters them
            [(_PROBE_SIDE, _PROBE_SIDE)],
            pool.canonical_scale,
            pool.canonical_level,
        )
    return model


def make_deterministic(model: nn.Module) -> nn.Module:
    """A torchvision detector's resize made exact (:class:`ExactResizeTransform`) and its ROI scales pinned
    (:func:`pin_roi_scales`), in place; returns ``model``. Other models pass through."""
    transform = getattr(model, "transform", None)
    if type(transform) is GeneralizedRCNNTransform:
        transform.__class__ = ExactResizeTransform  # the same state, another resize
    return pin_roi_scales(model)
