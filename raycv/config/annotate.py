"""``raycv annotate`` (SPEC §3), its ``model:`` mapping for models from outside raycv included."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from raycv.config.base import StorageConfig, Strict


class TileConfig(Strict):
    size: int = Field(default=1024, ge=32)
    overlap: int = Field(default=128, ge=0)

    @model_validator(mode="after")
    def _overlap_smaller(self) -> TileConfig:
        if self.overlap * 2 >= self.size:
            raise ValueError("tile.overlap must be less than half of tile.size")
        return self


class GeoConfig(Strict):
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


class PreprocessConfig(Strict):
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


class ModelSourceConfig(Strict):
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
            from raycv.models.registry import is_registered

            if not is_registered(self.arch):
                raise ValueError(
                    f"model.arch '{self.arch}' is neither a raycv model (`raycv models`) nor "
                    "torchvision:<builder> nor timm:<name>"
                )
        return self


class AnnotateConfig(Strict):
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
    # Fold each BatchNorm into the convolution before it (inference only; the same outputs within float
    # rounding): resnet18 @ 224 1.1x faster on 2 CPU threads. Classification, segmentation and embeddings;
    # not detectors (torch.fx cannot trace them), nor with explain: gradcam.
    fuse_conv_bn: bool = True
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
