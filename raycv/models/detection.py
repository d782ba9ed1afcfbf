"""Detection and instance segmentation: torchvision's R-CNN, RetinaNet, FCOS and SSD, and tiny CI models.

Every builder has the signature ``(*, num_classes: int, in_channels: int = 3, image_size: int | None = None,
**options)`` and returns a freshly initialised torchvision detector (weights are never downloaded;
``options`` go to the torchvision constructor, e.g. ``box_score_thresh``).

Class convention: ``num_classes`` counts the OBJECT classes K. The torchvision model is built with K + 1
classes, index 0 being the background, so labels are ``1 .. K`` in the targets and in the outputs (add 1 to a
0-based dataset class index). RetinaNet, FCOS and SSD-lite score classes with sigmoids or softmax alike;
they simply never predict 0 when never trained on it.

The interface is torchvision's:

- train mode: ``model(images, targets) -> dict[str, Tensor]`` of scalar losses, where ``images`` is a list of
  ``[C, H, W]`` float tensors in 0..1 (any sizes) and each target a dict with ``boxes`` ``[M, 4]`` float32
  ``(x1, y1, x2, y2)`` in input pixels, ``labels`` ``[M]`` int64 in ``1 .. K`` and, for instance
  segmentation, ``masks`` ``[M, H, W]`` uint8. ``M = 0`` (an image without objects) is allowed.
- eval mode: ``model(images) -> list[dict]``, one per image: ``boxes`` ``[N, 4]`` ``(x1, y1, x2, y2)`` in the
  input image's pixels, ``scores`` ``[N]``, ``labels`` ``[N]`` in ``1 .. K`` and, for instance segmentation,
  ``masks`` ``[N, 1, H, W]`` float probabilities at the input resolution (threshold at 0.5).

``image_size`` sets the internal resize of the model's ``GeneralizedRCNNTransform``: ``min_size = max_size =
image_size``, so the longer side of every input is resized to ``image_size`` (``None`` keeps torchvision's
defaults, 800/1333 for the R-CNNs, which make CPU training crawl). SSD-lite resizes to a fixed
``image_size`` square; SSD300-VGG16 always works at 300 x 300 (its anchor steps and its last layers need
exactly that size) and ignores ``image_size``.

Sizes (measured on CPU): the torchvision models train with batches of one from ``image_size = 64`` up (at 32
their BatchNorm sees one value per channel), hence ``min_input_size = 64``. SSD-lite's last extra layers
are 1 x 1 at every size, 320 included, so train it with batches of 2 or more.

Each model names its class-dependent predictor modules in a ``head_modules`` attribute, which
:func:`raycv.models.transfer.head_module_names` reads: :func:`~raycv.models.transfer.load_weights` with another
``num_classes`` skips just those tensors and :func:`~raycv.models.transfer.freeze_backbone` trains just them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torchvision.models import detection as tv_detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from raycv.data.transforms import per_band
from raycv.models.classification import replace_first_conv
from raycv.models.detection_sizes import make_deterministic
from raycv.models.registry import register_model

_DETECTION = "detection"
_INSTANCE = "instance_segmentation"

_RCNN_HEADS = ("roi_heads.box_predictor",)
_MASK_RCNN_HEADS = ("roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits")
_DENSE_HEADS = ("head.classification_head.cls_logits",)
_SSD_HEADS = ("head.classification_head",)

# name -> (task, class-dependent head modules, description)
_TORCHVISION_MODELS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "fasterrcnn_resnet50_fpn": (_DETECTION, _RCNN_HEADS, "Faster R-CNN on a ResNet-50 FPN. 41.3M params."),
    "fasterrcnn_resnet50_fpn_v2": (
        _DETECTION,
        _RCNN_HEADS,
        "Faster R-CNN v2 (conv box head, GroupNorm) on a ResNet-50 FPN. 43.7M params.",
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        _DETECTION,
        _RCNN_HEADS,
        "Faster R-CNN on a MobileNetV3-Large FPN. 19.4M params.",
    ),
    "retinanet_resnet50_fpn_v2": (
        _DETECTION,
        _DENSE_HEADS,
        "RetinaNet v2 (focal loss, GIoU) on a ResNet-50 FPN. 38.2M params.",
    ),
    "fcos_resnet50_fpn": (_DETECTION, _DENSE_HEADS, "FCOS (anchor-free) on a ResNet-50 FPN. 32.3M params."),
    "ssd300_vgg16": (_DETECTION, _SSD_HEADS, "SSD on VGG-16, fixed 300 x 300 input. 35.6M params."),
    "ssdlite320_mobilenet_v3_large": (
        _DETECTION,
        _SSD_HEADS,
        "SSD-lite on MobileNetV3-Large, square input of image_size (default 320). 3.4M params.",
    ),
    "maskrcnn_resnet50_fpn": (_INSTANCE, _MASK_RCNN_HEADS, "Mask R-CNN on a ResNet-50 FPN. 44.4M params."),
    "maskrcnn_resnet50_fpn_v2": (
        _INSTANCE,
        _MASK_RCNN_HEADS,
        "Mask R-CNN v2 (conv heads, GroupNorm) on a ResNet-50 FPN. 46.4M params.",
    ),
}
# What `raycv export-model` cannot do with torchvision's detectors (measured with torch 2.14, torchvision 0.29).
_PT2_GUARDS = (
    "cannot, because torch.export stops on torchvision's data-dependent post-processing (a guard on the "
    "number of boxes in batched_nms, and on the image's aspect ratio in the resize); export to torchscript"
)
_DETECTOR_EXPORT_NOTES = {"pt2": _PT2_GUARDS}
# ssd300_vgg16 resizes every input to 300 x 300 whatever image_size says.
_FIXED_SIZE = {"ssd300_vgg16"}


def declare_heads(model: nn.Module, heads: tuple[str, ...]) -> nn.Module:
    """Sets ``model.head_modules = heads`` after checking that each name is a submodule, and makes its input
    sizes and ROI scales deterministic (:func:`~raycv.models.detection_sizes.make_deterministic`); returns
    ``model``."""
    for name in heads:
        model.get_submodule(name)  # raises AttributeError naming the missing module
    # nn.Module.__setattr__ is typed for tensors and modules; a tuple is a plain attribute.
    object.__setattr__(model, "head_modules", heads)
    return make_deterministic(model)


def set_image_size(model: nn.Module, image_size: int, *, fixed: bool = False) -> None:
    """Makes the model's transform resize the longer side of every input to ``image_size`` px.

    Args:
        model: A torchvision detector with a ``transform`` (``GeneralizedRCNNTransform``).
        image_size: Target side in pixels.
        fixed: Resize to an ``image_size`` square regardless of the aspect ratio (SSD, whose anchors are laid
            out for a square).
    """
    transform = _transform(model)
    transform.min_size = (image_size,)
    transform.max_size = image_size
    if fixed:
        transform.fixed_size = (image_size, image_size)


def _transform(model: nn.Module) -> GeneralizedRCNNTransform:
    return cast(GeneralizedRCNNTransform, model.transform)


def _adapt_in_channels(model: nn.Module, in_channels: int) -> None:
    """Swaps the first conv for one taking ``in_channels`` and sets a per-channel normalisation to match."""
    replace_first_conv(model, in_channels)
    transform = _transform(model)
    # Repeated over the bands as load_weights repeats RGB kernels into this conv (adapt_input_conv), so an
    # RGB-pretrained stem sees the statistics it was trained with; one band gets their average.
    transform.image_mean = list(per_band(transform.image_mean, in_channels))
    transform.image_std = list(per_band(transform.image_std, in_channels))


def _check_options(name: str, options: dict[str, Any]) -> None:
    for reserved in ("weights", "weights_backbone", "num_classes"):
        if reserved in options:
            raise ValueError(
                f"{name}: {reserved!r} is set by raycv (weights are never downloaded; num_classes counts object "
                "classes). Load pretrained weights with raycv.models.transfer.load_weights instead."
            )


def _wrap_torchvision(name: str, heads: tuple[str, ...]) -> Callable[..., nn.Module]:
    builder = tv_detection.__dict__[name]

    def build(
        *, num_classes: int, in_channels: int = 3, image_size: int | None = None, **options: Any
    ) -> nn.Module:
        _check_options(name, options)
        # weights_backbone defaults to ImageNet weights, which torchvision would download; +1 for background.
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **options)
        if image_size is not None and name not in _FIXED_SIZE:
            set_image_size(model, image_size, fixed=name.startswith("ssd"))
        if in_channels != 3:
            _adapt_in_channels(model, in_channels)
        return declare_heads(model, heads)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"torchvision.models.detection.{name}(weights=None, weights_backbone=None, num_classes=num_classes + 1), "
        "resized to image_size."
    )
    return build


def _register_torchvision_detectors() -> None:
    for name, (task, heads, description) in _TORCHVISION_MODELS.items():
        register_model(
            name,
            task=task,
            source="torchvision",
            min_input_size=64,
            description=description,
            export_notes=_DETECTOR_EXPORT_NOTES,
        )(_wrap_torchvision(name, heads))


_register_torchvision_detectors()


# -- tiny CI models --------------------------------------------------------------------------------------------


class _TinyBackbone(nn.Sequential):
    """Three conv-BN-ReLU layers, stride 4, ``out_channels`` features: what torchvision's detectors need."""

    def __init__(self, in_channels: int, out_channels: int = 16) -> None:
        super().__init__(
            _conv_bn_relu(in_channels, 8, stride=2),
            _conv_bn_relu(8, out_channels, stride=2),
            _conv_bn_relu(out_channels, out_channels, stride=1),
        )
        self.out_channels = out_channels


