"""One registry of model builders, keyed by name, for every task.

Builders register themselves with :func:`register_model` when their module is imported. ``raycv.models``
imports raycv's own classifiers and segmenters at once and names the modules that need torchvision (its
architectures, the detectors, YOLO) with :func:`register_later`: importing torchvision costs ~1.5 s a process
(it imports ``torch._dynamo``), which a worker running a raycv model should not pay. They are imported on the
first lookup of a name not registered yet, and before any listing, so every name is found as before.
:func:`create_model` validates the common arguments and calls the builder; every builder of a task takes the
same keyword-only arguments, e.g. ``(*, num_classes, in_channels=3, image_size=None)``.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from torch import nn

from raycv.errors import UnknownModelError

# Model names by task, for the tasks models can be registered for: the built-in ones, and any that
# raycv.tasks.register_task adds (allow_task).
_BY_TASK: dict[str, set[str]] = {
    t: set() for t in ("classification", "semantic_segmentation", "detection", "instance_segmentation")
}
TASKS = _BY_TASK.keys()  # a live view: the task names models can be registered for
SOURCES: tuple[str, ...] = ("raycv", "torchvision")

Builder = Callable[..., nn.Module]


def allow_task(name: str) -> None:
    """Let models be registered for the task ``name`` (called when the task is registered)."""
    _BY_TASK.setdefault(name, set())


B = TypeVar("B", bound=Builder)


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model.

    Attributes:
        name: Registry name, e.g. ``"resnet18"``.
        task: One of :data:`TASKS`.
        builder: Keyword-only function that returns a freshly initialised ``nn.Module``.
        source: ``"raycv"`` for raycv's own architectures, ``"torchvision"`` for wrapped torchvision ones.
        min_input_size: Smallest square side, in pixels, that a forward accepts (measured). Most models accept
            every side from there up; a few fixed-grid ones (ViT, MaxViT) accept only multiples of it, which
            their ``description`` says.
        description: One line for ``raycv models``.
        export_notes: Why the model cannot be exported to a format (``raycv export-model``), by format
            (``onnx``, ``pt2``, ``torchscript``); a format not named here exports.
    """

    name: str
    task: str
    builder: Builder
    source: Literal["raycv", "torchvision"]
    min_input_size: int
    description: str
    export_notes: dict[str, str] = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}
_LATER: list[str] = []  # modules that register more models when imported (register_later)
_IMPORTING: set[str] = set()  # those of them being imported now


def register_later(*modules: str) -> None:
    """Names modules whose models are registered when first needed: on the lookup of a name not registered yet
    (:func:`get_model_info`, :func:`create_model`) or before a listing (:func:`list_models`)."""
    _LATER.extend(m for m in modules if m not in _LATER)


def _register_the_rest() -> None:
    while _LATER:
        module = _LATER.pop(0)  # first: a registration from elsewhere during this import finds the rest
        _IMPORTING.add(module)
        try:
            importlib.import_module(module)
        except BaseException:
            _LATER.insert(0, module)  # tried again on the next lookup, with the same error if it persists
            raise
        finally:
            _IMPORTING.discard(module)


def register_model(
    name: str,
    *,
    task: str,
    source: Literal["raycv", "torchvision"] = "raycv",
    min_input_size: int = 32,
    description: str = "",
    export_notes: dict[str, str] | None = None,
) -> Callable[[B], B]:
    """Decorator that adds a builder to the registry under ``name``.

    Args:
        name: Unique registry name.
        task: One of :data:`TASKS`.
        source: ``"raycv"`` or ``"torchvision"``.
        min_input_size: Smallest square input side, in pixels, the model accepts.
        description: One line for listings; defaults to the first line of the builder's docstring.
        export_notes: Format -> why the model cannot be exported to it (see :class:`ModelInfo`).

    Returns:
        The decorator; it returns the builder unchanged.

    Raises:
        ValueError: ``name`` is already registered, or ``task``, ``source`` or ``min_input_size`` is invalid.
    """
    of_task = _BY_TASK.get(task)
    if of_task is None:
        raise ValueError(f"Unknown task {task!r} for model {name!r}. Use one of {', '.join(_BY_TASK)}.")
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r} for model {name!r}. Use one of {', '.join(SOURCES)}.")
    if min_input_size < 1:
        raise ValueError(f"min_input_size of model {name!r} must be >= 1, got {min_input_size}.")

    def decorator(builder: B) -> B:
        if builder.__module__ not in _LATER and builder.__module__ not in _IMPORTING:
            _register_the_rest()  # a name taken by a module registered later is a duplicate here too
        if name in _REGISTRY:
            previous = _REGISTRY[name].builder
            raise ValueError(
                f"Model {name!r} is already registered by {previous.__module__}.{previous.__qualname__}. "
                "Register it under another name."
            )
        doc = (inspect.getdoc(builder) or "").strip()
        _REGISTRY[name] = ModelInfo(
            name=name,
            task=task,
            builder=builder,
            source=source,
            min_input_size=min_input_size,
            description=description or doc.split("\n", 1)[0],
            export_notes=dict(export_notes or {}),
        )
        of_task.add(name)
        return builder

    return decorator


