"""Transfer learning: load weights across heads of another size and input band counts, and freeze everything
but the head."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn

# Prefixes that wrappers add to every key: DistributedDataParallel, then torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class Adapted(NamedTuple):
    """One input convolution weight that :func:`load_weights` adapted to the model's band count."""

    name: str  # state_dict key, e.g. "conv1.weight"
    from_channels: int  # the checkpoint's input channels (3 for RGB, 1 for grey)
    to_channels: int  # the model's input channels (bands)


@dataclass
class LoadReport:
    """What :func:`load_weights` did, key by key (state_dict names).

    Every model key is in exactly one of ``loaded``, ``skipped``, ``missing``; every checkpoint key in exactly
    one of ``loaded``, ``skipped``, ``unexpected``.

    Attributes:
        loaded: Keys copied into the model (the ``adapted`` ones included).
        adapted: Input convolution weights loaded through :func:`adapt_input_conv` (another band count), in
            checkpoint order.
        skipped: Keys in both whose shapes differ (e.g. a head with another num_classes); the model keeps its own.
        unexpected: Checkpoint keys the model does not have.
        missing: Model keys the checkpoint does not have; the model keeps its own.
    """

    loaded: list[str] = field(default_factory=list)
    adapted: list[Adapted] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs, e.g. ``"loaded 122 tensors; adapted (input channels): conv1.weight 3->6; skipped
        (shape mismatch): fc.weight, fc.bias"``."""
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.adapted:
            shown = ", ".join(f"{a.name} {a.from_channels}->{a.to_channels}" for a in self.adapted)
            parts.append(f"adapted (input channels): {shown}")
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

    An input convolution of another band count is adapted rather than skipped: a checkpoint weight
    ``[O, 3 or 1, kH, kW]`` for a model conv ``[O, C, kH, kW]`` goes through :func:`adapt_input_conv` when
    that conv takes the image, i.e. has ``groups == 1`` and the ``in_channels`` of the model's first
    ``nn.Conv2d`` (an RGB-pretrained backbone on 4- or 13-band GeoTIFFs keeps its pretrained stem).

    Args:
        model: The model to fill.
        state_dict: A plain state_dict, or a raycv checkpoint ``{"model": state_dict, ...}``. Key prefixes
            added by DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``) are stripped.

    Returns:
        Which keys were loaded (and of those, adapted), skipped for a shape mismatch, unexpected or missing.

    Raises:
        ValueError: Not a single tensor matches: the checkpoint is of another architecture.
    """
    source = _unwrap_checkpoint(state_dict)
    target = model.state_dict()
    report = LoadReport()
    to_load: dict[str, Any] = {}
    input_convs = _input_conv_weights(model)
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
        elif isinstance(value, Tensor) and _adaptable(key, value, target[key], input_convs):
            to_load[key] = adapt_input_conv(value, target[key].shape[1])
            report.loaded.append(key)
            report.adapted.append(Adapted(key, value.shape[1], target[key].shape[1]))
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


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """An input convolution's weight for another number of input channels (bands), by timm's rule.

    timm's ``timm.models._manipulate.adapt_input_conv``, restated so that the rule does not hang on a private
    timm module whose signature has changed between releases (tests compare the two): one channel sums the
    kernels of the source's; any other count repeats them cyclically over the bands (R, G, B, R, G, B, ...)
    and scales them by ``source_channels / in_channels``. So an image whose bands repeat the source's
    channels (or, for one band, a grey image) gives the source conv's output.

    Args:
        weight: [O, I, kH, kW] with I = 3 (RGB) or 1 (grey), any float dtype (kept).
        in_channels: C, the bands of the new input.

    Returns:
        [O, C, kH, kW], a new tensor unless C == I.

    Raises:
        ValueError: ``weight`` is not 4-D, or I is neither 3 nor 1 (no rule maps those to C).
    """
    if weight.ndim != 4 or in_channels < 1:
        raise ValueError(
            f"expected a 4-D conv weight and in_channels >= 1, got {tuple(weight.shape)} and {in_channels}"
        )
    source = weight.shape[1]
    if in_channels == source:
        return weight
    if source not in (1, 3):
        raise ValueError(
            f"cannot adapt a conv weight of {source} input channels to {in_channels}: only 3 (RGB) or 1 (grey) "
            "map to another band count; train the stem from scratch (leave model.weights out) or pick the bands"
        )
    w = weight.float()  # half-precision sums lose bits on the CPU
    if in_channels == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_channels / source), 1, 1)[:, :in_channels] * (source / in_channels)
    return w.to(weight.dtype)


def _input_conv_weights(model: nn.Module) -> set[str]:
    """State_dict keys of the convs that take the image: ``groups == 1`` and the first conv's in_channels."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return set()
    bands = convs[0][1].in_channels
    return {f"{name}.weight" for name, m in convs if m.groups == 1 and m.in_channels == bands}


def _adaptable(key: str, value: Tensor, own: Tensor, input_convs: set[str]) -> bool:
    # Only the channel dimension may differ, and from RGB or grey: anything else is another architecture.
    return (
        key in input_convs
        and value.ndim == own.ndim == 4
        and value.shape[1] != own.shape[1]
        and value.shape[1] in (1, 3)
        and (value.shape[0], *value.shape[2:]) == (own.shape[0], *own.shape[2:])
    )


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
