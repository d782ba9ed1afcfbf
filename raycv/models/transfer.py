"""Transfer learning: load weights across heads of another size, and freeze everything but the head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

# Prefixes that wrappers add to every key: DistributedDataParallel, then torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What :func:`load_weights` did, key by key (state_dict names).

    Every model key is in exactly one of ``loaded``, ``skipped``, ``missing``; every checkpoint key in exactly
    one of ``loaded``, ``skipped``, ``unexpected``.

    Attributes:
        loaded: Keys copied into the model.
        skipped: Keys in both whose shapes differ (e.g. a head with another num_classes); the model keeps its own.
        unexpected: Checkpoint keys the model does not have.
        missing: Model keys the checkpoint does not have; the model keeps its own.
    """

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs, e.g. ``"loaded 120 tensors; skipped (shape mismatch): fc.weight, fc.bias"``."""
        parts = [f"loaded {len(self.loaded)} tensors"]
        for label, keys in (
            ("skipped (shape mismatch)", self.skipped),
            ("unexpected", self.unexpected),
            ("missing", self.missing),
        ):
            if keys:
                parts.append(f"{label}: {', '.join(keys)}")
        return "; ".join(parts)


def load_weights(model: nn.Module, state_dict: Mapping[str, Any]) -> LoadReport:
    """Copies every tensor of ``state_dict`` whose name and shape match into ``model``, in place.

    Args:
        model: The model to fill.
        state_dict: A plain state_dict, or a raycv checkpoint ``{"model": state_dict, ...}``. Key prefixes
            added by DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``) are stripped.

    Returns:
        Which keys were loaded, skipped for a shape mismatch, unexpected or missing.

    Raises:
        ValueError: Not a single tensor matches: the checkpoint is of another architecture.
    """
    source = _unwrap_checkpoint(state_dict)
    target = model.state_dict()
    report = LoadReport()
    to_load: dict[str, Any] = {}
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
        elif isinstance(value, Tensor) and value.shape != target[key].shape:
            report.skipped.append(key)
        else:
            report.loaded.append(key)
            to_load[key] = value
    report.missing = [key for key in target if key not in source]
    if not to_load:
        raise ValueError(
            f"None of the {len(source)} checkpoint tensors match the {len(target)} of {type(model).__name__}: "
            "the architecture probably differs. Build the model the checkpoint was trained with. "
            f"Checkpoint keys start with {list(source)[:3]}, model keys with {list(target)[:3]}."
        )
    model.load_state_dict(to_load, strict=False)
    return report


def _unwrap_checkpoint(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    inner = state_dict.get("model")
    if isinstance(inner, Mapping):
        state_dict = inner
    unwrapped = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        unwrapped[key] = value
    return unwrapped


def head_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that produce the logits: the last ``nn.Linear`` in module order.

    Networks without one (SqueezeNet) end with a 1x1 ``nn.Conv2d``: the last conv is the head then. For
    torchvision that is ``fc``, the last layer of ``classifier``, ``heads.head`` or ``head``.

    A model whose head is not that one layer names its head modules in a ``head_modules`` attribute (a tuple
    of names), which wins: raycv's segmenters do, e.g. LR-ASPP's two convs
    ``("classifier.low_classifier", "classifier.high_classifier")``.

    Raises:
        ValueError: ``model`` has neither an ``nn.Linear`` nor an ``nn.Conv2d``.
    """
    declared = getattr(model, "head_modules", None)
    if declared:
        return list(declared)
    for kind in (nn.Linear, nn.Conv2d):
        names = [name for name, module in model.named_modules() if isinstance(module, kind)]
        if names:
            return [names[-1]]
    raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d head.")


def freeze_backbone(model: nn.Module) -> list[str]:
    """Sets ``requires_grad=False`` on every parameter outside :func:`head_module_names`.

    Only ``requires_grad`` changes: BatchNorm layers of the frozen backbone still update their running
    statistics in training mode (call ``.eval()`` on them to freeze those too).

    Returns:
        Names of the parameters left trainable, e.g. ``["fc.weight", "fc.bias"]``.
    """
    heads = head_module_names(model)
    trainable = []
    for name, param in model.named_parameters():
        in_head = any(not head or name.startswith(f"{head}.") for head in heads)
        param.requires_grad_(in_head)
        if in_head:
            trainable.append(name)
    return trainable
