"""Portable model files: TorchScript (``.ts``), ``torch.export`` programs (``.pt2``) and ONNX (``.onnx``).

:func:`load_model_file` turns one into a callable with the calling convention of a torch model in eval
mode: a ``[N, C, H, W]`` float batch gives ``[N, K]`` logits (or ``[N, K, H, W]`` scores, or ``[N, D]``
features); a detector is called with a list of ``[C, H, W]`` images and gives torchvision's list of
``{boxes, labels, scores[, masks]}``. ONNX models run in ONNX Runtime (CPU execution provider; CUDA's when
onnxruntime-gpu and a GPU are present), batched like the torch path.

Detector files, in every format, take ONE image ``[C, H, W]`` per call and return ``(boxes [N, 4], labels
[N], scores [N][, masks [N, 1, H, W]])`` (``raycv export-model``'s convention, and torchvision's ONNX
export); a TorchScript file of a whole torchvision detector (``torch.jit.script(model)``, which takes the
list of images and returns ``(losses, detections)``) loads too.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch

from raycv.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = {"torchscript": ".ts", "pt2": ".pt2", "onnx": ".onnx"}
_DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks")


def format_of(uri: str) -> str:
    """``torchscript``, ``pt2`` or ``onnx`` from a file name (``.ts``/``.pt``/``.jit``, ``.pt2``, ``.onnx``)."""
    lower = uri.lower()
    if lower.endswith(".onnx"):
        return "onnx"
    if lower.endswith(".pt2"):
        return "pt2"
    if lower.endswith((".ts", ".pt", ".pth", ".jit", ".torchscript")):
        return "torchscript"
    raise ConfigError(
        "model.file", uri, "Give a TorchScript (.ts/.pt), torch.export (.pt2) or ONNX (.onnx) file."
    )


def load_model_file(data: bytes, uri: str, device: str = "cpu", *, objects: bool = False) -> Any:
    """The model in ``data`` (the bytes of ``uri``) ready for inference on ``device``.

    Args:
        objects: a detector (torchvision's list-of-images convention).

    Raises:
        ConfigError: the file is not a model of the format its name says.
    """
    fmt = format_of(uri)
    if fmt != "onnx":
        # torchvision's C++ ops (torchvision::nms, roi_align), which TorchScript and exported detectors call,
        # are registered by importing torchvision (raycv.models no longer does for its own models).
        import torchvision  # noqa: F401
    try:
        if fmt == "onnx":
            return OnnxModel(data, device, objects=objects)
        if fmt == "pt2":
            program = torch.export.load(io.BytesIO(data))
            module = program.module()
            if objects:
                return _Detections(module, one_image=_first_input_is_a_tensor(program))
            return module.to(device)
        module = torch.jit.load(io.BytesIO(data), map_location=device)
        module.eval()
        if objects:
            args = module.forward.schema.arguments  # (self, images or image)
            return _Detections(module, one_image=len(args) > 1 and str(args[1].type) == "Tensor")
        return module
    except ConfigError:
        raise
    except Exception as exc:
        hints = {
            "torchscript": " A .pt holding a state_dict goes in model.weights, with model.arch.",
            "onnx": " The file must hold its weights (torch.onnx.export(..., external_data=False)).",
        }
        hint = hints.get(fmt, "")
        raise ConfigError(
            "model.file", uri, f"Not a loadable {fmt} model ({type(exc).__name__}: {exc}).{hint}"[:600]
        ) from None


def _first_input_is_a_tensor(program: Any) -> bool:
    """Whether an exported program's first argument is one tensor (not a list of images)."""
    args_spec = program.call_spec.in_spec.children_specs[0]  # ((args), {kwargs})
    return bool(args_spec.children_specs[0].is_leaf())


class _Detections:
    """A detector file called like torchvision's detectors: a list of images in, a list of dicts out.

    ``one_image``: the file takes one image and returns ``(boxes, labels, scores[, masks])``; else it takes
    the list (a scripted torchvision detector, which returns ``(losses, detections)``).
    """

    def __init__(self, module: Any, *, one_image: bool = False) -> None:
        self.module = module
        self.one_image = one_image

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if self.one_image:
            return [dict(zip(_DETECTION_OUTPUTS, self.module(image), strict=False)) for image in images]
        out = self.module(images)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):
            out = out[1]
        return out  # type: ignore[no-any-return]


class OnnxModel:
    """An ONNX model in an ONNX Runtime session, called like the torch model it was exported from."""

    def __init__(self, data: bytes, device: str = "cpu", *, objects: bool = False, threads: int = 0) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(data, sess_options=options, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.objects = objects

    def __call__(self, x: Any) -> Any:
        if self.objects:
            return [self._detect(image) for image in x]
        out = self.session.run(None, {self.input: _numpy(x)})
        return torch.from_numpy(np.asarray(out[0]))

    def _detect(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        arrays = self.session.run(None, {self.input: _numpy(image)})
        named = {n.split(".")[0].lower(): a for n, a in zip(self.outputs, arrays, strict=True)}
        if not set(_DETECTION_OUTPUTS[:3]) <= set(named):  # unnamed outputs: torchvision's order
            named = dict(zip(_DETECTION_OUTPUTS, arrays, strict=False))
        return {k: torch.from_numpy(np.asarray(v)) for k, v in named.items() if k in _DETECTION_OUTPUTS}


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().contiguous().numpy()
