"""The Task registry: one :class:`Task` object per task, the only place that knows what a task is.

Code outside ``raycv/tasks/`` never compares a task name: it looks the Task up (:func:`get_task`) and asks
it. A task is registered by the module that defines it (``register_task(Task(...))``); the built-in ones are
imported on the first look-up, so a task defined anywhere else (a test, a plug-in) registers the same way.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

import pyarrow as pa

_BUILTIN_MODULES = ("raycv.tasks.classification", "raycv.tasks.segmentation", "raycv.tasks.detection")
_TASKS: dict[str, Task] = {}


@dataclass(frozen=True, kw_only=True)
class Task:
    """What the rest of raycv asks of a task.

    Attributes:
        name: the config's ``task:`` value.
        formats: the dataset formats it trains from (SPEC §4); the first is the default.
        primary_metric: the validation metric that picks the best epoch (higher is better).
        metrics: the validation metrics of ``metrics.jsonl``, in the order curves.png draws them.
        image_fields: the columns it adds to ``OUTPUT/images`` after the common ones.
        image_labels: a row holds one label per image (``label``, ``label_name``, ``score``).
        label_maps: a row holds a per-pixel label map (``mask_png``, ``class_pixels``).
        objects: it writes one row per detected object to ``OUTPUT/objects``.
        instance_masks: its objects carry a mask (COCO RLE); plain boxes otherwise.
        unit_pixels: its models take 0..1 pixels and normalise inside (torchvision's detectors).
        export_formats: the ``raycv export`` formats its outputs convert to.
    """

    name: str
    formats: tuple[str, ...]
    primary_metric: str
    metrics: tuple[str, ...]
    image_fields: tuple[pa.Field, ...] = ()
    image_labels: bool = False
    label_maps: bool = False
    objects: bool = False
    instance_masks: bool = False
    unit_pixels: bool = False
    export_formats: tuple[str, ...] = ("coco", "geojson")

    @property
    def default_format(self) -> str:
        return self.formats[0]


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry; a second task of the same name is an error."""
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is registered already")
    _TASKS[task.name] = task
    return task


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_tasks() -> list[str]:
    """The registered task names, built-in ones first."""
    _load_builtins()
    return list(_TASKS)


def get_task(name: str) -> Task:
    """The registered task ``name``.

    Raises:
        ValueError: an unknown name, with the closest registered one.
    """
    _load_builtins()
    try:
        return _TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_TASKS), n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"Unknown task {name!r}. {hint}Use one of {', '.join(_TASKS)}.") from None
