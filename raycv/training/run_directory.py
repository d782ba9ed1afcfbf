"""The run directory a training run writes (SPEC §5): ``metrics.jsonl``, ``model.json``, ``model.pt`` and
the plots, refreshed by rank 0 after every epoch."""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
from typing import TYPE_CHECKING, Any

import torch

from raycv import storage
from raycv.models.saved import METRICS, MODEL_CARD, model_id_of
from raycv.storage import Storage
from raycv.tasks.registry import get_task

if TYPE_CHECKING:
    from raycv.config import TrainConfig
    from raycv.models.transfer import LoadReport

log = logging.getLogger(__name__)


def save_weights(uri: str, state_dict: dict[str, torch.Tensor], store: Storage | None = None) -> str:
    """Write a state_dict (plain tensors, loadable with ``weights_only=True``); returns its model_id.

    ``store`` defaults to the environment's (``AWS_ENDPOINT_URL``), as for every file a test or script writes.
    """
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    data = buf.getvalue()
    (store or Storage()).write_bytes(uri, data)
    return model_id_of(data)


def write_metrics(run_dir: str, history: list[dict[str, Any]], store: Storage | None = None) -> None:
    """Rewrite ``metrics.jsonl`` from the full history: a resumed run never repeats an epoch line."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    (store or Storage()).write_bytes(storage.join(run_dir, METRICS), text.encode())


def first_conv_adapted(report: LoadReport) -> dict[str, Any] | None:
    """The card's record of an input conv that :func:`~raycv.models.load_weights` adapted to the bands, e.g.
    ``{"layer": "conv1.weight", "from_channels": 3, "to_channels": 6}``; the first one (the stem) if several,
    None if none."""
    if not report.adapted:
        return None
    first = report.adapted[0]
    return {"layer": first.name, "from_channels": first.from_channels, "to_channels": first.to_channels}


def write_run_dir(cfg: TrainConfig, info: dict[str, Any], record: dict[str, Any]) -> None:
    """What rank 0 writes after every epoch (SPEC §5): metrics.jsonl, model.json, curves.png (+ confusion.png).

    ``info`` is the planned dataset (class names, image counts); ``record`` holds ``history``, ``best``
    (epoch, metrics, confusion), ``resumed_at_epochs`` and, when ``model.weights`` had another band count,
    ``first_conv_adapted`` (:func:`first_conv_adapted`). The weights are written by the loop itself.
    """
    from raycv.config import config_to_dict
    from raycv.data.transforms import IMAGENET_MEAN, IMAGENET_STD, per_band

    run_dir, store = cfg.output.dir, Storage(endpoint_url=cfg.storage.endpoint_url)
    write_metrics(run_dir, record["history"], store)
    best = record["best"]
    if best is None:  # no epoch with a finite loss yet: no weights worth a model card
        return
    bands = int(cfg.model.options.get("in_channels", 3))
    card = {
        "task": cfg.task,
        "arch": cfg.model.arch,
        "options": cfg.model.options,
        "num_classes": info["num_classes"],
        "class_names": info["class_names"],
        "image_size": cfg.data.image_size,
        "in_channels": bands,
        # Detectors take 0..1 pixels (torchvision's normalise inside); the others ImageNet-normalised ones,
        # repeated over the bands as adapt_input_conv repeats the RGB kernels.
        "normalization": {"mean": [0.0] * bands, "std": [1.0] * bands}
        if get_task(cfg.task).unit_pixels
        else {"mean": list(per_band(IMAGENET_MEAN, bands)), "std": list(per_band(IMAGENET_STD, bands))},
        # e.g. {"layer": "conv1.weight", "from_channels": 3, "to_channels": 6}: RGB weights on N bands
        **({"first_conv_adapted": record["first_conv_adapted"]} if record.get("first_conv_adapted") else {}),
        "raycv_version": importlib.metadata.version("raycv"),
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
    store.write_json(storage.join(run_dir, MODEL_CARD), card)
    try:  # curves.png (and confusion.png), refreshed every epoch; a drawing problem never stops training
        from raycv.outputs.report import write_plots

        write_plots(run_dir, card, record["history"], store)
    except Exception as exc:
        log.warning("could not draw the training curves: %s", exc)
