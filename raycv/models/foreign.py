"""Models from outside raycv: torchvision and timm architectures with their weights, and model files.

- :func:`build_arch` builds ``torchvision:<builder>``, ``timm:<name>`` or a raycv registry name, untrained.
- :func:`load_state` reads weights as data only: a ``.safetensors`` file, or a state_dict loaded with
  ``weights_only=True`` (a pickled whole model, or a file whose unpickling would run code, is refused).
- :func:`fit_weights` loads them strictly: the first missing, unexpected or misshapen key is named; a first
  convolution pretrained on RGB is adapted to another band count (:func:`~raycv.models.transfer.adapt_input_conv`).
- :func:`weights_meta` reads what ``torchvision_weights`` and timm's pretrained configs declare: class names,
  resize, crop, mean and std.
- :func:`strip_head` turns a classifier into a feature extractor (pooled penultimate features).
"""

from __future__ import annotations

import inspect
import io
import os
from typing import Any

import torch
from torch import nn

from raycv.errors import ConfigError

SAFETENSORS = (".safetensors",)


def build_arch(arch: str, *, task: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """An untrained ``arch``: ``torchvision:<builder>``, ``timm:<name>`` or a raycv registry name.

    ``num_classes`` is what the weights hold (for torchvision's detectors, background included).
    """
    source, _, name = arch.partition(":")
    if not name:
        from raycv.models import create_model

        return create_model(arch, num_classes=num_classes, in_channels=in_channels)
    if source == "torchvision":
        import torchvision

        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError:
            raise ConfigError(
                "model.arch", arch, "Use a torchvision.models builder name, e.g. torchvision:resnet50."
            ) from None
        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs["weights_backbone"] = None  # never a download
        model = builder(**kwargs)
        if in_channels != 3:
            from raycv.models.classification import replace_first_conv

            replace_first_conv(model, in_channels)
        from raycv.models.detection_sizes import make_deterministic

        return make_deterministic(
            model
        )  # a detector's boxes the same eager, scripted and in ONNX; else as is
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise ConfigError("model.arch", arch, "Use a timm model name (`timm.list_models()`).")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    raise ConfigError("model.arch", arch, "Write torchvision:<builder>, timm:<name> or a raycv model name.")


def load_state(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or of a state_dict (``.pt``/``.pth``), as data only.

    Raises:
        ConfigError: the file is a pickled object (a whole model) or anything ``weights_only`` refuses; its
            code never runs.
    """
    if uri.lower().endswith(SAFETENSORS):
        from safetensors.torch import load

        try:
            return dict(load(data))
        except Exception as exc:
            raise ConfigError("model.weights", uri, f"Not a readable .safetensors file ({exc}).") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            "model.weights",
            uri,
            "It holds pickled Python objects, not just tensors (a whole model saved with torch.save(model), "
            "or code). raycv loads weights as data only: save model.state_dict() (or a .safetensors file), "
            f"or export the model (TorchScript, torch.export .pt2, ONNX) and give it as model.file. ({exc})".replace(
                "\n", " "
            )[:600],
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a raycv checkpoint
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a Lightning-style checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            "model.weights", uri, "It does not hold a state_dict (a mapping of names to tensors)."
        )
    return obj


def fit_weights(model: nn.Module, state: dict[str, torch.Tensor], uri: str, *, skip: str = "") -> list[str]:
    """Load ``state`` into ``model`` strictly; returns the first-convolution tensors adapted to its bands.

    ``skip`` drops the keys of a removed module (a stripped head); an ``aux_classifier`` the model lacks
    (torchvision's segmentation weights carry one for training) is ignored.

    Raises:
        ConfigError: naming the first missing, unexpected or misshapen key and the shapes.
    """
    own = model.state_dict()
    state = {
        k.removeprefix("module."): v
        for k, v in state.items()
        if not (skip and k.removeprefix("module.").startswith(skip + "."))
        and not (k.startswith("aux_classifier.") and not any(o.startswith("aux_classifier.") for o in own))
    }
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = (
            f"missing key '{missing[0]}' (shape {list(own[missing[0]].shape)})"
            if missing
            else f"unexpected key '{unexpected[0]}' (shape {list(state[unexpected[0]].shape)})"
        )
        raise ConfigError(
            "model.weights",
            uri,
            f"They do not fit the architecture: {first}; {len(missing)} missing and {len(unexpected)} "
            "unexpected keys in all. Check model.arch and model.num_classes (or classes).",
        )
    adapted = []
    for k, v in list(state.items()):
        want = own[k].shape
        if v.shape == want:
            continue
        if v.dim() == 4 and v.shape[0] == want[0] and v.shape[2:] == want[2:] and v.shape[1] in (1, 3):
            from raycv.models.transfer import adapt_input_conv

            state[k] = adapt_input_conv(v, int(want[1]))
            adapted.append(f"{k}: {v.shape[1]} -> {want[1]} channels")
            continue
        raise ConfigError(
            "model.weights",
            uri,
            f"They do not fit the architecture: '{k}' has shape {list(v.shape)} in the weights and "
            f"{list(want)} in the model. Check model.arch, model.num_classes (or classes) and in_channels.",
        )
    model.load_state_dict(state)
    return adapted


def strip_head(model: nn.Module) -> str:
    """Make a classifier return its pooled penultimate features: the last ``nn.Linear`` (in module order)
    becomes an identity (timm models: ``reset_classifier(0)``). Returns the removed module's name.

    Raises:
        ConfigError: the model has no linear classifier (e.g. a convolutional head).
    """
    if hasattr(model, "reset_classifier") and hasattr(model, "pretrained_cfg"):  # a timm model
        timm_model: Any = model
        name = str(timm_model.pretrained_cfg.get("classifier", "head"))
        timm_model.reset_classifier(0)
        return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ConfigError(
            "model.task",
            "embedding",
            f"{type(model).__name__} has no linear classifier to take the features before; export a model "
            "whose output is the [N, D] features and give it as model.file.",
        )
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return last


def torchvision_weights(name: str) -> Any:
    """The ``torchvision.models`` weights enum value of ``name`` (``ResNet50_Weights.IMAGENET1K_V2``)."""
    import torchvision

    try:
        return torchvision.models.get_weight(name)
    except Exception:
        raise ConfigError(
            "model.torchvision_weights",
            name,
            "Write <WeightsEnum>.<VALUE> as torchvision names it, e.g. ResNet50_Weights.IMAGENET1K_V2.",
        ) from None


def hub_cache_file(weights: Any, name: str) -> str:
    """Where torchvision keeps ``weights`` in the torch hub cache (``TORCH_HOME``); never downloaded here.

    Raises:
        ConfigError: the file is not in the cache, with the way to put it there.
    """
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise ConfigError(
            "model.torchvision_weights",
            name,
            f"Its file is not in the torch hub cache ({path}); raycv never downloads. On a machine with "
            f"internet run torchvision.models.get_weight('{name}').get_state_dict() and copy "
            f"{os.path.basename(weights.url)} into $TORCH_HOME/hub/checkpoints/ here, or give model.weights.",
        )
    return path


def weights_meta(arch: str, tv_weights: Any) -> dict[str, Any]:
    """What pretrained weights declare: ``classes`` (torchvision categories), ``resize``, ``crop``,
    ``mean``, ``std`` (torchvision's eval transforms, timm's pretrained config); only what is known."""
    meta: dict[str, Any] = {}
    if tv_weights is not None:
        meta["classes"] = list(tv_weights.meta.get("categories") or []) or None
        t = tv_weights.transforms()
        for key, attr in (("resize", "resize_size"), ("crop", "crop_size")):
            value = getattr(t, attr, None)
            if value:
                meta[key] = value[0] if len(value) == 1 else list(value)
        for key in ("mean", "std"):
            if getattr(t, key, None) is not None:
                meta[key] = list(getattr(t, key))
        if type(t).__name__ == "ObjectDetection":  # torchvision's detectors take 0..1 pixels
            meta.update(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    elif arch.startswith("timm:"):
        import timm

        cfg = timm.data.resolve_data_config(
            {}, model=timm.create_model(arch.split(":", 1)[1], pretrained=False, num_classes=0)
        )
        size = int(cfg["input_size"][-1])
        meta.update(
            resize=int(size / float(cfg.get("crop_pct", 1.0))),
            crop=size,
            mean=list(cfg["mean"]),
            std=list(cfg["std"]),
        )
    return meta
