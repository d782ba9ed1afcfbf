"""torchvision's architectures in raycv's registry: every classifier, and the FCN, DeepLabV3 and LR-ASPP segmenters.

Imported when a model not registered yet is first looked up, or when the models are listed
(:func:`raycv.models.registry.register_later`): importing torchvision costs a process ~1.5 s (it imports
``torch._dynamo``), which workers running raycv's own models do not pay. The builders have the signature of
their task's (``(*, num_classes: int, in_channels: int = 3, image_size: int | None = None)``), never download
weights, and return logits as a plain Tensor: ``[N, num_classes]`` for classifiers, ``[N, num_classes, H, W]``
at the input resolution for segmenters.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models import segmentation as tv_segmentation

from raycv.models.classification import replace_first_conv
from raycv.models.registry import register_model

_CLASSIFICATION = "classification"
_SEGMENTATION = "semantic_segmentation"

# -- classifiers ----------------------------------------------------------------------------------------------
# Measured with a batch of 2 in train and eval mode. raycv registers torchvision models at 32 px or more:
# the measured minimum is lower for most of them, but such inputs carry no information. Fixed-size models
# (ViT, MaxViT) get theirs from _fixed_size.
_MIN_INPUT_SIZE = {
    "alexnet": 63,
    "inception_v3": 75,
}
# googlenet/inception_v3 would return namedtuples with auxiliary logits in training mode.
_EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def _register_torchvision_classifiers() -> None:
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        fixed = _fixed_size(name, builder.__module__)
        min_size = _MIN_INPUT_SIZE.get(name, 32)
        description = _describe(name, builder)
        if fixed is not None:
            min_size = _round_up(32, fixed.multiple)
            description += f" Input side = image_size (default 224), a multiple of {fixed.multiple}."
        register_model(
            name, task=_CLASSIFICATION, source="torchvision", min_input_size=min_size, description=description
        )(_wrap_classifier(name, builder, fixed))


@dataclass(frozen=True)
class _FixedSize:
    """A model whose layers are sized for one input side, which must be a multiple of ``multiple``."""

    multiple: int
    kwargs: Callable[[int], dict[str, Any]]  # image_size -> torchvision builder kwargs


def _fixed_size(name: str, module: str) -> _FixedSize | None:
    if module.endswith(".vision_transformer"):
        patch = re.search(r"_(\d+)$", name)  # vit_b_16 -> patch size 16; if absent, torchvision checks it
        return _FixedSize(int(patch[1]) if patch else 1, lambda size: {"image_size": size})
    if module.endswith(".maxvit"):
        # Four stride-2 stages after the stem, each split into 7x7 windows: 2 * 2**4 * 7 = 224.
        return _FixedSize(224, lambda size: {"input_size": (size, size)})
    return None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _wrap_classifier(
    name: str, builder: Callable[..., nn.Module], fixed: _FixedSize | None
) -> Callable[..., nn.Module]:
    def build(*, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes, **_EXTRA_KWARGS.get(name, {})}
        if fixed is not None and image_size is not None:
            if image_size % fixed.multiple:
                raise ValueError(
                    f"{name} needs image_size to be a multiple of {fixed.multiple}, got {image_size}. "
                    f"Resize the images to {_round_up(image_size, fixed.multiple)} px."
                )
            kwargs.update(fixed.kwargs(image_size))
        model = builder(**kwargs)
        if in_channels != 3:
            replace_first_conv(model, in_channels)
        return model

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"torchvision.models.{name}(weights=None), adapted to num_classes and in_channels."
    return build


def _describe(name: str, builder: Callable[..., nn.Module]) -> str:
    """First paragraph of torchvision's docstring, RST links flattened, plus the parameter count."""
    text = (inspect.getdoc(builder) or name).split("\n\n", 1)[0].replace("\n", " ")
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_{1,2}", r"\1", text)
    weights = torchvision.models.get_model_weights(name)
    num_params = next(iter(weights)).meta.get("num_params")
    return f"{text} {num_params / 1e6:.1f}M params at 1000 classes." if num_params else text


# -- segmenters -----------------------------------------------------------------------------------------------
# The torchvision model is re-classed, not wrapped: its parameter names stay torchvision's
# (``classifier.4.weight``), so torchvision's own checkpoints load unchanged with load_weights, and only the
# dict that forward returns becomes the "out" tensor.


class FCNLogits(tv_segmentation.FCN):
    """torchvision's FCN returning the ``"out"`` logits ``[N, K, H, W]`` as a Tensor."""

    head_modules = ("classifier.4",)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)["out"]


class DeepLabV3Logits(tv_segmentation.DeepLabV3):
    """torchvision's DeepLabV3 returning the ``"out"`` logits ``[N, K, H, W]`` as a Tensor."""

    head_modules = ("classifier.4",)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)["out"]


class LRASPPLogits(tv_segmentation.LRASPP):
    """torchvision's LR-ASPP returning the ``"out"`` logits ``[N, K, H, W]`` as a Tensor.

    Its logits are the sum of two 1x1 convs, on the stride-8 and the stride-16 features: both are the head.
    """

    head_modules = ("classifier.low_classifier", "classifier.high_classifier")

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(input)["out"]


_LOGITS_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    tv_segmentation.FCN: FCNLogits,
    tv_segmentation.DeepLabV3: DeepLabV3Logits,
    tv_segmentation.LRASPP: LRASPPLogits,
}
# Parameter counts without the auxiliary head, at 21 classes (VOC).
_TORCHVISION_MODELS = {
    "fcn_resnet50": "FCN (Long et al., 2015) on a dilated ResNet-50, stride 8. 33.0M params.",
    "deeplabv3_resnet50": "DeepLabV3 (atrous convs, ASPP) on a dilated ResNet-50, stride 8. 39.6M params.",
    "deeplabv3_mobilenet_v3_large": "DeepLabV3 (ASPP) on MobileNetV3-Large, stride 16. 11.0M params.",
    "lraspp_mobilenet_v3_large": "Lite R-ASPP on MobileNetV3-Large, stride 16 and 8 features. 3.2M params.",
}


def _register_torchvision_segmenters() -> None:
    # Every torchvision segmenter accepts sides from 1 px (measured, batch of 2, train and eval mode); raycv
    # registers them at 32 px, below which their stride-8/16 features carry no information.
    for name, description in _TORCHVISION_MODELS.items():
        builder = torchvision.models.get_model_builder(name)
        register_model(
            name, task=_SEGMENTATION, source="torchvision", min_input_size=32, description=description
        )(_wrap_segmenter(name, builder))


def _wrap_segmenter(name: str, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(*, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
        del image_size  # any side works
        # weights_backbone defaults to ImageNet weights, which torchvision would download.
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        model.__class__ = _LOGITS_CLASSES[type(model)]
        if in_channels != 3:
            replace_first_conv(model, in_channels)
        return model

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"torchvision.models.segmentation.{name}(weights=None, weights_backbone=None, aux_loss=False), "
        "adapted to num_classes and in_channels, returning the logits tensor."
    )
    return build


_register_torchvision_classifiers()
_register_torchvision_segmenters()
