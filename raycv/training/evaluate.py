"""``raycv evaluate``: the metrics of a trained run directory on a labelled dataset, in-process."""

from __future__ import annotations

from typing import Any

import torch

from raycv.config import TrainConfig
from raycv.data.loader import BatchLoader
from raycv.models import saved
from raycv.storage import Storage
from raycv.tasks.registry import get_task
from raycv.training.checkpoint import round_floats
from raycv.training.epoch import validate


def evaluate(cfg: TrainConfig, split: str = "val") -> dict[str, Any]:
    """Score the model in ``cfg.output.dir`` on the validation split of ``cfg.data`` (or on all of it).

    The split is the one training used (same seed, same ``val_fraction`` or ``data.val``), and so are the
    transforms, so the numbers are comparable with the lines of ``metrics.jsonl``.

    Returns:
        ``{"split", "images", <the task's metrics>, "confusion_matrix"}``.
    """
    from raycv.training.dataset import plan_dataset

    task = get_task(cfg.task)
    store = Storage(endpoint_url=cfg.storage.endpoint_url)
    run = saved.load_run(cfg.output.dir, store)
    plan = plan_dataset(cfg)
    names = run.class_names
    if plan["class_names"][: len(names)] != names[: len(plan["class_names"])]:
        raise ValueError(f"dataset classes {plan['class_names']} differ from the model's {names}")
    samples = plan["val"] if split == "val" else plan["train"] + plan["val"]
    bands = int(cfg.model.options.get("in_channels", 3))
    _, eval_tf = task.transforms_for(cfg.data.size_hw, cfg.train.augment, bands)
    loader = BatchLoader(
        samples,
        eval_tf,
        batch_size=32,
        store=store,
        load_target=task.load_target,
        collate=task.collate,
        decode_size=cfg.data.size_hw if task.decode_at_size else None,
        bands=bands,
    )
    k = int(run.card["num_classes"])
    metrics, extras = validate(run.model, task, loader, list(range(len(samples))), k, torch.device("cpu"))
    loader.close()
    out = {"split": split, "images": len(samples), **round_floats(metrics)}
    if "confusion" in extras:
        out["confusion_matrix"] = extras["confusion"]
    return out
