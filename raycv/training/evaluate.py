"""``raycv evaluate``: the metrics of a trained run directory on a labelled dataset, in-process."""

from __future__ import annotations

from typing import Any

import torch

from raycv.config import TrainConfig
from raycv.data.formats import Sample
from raycv.data.loader import BatchLoader
from raycv.models import saved
from raycv.storage import Storage
from raycv.tasks import task_ops


def evaluate(cfg: TrainConfig, split: str = "val") -> dict[str, Any]:
    """Score the model in ``cfg.output.dir`` on the validation split of ``cfg.data`` (or on all of it).

    The split is the one training used (same seed, same ``val_fraction`` or ``data.val``), and so are the
    transforms, so the numbers are comparable with the lines of ``metrics.jsonl``.

    Returns:
        ``{"split", "images", <the task's metrics>, "confusion_matrix"}``.
    """
    from raycv.training.dataset import plan_dataset
    from raycv.training.loop import evaluate_confusion, make_transforms

    store = Storage(endpoint_url=cfg.storage.endpoint_url)
    run = saved.load_run(cfg.output.dir, store)
    plan = plan_dataset(cfg)
    names = run.class_names
    if plan["class_names"][: len(names)] != names[: len(plan["class_names"])]:
        raise ValueError(f"dataset classes {plan['class_names']} differ from the model's {names}")
    rows = plan["val"] if split == "val" else plan["train"] + plan["val"]
    samples = [Sample(*row) for row in rows]
    _, eval_tf = make_transforms(cfg)
    loader = BatchLoader(samples, eval_tf, batch_size=32, store=store, decode_size=cfg.data.size_hw)
    ops = task_ops(cfg.task)
    k = int(run.card["num_classes"])
    cm = evaluate_confusion(run.model, loader, list(range(len(samples))), ops, k, torch.device("cpu"))
    loader.close()
    metrics = {m: (round(v, 6) if isinstance(v, float) else v) for m, v in ops.metrics(cm).items()}
    return {"split": split, "images": len(samples), **metrics, "confusion_matrix": cm.tolist()}
