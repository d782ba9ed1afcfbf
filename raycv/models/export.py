"""``raycv export-model``: a trained run as one portable file (ONNX, ``torch.export`` or TorchScript) + its card.

The output folder holds ``model.onnx`` / ``model.pt2`` / ``model.ts`` and ``model.json``: the run's card plus
``"export": {"format", "file", ...}``; ``model: DIR`` in an annotate config runs it
(:func:`raycv.models.portable.load_model_file`).

Conventions of the exported file (the input is normalised as the card's ``normalization`` says):

- classifiers and segmenters: ``[N, C, H, W]`` float32 -> ``[N, K]`` logits or ``[N, K, H, W]`` scores, the
  batch dimension dynamic (and H, W where the model allows).
- detectors and instance segmenters: ONE image ``[C, H, W]`` (any size) -> ``(boxes [N, 4] (x1, y1, x2, y2)
  in input pixels, labels [N] int64 in 1..K, scores [N][, masks [N, 1, H, W] probabilities])``. The
  detector's own score threshold is baked in at :data:`EXPORT_SCORE_THRESHOLD`, low, so that annotate's
  ``score_threshold`` and NMS (applied after) see every detection the run directory would give.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from raycv import storage
from raycv.errors import ConfigError, RaycvError
from raycv.models import portable, saved
from raycv.models.registry import get_model_info
from raycv.storage import Storage

EXPORT_SCORE_THRESHOLD = 0.001
EXPORT_MAX_DETECTIONS = 10_000
FILES = {fmt: f"model{ext}" for fmt, ext in portable.FORMATS.items()}


class OneImage(nn.Module):
    """A torchvision-style detector called on one image: ``[C, H, W]`` -> ``[boxes, labels, scores(, masks)]``."""

    def __init__(self, model: nn.Module, masks: bool) -> None:
        super().__init__()
        self.model = model
        self.masks = masks

    def forward(self, image: Tensor) -> list[Tensor]:
        if torch.jit.is_scripting():  # a scripted torchvision detector returns (losses, detections)
            det = self.model([image])[1][0]
        else:
            det = self.model([image])[0]
        out = [det["boxes"], det["labels"], det["scores"]]
        if self.masks:
            out.append(det["masks"])
        return out


def export_model(run_dir: str, fmt: str, out: str, store: Storage, *, objects: bool) -> str:
    """Exports the model of ``run_dir`` to ``out`` (a folder, local or ``s3://``); returns the model file's URI.

    Args:
        fmt: ``onnx``, ``pt2`` or ``torchscript``.
        objects: the run is a detector (the one-image convention of the module docstring).

    Raises:
        ConfigError: an unknown format, or a model that cannot be exported to it (the registry says why).
        RaycvError: the export failed for a reason the registry does not record.
    """
    if fmt not in FILES:
        raise ConfigError("--format", fmt, f"Choose one of {', '.join(FILES)}.")
    card = saved.read_card(run_dir, store)
    note = get_model_info(card["arch"]).export_notes.get(fmt)
    if note:
        raise ConfigError("--format", fmt, f"{card['arch']} cannot be exported to {fmt}: {note}")
    run = saved.load_run(run_dir, store)
    size = card["image_size"]
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    extra: dict[str, Any] = {}
    if objects:
        extra = _lower_thresholds(run.model)
    try:
        data = export_module(run.model, fmt, (int(card.get("in_channels", 3)), h, w), objects=objects)
    except Exception as exc:  # a model the registry does not know to fail yet: say which, and what failed
        raise RaycvError(
            f"{card['arch']} could not be exported to {fmt} ({type(exc).__name__}: {str(exc)[:300]}); "
            f"try another --format"
        ) from exc
    uri = storage.join(out, FILES[fmt])
    store.write_bytes(uri, data)
    exported = {
        **card,
        "preprocess": card.get("preprocess") or {"resize": [h, w], "crop": None},
        "export": {"format": fmt, "file": FILES[fmt], "from_run": run_dir, **extra},
    }
    store.write_json(storage.join(out, saved.MODEL_CARD), exported)
    return uri


def _lower_thresholds(model: nn.Module) -> dict[str, Any]:
    """Lowers the detector's own score threshold (annotate applies its own after) and says what is baked in."""
    baked: dict[str, Any] = {}
    for part in (model, getattr(model, "roi_heads", None)):
        if part is not None and hasattr(part, "score_thresh"):
            part.score_thresh = EXPORT_SCORE_THRESHOLD
            baked["score_threshold"] = EXPORT_SCORE_THRESHOLD
        if part is not None and hasattr(part, "nms_thresh"):
            baked["nms_threshold"] = float(part.nms_thresh)  # type: ignore[arg-type]
        if part is not None and hasattr(part, "detections_per_img"):
            # torchvision keeps the first detections_per_img of its NMS output, which is in score order in torch
            # but grouped by class in ONNX's NonMaxSuppression: with the low threshold above, an ONNX export cut
            # there dropped high-scoring boxes of later classes. Export keeps them all; the actor applies the
            # model's own cap after its score threshold and NMS (card: max_detections).
            baked["max_detections"] = int(part.detections_per_img)  # type: ignore[arg-type]
            part.detections_per_img = EXPORT_MAX_DETECTIONS
    return baked


def export_module(model: nn.Module, fmt: str, chw: tuple[int, int, int], *, objects: bool) -> bytes:
    """The bytes of ``model`` (eval mode) exported to ``fmt``; ``chw`` is an example input's shape."""
    model = model.eval().cpu()
    if objects:
        has_masks = hasattr(getattr(model, "roi_heads", None), "mask_predictor") and bool(
            getattr(model.roi_heads, "mask_predictor", None)
        )
        module: nn.Module = OneImage(model, masks=has_masks).eval()
        example: Tensor = torch.rand(*chw)
    else:
        module, example = model, torch.rand(2, *chw)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, FILES[fmt])
        if fmt == "torchscript":
            _torchscript(module, example, path, objects=objects)
        elif fmt == "pt2":
            torch.export.save(_program(module, example, objects=objects), path)
        else:
            _onnx(module, example, path, objects=objects)
        with open(path, "rb") as f:
            return f.read()


