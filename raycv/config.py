"""The train and annotate configs of SPEC §3 as pydantic models, YAML loading and ``--set`` overrides.

Every model forbids unknown keys; :func:`load_config` turns any validation failure into one
:class:`~raycv.errors.ConfigError` naming the field, the value that came and the fix.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from raycv.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Strict):
    endpoint_url: str | None = None


class ModelConfig(_Strict):
    arch: str = "resnet18"
    num_classes: int | None = Field(default=None, ge=1)
    weights: str | None = None
    freeze_backbone: bool = False
    options: dict[str, Any] = {}  # extra builder arguments, e.g. {depth: 3, base_channels: 16} for unet

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        from raycv.models import list_models

        known = list_models()
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f"Did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown model. {hint}Run `raycv models` to list the registered names")
        return value


class DataConfig(_Strict):
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


class AugmentConfig(_Strict):
    hflip: float = Field(default=0.5, ge=0.0, le=1.0)
    vflip: float = Field(default=0.0, ge=0.0, le=1.0)
    rotate: float = Field(default=0.0, ge=0.0, le=180.0)
    color_jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    mixup: float = Field(default=0.0, ge=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    crop_scale: float = Field(default=1.0, gt=0.0, le=1.0)  # segmentation: random crop of this..1 of the area


class TrainParams(_Strict):
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


class ScalingConfig(_Strict):
    # "auto": sized from the cluster when the run starts (raycv.training.loop.size_workers): one worker per
    # GPU, else one per ~8 CPUs sharing every CPU; numbers are kept as given.
    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: Annotated[float, Field(gt=0.0)] | Literal["auto"] = "auto"


class OutputConfig(_Strict):
    dir: str
    max_failures: int = Field(default=2, ge=0)


class TrainConfig(_Strict):
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

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from raycv.tasks.registry import get_task

        get_task(value)  # raises, naming the registered tasks
        return value

    @model_validator(mode="after")
    def _task_supported(self) -> TrainConfig:
        from raycv.models import get_model_info, list_models
        from raycv.tasks.registry import get_task

        task = get_task(self.task)
        if not task.formats:  # an annotation-only task
            raise ValueError(f"task {self.task!r}: {task.check_train_config(self)}")
        info = get_model_info(self.model.arch)
        if self.model.arch not in list_models(task=self.task):
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


class TileConfig(_Strict):
    size: int = Field(default=1024, ge=32)
    overlap: int = Field(default=128, ge=0)

    @model_validator(mode="after")
    def _overlap_smaller(self) -> TileConfig:
        if self.overlap * 2 >= self.size:
            raise ValueError("tile.overlap must be less than half of tile.size")
        return self


class GeoConfig(_Strict):
    """How geo-referenced rasters (GeoTIFF) are read and written."""

    bands: list[int] | None = None  # 1-based band indices, e.g. [3, 2, 1]; default: the first three
    scale: Literal["dtype", "minmax"] | list[tuple[float, float]] = "dtype"  # to 8 bits: per-band (lo, hi)
    write_rasters: bool = False  # also write each label map as a COG under OUTPUT/rasters/

    @field_validator("bands")
    @classmethod
    def _one_based(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError("bands are 1-based band numbers, e.g. [3, 2, 1]")
        return value


_ANNOTATE_TASKS = "classification, semantic_segmentation, detection, instance_segmentation or embedding"


class PreprocessConfig(_Strict):
    """How images become a foreign model's input: resize, centre crop, pixels / 255, then mean/std.

    ``resize``: an int resizes the shorter side to it (torchvision's ``Resize(int)``), ``[h, w]`` resizes
    exactly; null keeps the image's size. Left out, each comes from the weights' metadata
    (``torchvision_weights``, a timm model's pretrained config) or the task's default.
    """

    resize: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    @field_validator("resize", "crop")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        sizes = [value] if isinstance(value, int) else list(value or [])
        if any(v < 1 for v in sizes):
            raise ValueError("sizes are positive pixel counts: an int, or [height, width]")
        return value

    @model_validator(mode="after")
    def _same_lengths(self) -> PreprocessConfig:
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("preprocess.mean and preprocess.std need one value per channel each")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("preprocess.std values must be positive")
        return self


class ModelSourceConfig(_Strict):
    """``model:`` of ``raycv annotate`` as a mapping: a raycv run, or a model from outside raycv.

    Exactly one of ``run`` (a run or export directory), ``arch`` (with ``weights`` or
    ``torchvision_weights``) or ``file`` (TorchScript, ``torch.export`` ``.pt2`` or ONNX).
    """

    task: str | None = None
    run: str | None = None
    arch: str | None = None
    weights: str | None = None
    file: str | None = None
    classes: list[str] | str | None = None
    torchvision_weights: str | None = None
    num_classes: int | None = Field(default=None, ge=1)
    in_channels: int = Field(default=3, ge=1)
    preprocess: PreprocessConfig = PreprocessConfig()

    @field_validator("task")
    @classmethod
    def _annotatable(cls, value: str | None) -> str | None:
        from raycv.tasks.registry import get_task

        if value is not None and get_task(value).annotator is None:
            raise ValueError(f"task '{value}' cannot annotate; use {_ANNOTATE_TASKS}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSourceConfig:
        given = [k for k in ("run", "arch", "file") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"model needs exactly one of run, arch (with weights) or file; got {given or 'none'}"
            )
        if self.run is None and self.task is None:
            raise ValueError(f"model.task is required for a model from outside raycv: {_ANNOTATE_TASKS}")
        if self.arch and not (self.weights or self.torchvision_weights):
            raise ValueError(
                f"model.arch '{self.arch}' needs weights: a state_dict (.pt/.pth) or .safetensors URI "
                "in model.weights, or model.torchvision_weights (e.g. ResNet50_Weights.IMAGENET1K_V2)"
            )
        if self.weights and not self.arch:
            raise ValueError("model.weights needs model.arch, the architecture they belong to")
        if self.torchvision_weights and not (self.arch or "").startswith("torchvision:"):
            raise ValueError(
                "model.torchvision_weights needs model.arch: torchvision:<builder> (e.g. torchvision:resnet50)"
            )
        if self.arch and ":" not in self.arch:
            from raycv.models import list_models

            if self.arch not in list_models():
                raise ValueError(
                    f"model.arch '{self.arch}' is neither a raycv model (`raycv models`) nor "
                    "torchvision:<builder> nor timm:<name>"
                )
        return self


class AnnotateConfig(_Strict):
    """``raycv annotate``."""

    model: str | ModelSourceConfig  # a run or export directory, or a mapping (ModelSourceConfig)
    input: str | list[str]
    output: str
    batch_size: int = Field(default=32, gt=0)
    # The model stage: "auto" sizes it from the cluster (raycv.annotation.sizing: GPUs first, else the CPUs
    # that decoding does not need); numbers are kept as given.
    actors: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    gpus_per_actor: Annotated[float, Field(ge=0.0)] | Literal["auto"] = "auto"
    cpus_per_actor: Annotated[float, Field(gt=0.0)] | Literal["auto"] = "auto"
    # Speed options of the model actors: autocast precision (fp16 needs a GPU; bf16 also runs on CPU),
    # NHWC weights and inputs, torch.compile at the first batch (warns and runs eagerly if it fails).
    # channels_last is on by default: oneDNN's CPU convolutions and tensor cores prefer NHWC (measured on
    # CPU, one thread: resnet18/50, U-Net, DeepLabV3, YOLO 1.2-1.35x faster, no CNN here slower; README).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = True
    compile: bool = False
    # Classification: where images are decoded and resized. "tasks": the CPU read tasks, which ship pixels
    # to the actors; "actor": the read tasks ship the encoded files and the model actor decodes them on its
    # device (JPEGs with nvJPEG on a GPU, see raycv.annotation.decode). Segmentation and detection actors
    # always decode (at full resolution, on their CPU).
    decode: Literal["tasks", "actor"] = "tasks"
    tile: TileConfig | None = None
    score_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    incremental: bool = True
    topk: int = Field(default=5, ge=1)
    # Classification: also write each ok row's Grad-CAM heatmap (`gradcam_png`, see raycv.models.gradcam).
    explain: Literal["gradcam"] | None = None
    max_pixels: int = Field(default=178_956_970, gt=0)
    # Rows per output Parquet file (fewer when the rows are large, e.g. masks: files stay under 128 MB).
    rows_per_file: int = Field(default=8192, ge=1)
    # Stop (exit 1) once more than this fraction of at least 32 images failed; 1.0 never stops.
    max_error_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    geo: GeoConfig = GeoConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("must be a prefix, a glob, a list of URIs or a manifest (.txt/.csv/.parquet)")
        return value

    @field_validator("precision")
    @classmethod
    def _fp16_on_gpu(cls, value: str, info: ValidationInfo) -> str:
        if value == "fp16" and info.data.get("gpus_per_actor", "auto") == 0:
            raise ValueError(
                "fp16 runs on CUDA GPUs only and gpus_per_actor is 0 (CPU actors): use precision: bf16 "
                "(or fp32) on CPU, or set gpus_per_actor: 1"
            )
        return value


# ---------------------------------------------------------------------------------------------- loading


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    if "=" not in assignment:
        raise ConfigError(
            "--set", assignment, "Write overrides as key.path=value, e.g. --set train.epochs=3."
        )
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError("--set", assignment, "The key before '=' is empty; e.g. --set train.epochs=3.")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(key, child, f"'{part}' is not a section, so '{key}' cannot be set.")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("CONFIG", str(path), "Pass the path of an existing YAML config file.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("CONFIG", str(path), f"Fix the YAML syntax: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("CONFIG", type(data).__name__, "The file must hold a mapping of keys (YAML dict).")
    return data


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if (isinstance(data, dict) and part in data) or (
            isinstance(data, list | tuple) and isinstance(part, int) and part < len(data)
        ):
            data = data[part]
        else:
            return None
    return data


def _fix_for(err: Any, model_cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        section: Any = model_cls
        for part in loc[:-1]:
            field = getattr(section, "model_fields", {}).get(part)
            ann = getattr(field, "annotation", None)
            section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        allowed = sorted(getattr(section, "model_fields", {}))
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"Did you mean '{close[0]}'? " if close else ""
        return f"Unknown key. {hint}Allowed keys here: {', '.join(allowed)}."
    if kind == "missing":
        return "This key is required; add it to the config or pass --set " + ".".join(map(str, loc)) + "=..."
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return msg[0].upper() + msg[1:] + ("" if msg.endswith(".") else ".")


def _to_config_error(exc: ValidationError, model_cls: type[BaseModel], data: dict[str, Any]) -> ConfigError:
    err = exc.errors()[0]
    # Union members add their own names to the location (e.g. 'int' / 'tuple[int, int]'); keep config keys.
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in {"int", "str"})))
    if not loc:  # a cross-field check: its message starts with the field it is about ("model.arch ...")
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        head = msg.split(" ", 1)[0]
        if "." in head:
            loc = tuple(head.split("."))
            err = {**err, "msg": msg}
    field = ".".join(str(p) for p in loc) or "CONFIG"
    value = _lookup(data, loc) if err["type"] != "missing" else None
    return ConfigError(field, value, _fix_for(err, model_cls, loc))


def build_config(model_cls: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate ``data`` into ``model_cls``; the first problem becomes a :class:`ConfigError`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise _to_config_error(exc, model_cls, data) from None


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, kind: Literal["train", "annotate"] = "train"
) -> TrainConfig | AnnotateConfig:
    """Read a YAML config, apply ``--set`` overrides and validate it.

    Raises:
        ConfigError: naming the field, the value and the fix for the first problem found.
    """
    data = _read_yaml(path)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return build_config(TrainConfig if kind == "train" else AnnotateConfig, data)  # type: ignore[no-any-return]


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """A JSON-ready dict of a config (for model cards and summaries)."""
    return cfg.model_dump(mode="json")