def get_model_info(name: str) -> ModelInfo:
    """Returns the registry entry of ``name``.

    Raises:
        UnknownModelError: ``name`` is not registered; the message suggests the closest name.
    """
    if not is_registered(name):
        raise UnknownModelError(_unknown_model_message(name))
    return _REGISTRY[name]


def is_registered(name: str, task: str | None = None) -> bool:
    """Whether ``name`` is a registered model (of ``task``, unless None); like :func:`get_model_info`, this
    registers the models of :func:`register_later` only on a miss."""
    if name not in _REGISTRY:
        _register_the_rest()
    return name in _BY_TASK.get(task, ()) if task is not None else name in _REGISTRY


def _unknown_model_message(name: str) -> str:
    matches = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=1)
    if not matches:
        return f"Unknown model {name!r}. Run `raycv models` to list them."
    task = _REGISTRY[matches[0]].task
    return (
        f"Unknown model {name!r}. Did you mean {matches[0]!r}? Run `raycv models --task {task}` to list them."
    )


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Names of the registered models, sorted.

    Args:
        pattern: Shell-style wildcard matched case-sensitively against the name, e.g. ``"*resnet*"``.
        task: Keep only the models of this task (one of :data:`TASKS`); ``None`` keeps all.

    Raises:
        ValueError: ``task`` is not one of :data:`TASKS`.
    """
    _register_the_rest()
    names = _REGISTRY.keys() if task is None else _BY_TASK.get(task)
    if names is None:
        raise ValueError(f"Unknown task {task!r}. Use one of {', '.join(_BY_TASK)}.")
    return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds a freshly initialised model (never downloads weights).

    Args:
        name: Registry name, see :func:`list_models`.
        num_classes: Number of output classes; classifiers return logits ``[N, num_classes]``.
        in_channels: Channels C of the input ``[N, C, H, W]``.
        image_size: Side of the square training images. Passed to builders that take it (ViT, MaxViT); for the others
            it is only checked against ``min_input_size``.
        **kwargs: Extra builder-specific arguments.

    Returns:
        The model, in training mode.

    Raises:
        UnknownModelError: ``name`` is not registered.
        ValueError: An argument is out of range or the model does not support it.
    """
    info = get_model_info(name)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    if image_size is not None:
        _check_positive_int("image_size", image_size)
        if image_size < info.min_input_size:
            raise ValueError(
                f"image_size={image_size} is too small for {name!r}, which needs at least "
                f"{info.min_input_size} px. Resize the images to >= {info.min_input_size} or pick another model."
            )
        if _accepts(info.builder, "image_size"):
            kwargs["image_size"] = image_size
    if _accepts(info.builder, "in_channels"):
        kwargs["in_channels"] = in_channels
    elif in_channels != 3:
        raise ValueError(f"Model {name!r} takes 3-channel input only, got in_channels={in_channels}.")
    return info.builder(num_classes=num_classes, **kwargs)


def _accepts(builder: Builder, argument: str) -> bool:
    parameters = inspect.signature(builder).parameters.values()
    return any(p.name == argument or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _check_positive_int(argument: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be an integer >= 1, got {value!r}.")


def print_models(pattern: str = "*", task: str | None = None) -> None:
    """``raycv models``: the registry as a table, with the formats each model exports to and why not."""
    names = list_models(pattern, task=task)
    width = max((len(n) for n in names), default=4)
    print(f"{'name':<{width}}  {'task':<22} {'source':<12} {'min_size':<9} exports to")
    notes = []
    for name in names:
        info = get_model_info(name)
        formats = ",".join(f for f in ("onnx", "pt2", "torchscript") if f not in info.export_notes)
        print(f"{name:<{width}}  {info.task:<22} {info.source:<12} {info.min_input_size:<9} {formats or '-'}")
        notes += [f"  {name} -> {fmt}: {why}" for fmt, why in info.export_notes.items()]
    print(f"\n{len(names)} models")
    if notes:
        print("cannot be exported (raycv export-model):", *notes, sep="\n")