def _dims(objects: bool) -> list[dict[int, Any]]:
    """Dynamic dims: H, W (min 33: 32 specialises in torch.export) and, for batches, N."""
    hw = {-2: torch.export.Dim("h", min=33, max=4096), -1: torch.export.Dim("w", min=33, max=4096)}
    if objects:
        return [{1: hw[-2], 2: hw[-1]}, {}]
    return [
        {0: torch.export.Dim("batch", min=1, max=1024), 2: hw[-2], 3: hw[-1]},
        {0: torch.export.Dim("batch", min=1, max=1024)},
    ]


def _program(module: nn.Module, example: Tensor, *, objects: bool) -> Any:
    """``torch.export`` with dynamic dims, falling back to a fixed H, W (models with a fixed grid)."""
    last: Exception | None = None
    for dims in _dims(objects):
        try:
            return torch.export.export(module, (example,), dynamic_shapes=(dims,), strict=False)
        except Exception as exc:
            last = exc
    raise RuntimeError(f"torch.export failed: {last}") from last


def _torchscript(module: nn.Module, example: Tensor, path: str, *, objects: bool) -> None:
    """Scripted (data-dependent control flow survives: detectors) or, failing that, traced (fixed H, W)."""
    try:
        scripted = torch.jit.script(module)
    except Exception:
        if objects:
            raise
        with torch.no_grad():
            scripted = torch.jit.trace(module, (example,))
    torch.jit.save(scripted, path)


def _onnx(module: nn.Module, example: Tensor, path: str, *, objects: bool) -> None:
    """torch.onnx's exporter from the ``torch.export`` program, weights inside the file; a detector, whose
    data-dependent shapes ``torch.export`` cannot trace, through TorchScript's (torchvision's ONNX path)."""
    if not objects:
        program = _program(module, example, objects=objects)
        torch.onnx.export(program, (example,), path, dynamo=True, external_data=False, optimize=True)
        return
    names = ["boxes", "labels", "scores", "masks"][: 4 if getattr(module, "masks", False) else 3]
    with warnings.catch_warnings():  # the legacy exporter, on purpose: the new one cannot trace detectors
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based", DeprecationWarning)
        _legacy_onnx(module, example, path, names)


def _legacy_onnx(module: nn.Module, example: Tensor, path: str, names: list[str]) -> None:
    torch.onnx.export(
        module,
        (example,),
        path,
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=names,
        dynamic_axes={"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in names}},
    )
