"""Model registry and builders. Importing this package registers every built-in model.

>>> from raycv.models import create_model, list_models
>>> model = create_model("resnet18", num_classes=10, in_channels=1)
>>> list_models("resnet*", task="classification")[:2]
['resnet101', 'resnet152']
"""

from raycv.models import classification as classification  # registers the classifiers
from raycv.models import detection as detection  # registers the torchvision detectors
from raycv.models import segmentation as segmentation  # registers the segmenters
from raycv.models import yolo as yolo  # registers the YOLO detectors
from raycv.models import yolo_v1 as yolo_v1  # registers yolo_v1
from raycv.models.registry import TASKS, ModelInfo, create_model, get_model_info, list_models, register_model
from raycv.models.transfer import (
    Adapted,
    LoadReport,
    adapt_input_conv,
    freeze_backbone,
    head_module_names,
    load_weights,
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
    "register_model",
]
