"""What every model replica shares: the model on its device, its card and normalisation, the common columns."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from raycv.annotation import source as model_source
from raycv.annotation.source import ModelSource
from raycv.data.images import DEFAULT_MAX_PIXELS
from raycv.data.transforms import normalize
from raycv.errors import ConfigError
from raycv.outputs import schema as outputs
from raycv.storage import Storage

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: str) -> None:
    """Refuse fp16 off CUDA: CPU kernels for it are slow or missing; bf16 is the CPU's reduced precision."""
    if precision == "fp16" and device != "cuda":
        raise ConfigError(
            "precision",
            precision,
            f"fp16 runs on CUDA GPUs only and this actor runs on {device}: use precision: bf16 (or fp32) "
            "on CPU, or give the actors a GPU (gpus_per_actor: 1).",
        )


def autocast(device: str, precision: str) -> Any:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32).

    Autocast, not a model cast to half: numerically sensitive ops (softmax, norms, losses) stay in fp32.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=_AUTOCAST_DTYPES[precision])


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights: tensor cores and oneDNN run convolutions without layout conversions."""
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm that follows a convolution (or a linear layer) folded into its weights,
    for inference: the same outputs (within float rounding, ~1e-6) from one layer instead of two, e.g.
    resnet18 @ 224 on 2 CPU threads 1.1x faster (README). ``torch.fx`` traces the model; one it cannot trace
    (data-dependent control flow) is returned as it is. The fused model shares the weights of ``model``, which
    must not be used afterwards (its convolutions are fused, its BatchNorms are not). Eval mode only."""
    from torch.fx.experimental.optimization import fuse

    if model.training or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        return fuse(model, inplace=True)
    except Exception as exc:  # a trace error of any kind: the model runs unfused, as without the option
        log.debug("conv-BatchNorm fusion skipped: %s: %s", type(exc).__name__, exc)
        return model


@dataclass(frozen=True, kw_only=True)
class ActorSpec:
    """What a model actor is built from: one per run, the same for every actor (Ray pickles it to each).

    Attributes:
        model: the model to load (:mod:`raycv.annotation.source`: a raycv run or export, or a foreign model),
            or the URI of a run or export directory.
        store: the run's storage handle.
        run_id: written in every row.
        threads: torch threads of the actor (its CPUs).
        use_gpu: run on CUDA when the actor has a GPU.
        precision, channels_last, compile, fuse_conv_bn: speed options (see :class:`Annotator`).
        batch_size: images per forward pass (tiles of a large image, or whole images).
        max_pixels: the decompression-bomb limit of a decoded image.
        tile: ``{"size", "overlap"}`` for large images, or None.
        geo: GeoTIFF options (bands, scale, write_rasters) of segmentation outputs.
        output: the annotation output (segmentation writes rasters beside the rows).
        topk, explain: classification: the top-k classes, and "gradcam" heatmaps.
        score_threshold, iou_threshold: detection: the scores kept and the NMS overlap.
    """

    model: ModelSource | str
    store: Storage
    run_id: str
    threads: int = 1
    use_gpu: bool = False
    precision: Precision = "fp32"
    channels_last: bool = True
    compile: bool = False
    fuse_conv_bn: bool = True
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    tile: dict[str, int] | None = None
    geo: dict[str, Any] = field(default_factory=dict)
    output: str = ""
    topk: int = 5
    explain: str | None = None
    score_threshold: float = 0.25
    iou_threshold: float = 0.5


class _CompiledOrEager:
    """Calls ``torch.compile(model)``; if compiling fails (on the first call), warns and runs eager."""

    def __init__(self, model: nn.Module) -> None:
        self.eager = model
        self.compiled: Any = torch.compile(model)
        self.worked = False

    def __call__(self, x: Any) -> Any:
        if self.compiled is not None:
            try:
                out = self.compiled(x)
                self.worked = True
                return out
            except Exception as exc:
                if self.worked:  # it compiled before: this is the input's or the model's error
                    raise
                log.warning(
                    "torch.compile failed (%s: %s); running the model eagerly", type(exc).__name__, exc
                )
                self.compiled = None
        return self.eager(x)