def _conv_bn_relu(in_channels: int, out_channels: int, *, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _tiny_rcnn_kwargs(num_classes: int, in_channels: int, image_size: int | None) -> dict[str, Any]:
    side = image_size or 64
    backbone = _TinyBackbone(in_channels)
    return {
        "backbone": backbone,
        "num_classes": None,  # the box_predictor below carries the classes
        "min_size": side,
        "max_size": side,
        "image_mean": [0.5] * in_channels,
        "image_std": [0.25] * in_channels,
        # Anchors from 1/8 to 1/1 of the side: the generated shapes are 1/4 to 3/5 of it.
        "rpn_anchor_generator": AnchorGenerator(
            sizes=((side // 8, side // 4, side // 2, side),), aspect_ratios=((0.5, 1.0, 2.0),)
        ),
        "rpn_head": RPNHead(backbone.out_channels, 3 * 4),
        "rpn_pre_nms_top_n_train": 200,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 100,
        "rpn_post_nms_top_n_test": 50,
        "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 64,
        "box_roi_pool": MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        "box_head": TwoMLPHead(backbone.out_channels * 7 * 7, 64),
        "box_predictor": FastRCNNPredictor(64, num_classes + 1),
    }


@register_model("test_detector", task=_DETECTION, min_input_size=16, export_notes=_DETECTOR_EXPORT_NOTES)
def test_detector(*, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """Tiny Faster R-CNN (3-conv stride-4 backbone, 16 channels) for CI: trains in seconds on 64 px images."""
    model = tv_detection.FasterRCNN(**_tiny_rcnn_kwargs(num_classes, in_channels, image_size))
    return declare_heads(model, _RCNN_HEADS)


@register_model(
    "test_instance_segmenter", task=_INSTANCE, min_input_size=16, export_notes=_DETECTOR_EXPORT_NOTES
)
def test_instance_segmenter(
    *, num_classes: int, in_channels: int = 3, image_size: int | None = None
) -> nn.Module:
    """Tiny Mask R-CNN (3-conv stride-4 backbone, 16 channels) for CI: trains in seconds on 64 px images."""
    kwargs = _tiny_rcnn_kwargs(num_classes, in_channels, image_size)
    model = tv_detection.MaskRCNN(
        **kwargs,
        mask_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(kwargs["backbone"].out_channels, [16, 16], 1),
        mask_predictor=MaskRCNNPredictor(16, 16, num_classes + 1),
    )
    return declare_heads(model, _MASK_RCNN_HEADS)


def detection_losses(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
    """The sum of the loss dict a torchvision detector returns in train mode (what one optimiser step needs)."""
    losses: dict[str, Tensor] = model(images, targets)
    return torch.stack(list(losses.values())).sum()
