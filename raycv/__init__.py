"""raycv: distributed training and bulk annotation of large image archives on Ray.

The public surface is small; everything else is internal. Heavy modules (torch, ray) load on first use.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

try:
    __version__ = importlib.metadata.version("raycv")
except importlib.metadata.PackageNotFoundError:
    __version__ = "0+source"  # a checkout on PYTHONPATH, not installed (the GPU machine's image, gpu.sh)
__all__ = [
    "annotate",
    "create_model",
    "evaluate",
    "list_models",
    "load_config",
    "train",
]


def load_config(path: str, overrides: list[str] | None = None, *, kind: str = "train") -> Any:
    """Read, override and validate a YAML config (see :func:`raycv.config.load_config`)."""
    from raycv.config import load_config as _load

    return _load(path, overrides, kind=kind)  # type: ignore[arg-type]


def train(cfg: Any, address: str | None = None) -> Any:
    """Train on Ray and write the run directory (see :func:`raycv.training.loop.run_training`)."""
    from raycv.training.loop import run_training

    return run_training(cfg, address)


def annotate(cfg: Any, address: str | None = None) -> Any:
    """Annotate an archive into Parquet (see :func:`raycv.annotation.pipeline.run_annotation`)."""
    from raycv.annotation.pipeline import run_annotation

    return run_annotation(cfg, address)


def evaluate(cfg: Any) -> dict[str, Any]:
    """Metrics of a trained run on a labelled dataset (see :func:`raycv.training.evaluate.evaluate`)."""
    from raycv.training.evaluate import evaluate as _evaluate

    return _evaluate(cfg)


def create_model(name: str, **kwargs: Any) -> Any:
    from raycv.models import create_model as _create

    return _create(name, **kwargs)


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    from raycv.models import list_models as _list

    return _list(pattern, task)
