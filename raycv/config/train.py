"""``raycv train`` / ``raycv evaluate`` (SPEC §3)."""

from __future__ import annotations

import difflib
import inspect
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from raycv.config.base import StorageConfig, Strict


class ModelConfig(Strict):
    arch: str = "resnet18"
    num_classes: int | None = Field(default=None, ge=1)
    weights: str | None = None
    freeze_backbone: bool = False
    options: dict[str, Any] = Field(
        default_factory=dict
    )  # extra builder arguments, e.g. {depth: 3, base_channels: 16} for unet

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        from raycv.models import list_models
        from raycv.models.registry import is_registered

        if not is_registered(value):  # raycv's own models are found without importing torchvision
            known = list_models()
            close = difflib.get_close_matches(value, known, n=1)
            hint = f"Did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown model. {hint}Run `raycv models` to list the registered names")
        return value


class DataConfig(Strict):
    train: str
    val: str | None = None
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    format: str | None = None  # one of the task's formats (SPEC §4); default: its first
    image_size: int | tuple[int, int] = 64

    @field_validator("train")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a dataset path or URI (a local folder, file:// or s3://)")
        return value

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        sides = (value,) if isinstance(value, int) else value
        if any(s < 8 for s in sides):
            raise ValueError("each side must be at least 8 pixels")
        return value

    @property
    def size_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))


class AugmentConfig(Strict):
    hflip: float = Field(default=0.5, ge=0.0, le=1.0)
    vflip: float = Field(default=0.0, ge=0.0, le=1.0)
    rotate: float = Field(default=0.0, ge=0.0, le=180.0)
    color_jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    mixup: float = Field(default=0.0, ge=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    crop_scale: float = Field(default=1.0, gt=0.0, le=1.0)  # segmentation: random crop of this..1 of the area


class TrainParams(Strict):
    epochs: int = Field(default=10, gt=0)
    batch_size: int = Field(default=32, gt=0)
    # One optimiser step (and one DDP gradient all-reduce) every this many batches: the effective batch is
    # batch_size x grad_accum_steps x num_workers (raycv.training.step.GradientAccumulation).
    grad_accum_steps: int = Field(default=1, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(default=0.001, gt=0.0)
    weight_decay: float = Field(default=0.0001, ge=0.0)
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    # Linear lr warmup (from 0.001 x lr, per step) over these epochs, and max gradient norm (0: off); None:
    # by task, 1 and 10 for detection and instance segmentation, else 0 and off (the task's defaults, raycv.tasks).
    warmup_epochs: float | None = Field(default=None, ge=0.0)
    clip_grad_norm: float | None = Field(default=None, ge=0.0)
    amp: bool = True
    seed: int = 0
    loss: Literal["ce", "dice", "ce+dice"] = "ce"  # segmentation; classification always uses cross-entropy
    augment: AugmentConfig = AugmentConfig()


class ScalingConfig(Strict):
    # "auto": sized from the cluster when the run starts (raycv.training.loop.size_workers): one worker per
    # GPU, else one per ~8 CPUs sharing every CPU; numbers are kept as given.
    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: Annotated[float, Field(gt=0.0)] | Literal["auto"] = "auto"


class OutputConfig(Strict):
    dir: str
    max_failures: int = Field(default=2, ge=0)


class TrackingConfig(Strict):
    """Every run writes TensorBoard event files to RUN_DIR/tensorboard/; MLflow when mlflow_uri is set."""

    mlflow_uri: str | None = None  # e.g. file:///tmp/mlruns or http://mlflow:5000
    experiment: str = "raycv"


class TrainConfig(Strict):
    """``raycv train`` / ``raycv evaluate``."""

    task: str = (
        "classification"  # a registered task (raycv.tasks): classification, semantic_segmentation, ...
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig
    train: TrainParams = TrainParams()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    output: OutputConfig
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from raycv.tasks.registry import get_task

        get_task(value)  # raises, naming the registered tasks
        return value

    @model_validator(mode="after")
    def _task_supported(self) -> TrainConfig:
        from raycv.models import get_model_info
        from raycv.models.registry import is_registered
        from raycv.tasks.registry import get_task

        task = get_task(self.task)
        if not task.formats:  # an annotation-only task
            raise ValueError(f"task {self.task!r}: {task.check_train_config(self)}")
        info = get_model_info(self.model.arch)
        if not is_registered(self.model.arch, task=self.task):
            raise ValueError(
                f"model.arch '{self.model.arch}' is a {info.task} model but task is '{self.task}'; "
                f"pick one from `raycv models --task {self.task}`"
            )
        if self.data.format is not None and self.data.format not in task.formats:
            raise ValueError(
                f"data.format '{self.data.format}' is not a dataset format of {self.task}: "
                f"use {' or '.join(task.formats)} (or leave it out for {task.default_format})"
            )
        problem = task.check_train_config(self)
        if problem:
            raise ValueError(problem)
        try:
            inspect.signature(info.builder).bind(num_classes=1, **self.model.options)
        except TypeError as exc:
            raise ValueError(
                f"model.options {self.model.options} do not fit '{self.model.arch}': {exc}"
            ) from None
        bands = self.model.options.get("in_channels", 3)
        if bands != 3 and not task.takes_bands():
            raise ValueError(
                f"model.options.in_channels {bands}: task '{self.task}' reads RGB images only (its transforms "
                "take no bands); use in_channels 3"
            )
        if bands != 3 and self.train.augment.color_jitter:
            raise ValueError(
                f"train.augment.color_jitter {self.train.augment.color_jitter} changes RGB colours and "
                f"model.options.in_channels is {bands}: set color_jitter: 0 (flips and rotations work on "
                "any bands)"
            )
        if min(self.data.size_hw) < info.min_input_size:
            raise ValueError(
                f"data.image_size {self.data.image_size} is below the {info.min_input_size} px that "
                f"'{self.model.arch}' needs; raise data.image_size or pick a smaller-input model"
            )
        return self

    @property
    def data_format(self) -> str:
        from raycv.tasks.registry import get_task

        return self.data.format or get_task(self.task).default_format
