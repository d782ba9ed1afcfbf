"""The Task registry: one :class:`Task` object per task, the only place that knows what a task is.

Code outside ``raycv/tasks/`` never compares a task name: it looks the Task up (:func:`get_task`) and asks
it. A task is registered by the module that defines it (``register_task(MyTask())``); the built-in ones are
imported on the first look-up, so a task defined anywhere else (a test, a plug-in) registers the same way.
A run hands its Task object to its Ray workers and actors (pickled with its module), so they need no
registry of their own.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import torch
    from torch import nn

    from raycv.data.loader import Transform

_BUILTIN_MODULES = (
    "raycv.tasks.classification",
    "raycv.tasks.segmentation",
    "raycv.tasks.detection",
    "raycv.tasks.embedding",
)
_TASKS: dict[str, Task] = {}

OBJECT_FIELDS = (
    pa.field("label", pa.int32()),
    pa.field("label_name", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in original-image pixels
    pa.field("mask_rle_size", pa.list_(pa.int32())),  # [h, w]; null for plain detection
    pa.field("mask_rle_counts", pa.string()),  # COCO compressed RLE; null for plain detection
)
OBJECTS_TYPE = pa.list_(pa.struct(list(OBJECT_FIELDS)))
# A task that finds objects stages them with its image rows; the commit splits them into OUTPUT/objects.
STAGED_OBJECTS = (pa.field("objects", OBJECTS_TYPE),)

LOSS_IS_SEGMENTATION_ONLY = "train.loss applies to semantic_segmentation only (detectors compute their own)"
MIXUP_IS_CLASSIFICATION_ONLY = "train.augment.mixup applies to classification only; set it to 0"


@dataclass(frozen=True)
class StepContext:
    """What a training step needs besides the model and the batch."""

    device: Any
    num_classes: int
    rng: np.random.Generator
    augment: Any  # the config's train.augment (mixup, label_smoothing, ...)
    loss: str = "ce"  # the config's train.loss (segmentation)


class Evaluator(Protocol):
    """Validation of one epoch: ``update`` with this rank's batches, ``compute`` over every rank."""

    def update(self, model: nn.Module, images: Any, targets: Any) -> None: ...

    def compute(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(metrics, extras for the model card, e.g. the confusion matrix); collective: every rank calls it."""
        ...


class Task:
    """What the rest of raycv asks of a task. Subclass it, set the attributes, implement the hooks, and
    register one instance with :func:`register_task`.

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
        warmup_epochs, clip_grad_norm: the defaults of ``train.warmup_epochs`` / ``train.clip_grad_norm``.
        find_unused_parameters: DDP must not wait for gradients of heads a batch may skip.
        decode_at_size: training images may be decoded at reduced size (transforms resize whole images).
        embeds: its rows hold a feature vector (``embedding``): a classifier annotates as it with its
            head removed.
        annotator: ``"module:Class"`` of its model actor (a callable class of Ray Data, see
            :mod:`raycv.annotation.actor`).
    """

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    image_fields: ClassVar[tuple[pa.Field, ...]] = ()
    image_labels: ClassVar[bool] = False
    label_maps: ClassVar[bool] = False
    objects: ClassVar[bool] = False
    instance_masks: ClassVar[bool] = False
    unit_pixels: ClassVar[bool] = False
    export_formats: ClassVar[tuple[str, ...]] = ("coco", "geojson")
    warmup_epochs: ClassVar[float] = 0.0
    clip_grad_norm: ClassVar[float | None] = None
    find_unused_parameters: ClassVar[bool] = False
    decode_at_size: ClassVar[bool] = False
    embeds: ClassVar[bool] = False
    annotator: ClassVar[str | None] = None

    @property
    def default_format(self) -> str:
        return self.formats[0]

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def read_dataset(self, fmt: str, root: str, store: Any, num_classes: int | None) -> Any:
        """List a labelled dataset (no decoding): an object with ``samples`` and ``class_names``."""
        raise NotImplementedError

    def load_target(self, sample: Any, fetch: Callable[[str], bytes]) -> Any:
        """The training target of a listed sample (``fetch`` reads a URI's bytes); default: its label."""
        return sample.label

    def transforms(
        self, size_hw: tuple[int, int], augment: Any, bands: int = 3
    ) -> tuple[Transform, Transform]:
        """The (train, eval) transforms from decoded images ([H, W, bands] uint8) and sample targets to model
        inputs. ``bands`` is the model's ``in_channels``; a task whose ``transforms`` does not take it (as
        tasks written before N-band inputs) is called without it and serves RGB models only."""
        raise NotImplementedError

    def transforms_for(
        self, size_hw: tuple[int, int], augment: Any, bands: int
    ) -> tuple[Transform, Transform]:
        """:meth:`transforms` for a model of ``bands`` input bands (``bands`` passed only when not 3)."""
        if bands == 3:
            return self.transforms(size_hw, augment)
        return self.transforms(size_hw, augment, bands)

    def takes_bands(self) -> bool:
        """Whether :meth:`transforms` takes ``bands`` (N-band models), or RGB only."""
        import inspect

        return "bands" in inspect.signature(self.transforms).parameters

    def collate(self, items: list[tuple[Any, Any]]) -> tuple[Any, Any]:
        """A batch from transformed (input, target) pairs: ``([B, C, H, W] inputs, targets)``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, images: Any, targets: Any, ctx: StepContext) -> torch.Tensor:
        """The batch's training loss (a scalar tensor), the batch already on ``ctx.device``."""
        raise NotImplementedError

    def evaluator(self, num_classes: int, device: Any) -> Evaluator:
        raise NotImplementedError

    def check_train_config(self, cfg: Any) -> str | None:
        """A problem with a training config for this task, as "field: why and the fix", or None."""
        return None


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry; a second task of the same name is an error."""
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is registered already")
    _TASKS[task.name] = task
    from raycv.models.registry import allow_task  # here: the registry itself stays free of torch

    allow_task(task.name)
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
