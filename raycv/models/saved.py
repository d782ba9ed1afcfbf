"""A saved raycv model (SPEC §5): a folder with ``model.pt`` and the ``model.json`` card that rebuilds it."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raycv import storage
from raycv.errors import ConfigError
from raycv.storage import Storage

MODEL_CARD = "model.json"
WEIGHTS = "model.pt"
METRICS = "metrics.jsonl"


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


def read_card(run_dir: str, store: Storage) -> dict[str, Any]:
    """The model card of a run directory.

    Raises:
        ConfigError: when ``run_dir`` holds no ``model.json`` (not a finished ``raycv train`` run).
    """
    uri = storage.join(run_dir, MODEL_CARD)
    try:
        return json.loads(store.read_bytes(uri))  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise ConfigError(
            "model", run_dir, f"No {MODEL_CARD} there: point it at an output.dir written by `raycv train`."
        ) from None


def load_run(run_dir: str, store: Storage, device: str = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory from its card and load ``model.pt`` into it (eval mode)."""
    from raycv.models import create_model

    card = read_card(run_dir, store)
    data = store.read_bytes(storage.join(run_dir, WEIGHTS))
    size = card["image_size"]
    # A run trained on N bands has in_channels both in its options and in the card: pass it once.
    options = {"in_channels": int(card.get("in_channels", 3)), **card.get("options", {})}
    model = create_model(
        card["arch"],
        num_classes=int(card["num_classes"]),
        image_size=size if isinstance(size, int) else int(size[0]),
        **options,
    )
    model.load_state_dict(load_state_dict(data, run_dir))
    model.to(device).eval()
    return LoadedRun(model=model, card=card, model_id=model_id_of(data))