class Annotator:
    """Shared set-up: the model on its device, its card, its normalisation, the output schema.

    GPU speed options (also valid on CPU, except fp16): ``precision`` bf16/fp16 runs the forward pass
    under autocast, ``channels_last`` stores weights and inputs NHWC, ``compile`` wraps the model in
    ``torch.compile`` (compiled at the first batch; if that fails the actor warns and runs eagerly);
    ``fuse_conv_bn`` folds BatchNorms into the convolutions before them (:func:`fuse_conv_bn`), for the
    annotators whose ``fuses`` is True, and not with Grad-CAM (``explain``), which hooks the model's layers.
    ``store`` reads the run directory here, and whatever the annotator reads or writes later (GeoTIFF
    windows, COGs): Ray pickles it into each actor.
    """

    # What the read stage ships: "pixels" decoded and resized to the model's input by the read tasks, or the
    # files' encoded "bytes" (decoded here, at the original resolution).
    reads: ClassVar[Literal["pixels", "bytes"]] = "bytes"
    skip_geotiff: ClassVar[bool] = False  # GeoTIFFs are read here, window by window, not by the read tasks
    fuses: ClassVar[bool] = True  # the model may be conv-BatchNorm fused (fuse_conv_bn)

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        # Ray sets OMP threads, but a reused worker keeps its old count.
        torch.set_num_threads(max(1, spec.threads))
        self.device = "cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu"
        check_precision(spec.precision, self.device)
        self.precision = spec.precision
        self.store = spec.store
        source = spec.model
        if isinstance(source, str):
            source = model_source.resolve(source, spec.store)
        self.source = source
        self.run = model_source.load(source, spec.store, self.device)
        self.preprocess = source.preprocess
        torch_module = isinstance(self.run.model, nn.Module) and not isinstance(
            self.run.model, torch.jit.ScriptModule
        )
        if spec.fuse_conv_bn and self.fuses and torch_module and not spec.explain:
            self.run.model = fuse_conv_bn(self.run.model)  # before channels_last: fusing makes new weights
        self.channels_last = spec.channels_last and torch_module
        if self.channels_last:
            to_channels_last(self.run.model)
        # What the batches go through; self.run.model stays the eager module (Grad-CAM needs its hooks).
        compiled = spec.compile and torch_module
        self.model: Any = _CompiledOrEager(self.run.model) if compiled else self.run.model
        norm = self.run.card.get("normalization", {})
        self.mean = tuple(norm.get("mean", (0.0, 0.0, 0.0)))
        self.std = tuple(norm.get("std", (1.0, 1.0, 1.0)))
        self.run_id = spec.run_id
        self.task = self.run.card["task"]
        self.schema = outputs.images_schema(self.task)

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> [B, 3, H, W] float in 0..1 on the model's device."""
        return (
            torch.from_numpy(np.ascontiguousarray(pixels))
            .to(self.device)
            .permute(0, 3, 1, 2)
            .float()
            .div_(255.0)
        )

    def _forward(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The model's output (logits), float32 on the CPU, for a batch: [B, H, W, 3] uint8, or [B, 3, H, W]
        float in 0..1 already on the device (decoded there); an object array of images of several sizes
        runs one forward pass per size. A ``{"out": ...}`` output (torchvision's segmenters) gives "out"."""
        if isinstance(pixels, np.ndarray) and pixels.dtype == object:
            return self._forward_ragged(list(pixels))
        x = pixels if isinstance(pixels, torch.Tensor) else self._to_device(pixels)
        x = normalize(x, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self.model(x)
        if isinstance(out, dict):
            out = out["out"]
        return out.float().cpu()  # type: ignore[no-any-return]

    def _forward_ragged(self, images: list[np.ndarray]) -> Any:
        """Images of several sizes: a forward pass per size, outputs back in order (stacked when they have
        one shape, e.g. logits, else a list, e.g. score maps)."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(im.shape, []).append(i)
        outs: list[Any] = [None] * len(images)
        for idx in by_shape.values():
            for i, o in zip(idx, self._forward(np.stack([images[i] for i in idx])), strict=True):
                outs[i] = o
        return torch.stack(outs) if len({o.shape for o in outs}) == 1 else outs

    def _common(
        self, batch: dict[str, np.ndarray], errors: list[tuple[str, str, str] | None]
    ) -> dict[str, list]:
        n = len(errors)
        now = dt.datetime.now(dt.timezone.utc)
        return {
            "image_id": [str(v) for v in batch["image_id"]],
            "image_uri": [str(v) for v in batch["image_uri"]],
            "frame": _optional_ints(batch.get("frame"), n),
            "frame_count": _optional_ints(batch.get("frame_count"), n),
            "source_etag": [str(v) or None for v in batch["source_etag"]],
            "status": ["error" if e else "ok" for e in errors],
            "error_stage": [e[0] if e else None for e in errors],
            "error_type": [e[1] if e else None for e in errors],
            "error_message": [e[2] if e else None for e in errors],
            "task": [self.task] * n,
            "model_id": [self.run.model_id] * n,
            "run_id": [self.run_id] * n,
            "annotated_at": [now] * n,
            "crs": [None] * n,
            "transform": [None] * n,
        }


def _optional_ints(values: np.ndarray | None, n: int) -> list[int | None]:
    """The read stage's int columns (-1 = none, e.g. ``frame`` of a single image) as nullable ints."""
    return [None] * n if values is None else [int(v) if v >= 0 else None for v in values]


def window_reader(image: np.ndarray) -> Any:
    """``read(y0, x0, h, w)`` over an image already in memory (formats without windowed reads)."""
    return lambda y0, x0, h, w: image[y0 : y0 + h, x0 : x0 + w]


def incoming_errors(batch: dict[str, np.ndarray]) -> list[tuple[str, str, str] | None]:
    return [
        (str(s), str(t), str(m)) if s else None
        for s, t, m in zip(batch["error_stage"], batch["error_type"], batch["error_message"], strict=True)
    ]
