"""What every model replica shares: the model on its device, its card and normalisation, the common columns."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import torch

from raycv import outputs, runs
from raycv.data.transforms import normalize


def error_fields(stage: str, exc: BaseException) -> tuple[str, str, str]:
    """(error_stage, error_type, error_message) for one image's failure."""
    return stage, type(exc).__name__, str(exc)[:2000]


class _Annotator:
    """Shared set-up: the model on its device, its card, its normalisation, the output schema."""

    def __init__(
        self, run_dir: str, endpoint_url: str | None, run_id: str, threads: int, use_gpu: bool
    ) -> None:
        torch.set_num_threads(
            max(1, threads)
        )  # Ray sets OMP threads, but a reused worker keeps its old count
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.endpoint_url = endpoint_url
        self.run = runs.load_run(run_dir, endpoint_url, self.device)
        norm = self.run.card.get("normalization", {})
        self.mean = tuple(norm.get("mean", (0.0, 0.0, 0.0)))
        self.std = tuple(norm.get("std", (1.0, 1.0, 1.0)))
        self.run_id = run_id
        self.task = self.run.card["task"]
        self.schema = outputs.images_schema(self.task)

    def _forward(self, pixels: np.ndarray) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> the model's output (logits) for the normalised batch, float32 on the CPU."""
        x = (
            torch.from_numpy(np.ascontiguousarray(pixels))
            .to(self.device)
            .permute(0, 3, 1, 2)
            .float()
            .div_(255.0)
        )
        with torch.inference_mode():
            return self.run.model(normalize(x, self.mean, self.std)).float().cpu()

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


def _window_reader(image: np.ndarray) -> Any:
    """``read(y0, x0, h, w)`` over an image already in memory (formats without windowed reads)."""
    return lambda y0, x0, h, w: image[y0 : y0 + h, x0 : x0 + w]


def _incoming_errors(batch: dict[str, np.ndarray]) -> list[tuple[str, str, str] | None]:
    return [
        (str(s), str(t), str(m)) if s else None
        for s, t, m in zip(batch["error_stage"], batch["error_type"], batch["error_message"], strict=True)
    ]
