"""Training run directories (SPEC §5): the model card, the weights, and loading them back."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raycv import storage
from raycv.errors import ConfigError

if TYPE_CHECKING:
    from raycv.config import TrainConfig

log = logging.getLogger(__name__)
MODEL_CARD = "model.json"
WEIGHTS = "model.pt"
METRICS = "metrics.jsonl"


def save_weights(uri: str, state_dict: dict[str, torch.Tensor], endpoint_url: str | None = None) -> str:
    """Write a state_dict (plain tensors, loadable with ``weights_only=True``); returns its model_id."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    data = buf.getvalue()
    storage.write_bytes(uri, data, endpoint_url)
    return model_id_of(data)


def model_id_of(weights: bytes) -> str:
    """The model's identity in outputs: a hash of the bytes of ``model.pt``."""
    return hashlib.sha256(weights).hexdigest()[:16]


def load_state_dict(data: bytes, uri: str = "") -> dict[str, torch.Tensor]:
    """Weights from the bytes of a raycv ``model.pt``, a raycv checkpoint or a torchvision state_dict.

    Loaded with ``weights_only=True``: a file that needs arbitrary unpickling is refused, never executed.
    """
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{uri or 'weights'} is not a torch state_dict loadable with weights_only=True: {exc}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{uri or 'weights'} holds a {type(obj).__name__}, not a state_dict")
    return obj


def write_json(uri: str, obj: Any, endpoint_url: str | None = None) -> None:
    storage.write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), endpoint_url)


def write_metrics(run_dir: str, history: list[dict[str, Any]], endpoint_url: str | None = None) -> None:
    """Rewrite ``metrics.jsonl`` from the full history: a resumed run never repeats an epoch line."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    storage.write_bytes(storage.join(run_dir, METRICS), text.encode(), endpoint_url)


def is_better(row: dict[str, Any], best: dict[str, Any] | None, primary: str) -> bool:
    """Whether the epoch of metrics ``row`` beats ``best`` (the best epoch's metrics so far, or None).

    An epoch whose train loss or ``primary`` metric is NaN/inf, or that diverged, is never best; the first
    finite epoch is; after that only a strictly higher ``primary`` wins (a tie keeps the earlier epoch).
    """
    loss, value = row.get("train_loss"), row.get(primary)
    if row.get("diverged") or not _finite(loss) or not _finite(value):
        return False
    return best is None or float(value) > float(best[primary])  # type: ignore[arg-type]


def best_of(history: list[dict[str, Any]], primary: str) -> dict[str, Any] | None:
    """The best epoch's row of ``history`` by :func:`is_better`, or None when no epoch qualifies."""
    best: dict[str, Any] | None = None
    for row in history:
        if is_better(row, best, primary):
            best = row
    return best


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@dataclass
class LoadedRun:
    """A trained model ready for inference, with its card and identity."""

    model: nn.Module
    card: dict[str, Any]
    model_id: str

    @property
    def class_names(self) -> list[str]:
        return list(self.card["class_names"])

    @property
    def size_hw(self) -> tuple[int, int]:
        s = self.card["image_size"]
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))


def read_card(run_dir: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """The model card of a run directory.

    Raises:
        ConfigError: when ``run_dir`` holds no ``model.json`` (not a finished ``raycv train`` run).
    """
    uri = storage.join(run_dir, MODEL_CARD)
    try:
        return json.loads(storage.read_bytes(uri, endpoint_url))  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise ConfigError(
            "model", run_dir, f"No {MODEL_CARD} there: point it at an output.dir written by `raycv train`."
        ) from None


def load_run(run_dir: str, endpoint_url: str | None = None, device: str = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory from its card and load ``model.pt`` into it (eval mode)."""
    from raycv.models import create_model

    card = read_card(run_dir, endpoint_url)
    data = storage.read_bytes(storage.join(run_dir, WEIGHTS), endpoint_url)
    size = card["image_size"]
    model = create_model(
        card["arch"],
        num_classes=int(card["num_classes"]),
        in_channels=int(card.get("in_channels", 3)),
        image_size=size if isinstance(size, int) else int(size[0]),
        **card.get("options", {}),
    )
    model.load_state_dict(load_state_dict(data, run_dir))
    model.to(device).eval()
    return LoadedRun(model=model, card=card, model_id=model_id_of(data))


def write_run_dir(cfg: TrainConfig, info: dict[str, Any], record: dict[str, Any]) -> None:
    """What rank 0 writes after every epoch (SPEC §5): metrics.jsonl, model.json, curves.png (+ confusion.png).

    ``info`` is the planned dataset (class names, image counts); ``record`` holds ``history``, ``best``
    (epoch, metrics, confusion) and ``resumed_at_epochs``. The weights are written by the loop itself.
    """
    import raycv
    from raycv.config import config_to_dict
    from raycv.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from raycv.training_detection import DETECTION_TASKS

    run_dir, ep = cfg.output.dir, cfg.storage.endpoint_url
    write_metrics(run_dir, record["history"], ep)
    best = record["best"]
    if best is None:  # no epoch with a finite loss yet: no weights worth a model card
        return
    card = {
        "task": cfg.task,
        "arch": cfg.model.arch,
        "options": cfg.model.options,
        "num_classes": info["num_classes"],
        "class_names": info["class_names"],
        "image_size": cfg.data.image_size,
        "in_channels": 3,
        # Detectors take 0..1 pixels (torchvision's normalise inside); the others ImageNet-normalised ones.
        "normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}
        if cfg.task in DETECTION_TASKS
        else {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "raycv_version": raycv.__version__,
        "torch_version": torch.__version__,
        "best_epoch": best["epoch"],
        "best_metrics": best["metrics"],
        # classification: the best epoch's validation confusion matrix, rows = true class (confusion.png)
        **({"best_confusion": best["confusion"]} if "confusion" in best else {}),
        "train_images": info["n_train"],
        "val_images": info["n_val"],
        "resumed_at_epochs": record["resumed_at_epochs"],
        "config": config_to_dict(cfg),
    }
    write_json(storage.join(run_dir, MODEL_CARD), card, ep)
    try:  # curves.png (and confusion.png), refreshed every epoch; a drawing problem never stops training
        from raycv.report import write_plots

        write_plots(run_dir, card, record["history"], ep)
    except Exception as exc:
        log.warning("could not draw the training curves: %s", exc)
