"""``raycv evaluate``: the metrics of a trained run directory on a labelled dataset, in-process."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raycv import runs
from raycv.config import TrainConfig
from raycv.data.formats import Sample
from raycv.data.loader import BatchLoader
from raycv.data.transforms import normalize, to_tensor_resized
from raycv.tasks import classification as cls_task


def evaluate(cfg: TrainConfig, split: str = "val") -> dict[str, Any]:
    """Score the model in ``cfg.output.dir`` on the validation split of ``cfg.data`` (or all of ``train``).

    The split is the one training used (same seed, same ``val_fraction`` or ``data.val``), so the numbers
    are comparable with the last lines of ``metrics.jsonl``.

    Returns:
        ``{"split", "images", "accuracy", "precision", "recall", "f1", "confusion_matrix"}``.
    """
    from raycv.training import evaluate_confusion, plan_dataset

    ep = cfg.storage.endpoint_url
    run = runs.load_run(cfg.output.dir, ep)
    plan = plan_dataset(cfg)
    names = run.class_names
    if plan["class_names"][: len(names)] != names[: len(plan["class_names"])]:
        raise ValueError(f"dataset classes {plan['class_names']} differ from the model's {names}")
    items = plan["val"] if split == "val" else plan["train"] + plan["val"]
    samples = [Sample(u, lb) for u, lb in items]
    norm = run.card["normalization"]
    size = run.size_hw

    def tf(image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        return normalize(to_tensor_resized(image, size), tuple(norm["mean"]), tuple(norm["std"]))

    loader = BatchLoader(samples, tf, batch_size=64, endpoint_url=ep)
    k = int(run.card["num_classes"])
    cm = evaluate_confusion(run.model, loader, list(range(len(samples))), k, torch.device("cpu"))
    loader.close()
    metrics = {k2: round(v, 6) for k2, v in cls_task.metrics_from_confusion(cm).items()}
    return {"split": split, "images": len(samples), **metrics, "confusion_matrix": cm.tolist()}
