"""Model registry and builders. Importing this package registers every built-in model (those that need
torchvision on first use, see :func:`register_later`).

>>> from raycv.models import create_model, list_models
>>> model = create_model("resnet18", num_classes=10, in_channels=1)
>>> list_models("resnet*", task="classification")[:2]
['resnet101', 'resnet152']
"""

from raycv.models import classification as classification  # registers raycv's classifiers
from raycv.models import segmentation as segmentation  # registers raycv's segmenters
from raycv.models.registry import (
    TASKS,
    ModelInfo,
    create_model,
    get_model_info,
    list_models,
    register_later,
    register_model,
)
from raycv.models.transfer import (
    Adapted,
    LoadReport,
    adapt_input_conv,
    freeze_backbone,
    head_module_names,
    load_weights,
)

# These import torchvision: registered on the first lookup of a name that is not registered yet, or a listing.
register_later(
    "raycv.models.torchvision_zoo",  # every torchvision classifier; FCN, DeepLabV3, LR-ASPP
    "raycv.models.detection",  # torchvision's detectors and the tiny CI ones
    "raycv.models.yolo",  # the YOLO detectors
    "raycv.models.yolo_v1",  # yolo_v1
)

__all__ = [
    "TASKS",
    "Adapted",
    "LoadReport",
    "ModelInfo",
    "adapt_input_conv",
    "create_model",
    "freeze_backbone",
    "get_model_info",
    "head_module_names",
    "list_models",
    "load_weights",
    "register_later",
    "register_model",
]
