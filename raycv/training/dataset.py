"""The dataset plan of a training run (driver side): the task lists the labelled dataset, split train/val."""

from __future__ import annotations

from typing import Any

from raycv.config import TrainConfig
from raycv.data.formats import Dataset, DetectionDataset, split_train_val
from raycv.errors import ConfigError, DatasetError
from raycv.storage import Storage
from raycv.tasks.registry import get_task


def _read_dataset(cfg: TrainConfig, root: str) -> Dataset | DetectionDataset:
    store = Storage(endpoint_url=cfg.storage.endpoint_url)
    return get_task(cfg.task).read_dataset(cfg.data_format, root, store, cfg.model.num_classes)  # type: ignore[no-any-return]


def plan_dataset(cfg: TrainConfig) -> dict[str, Any]:
    """List and split the dataset on the driver: the samples every worker reads its shard of."""
    ds = _read_dataset(cfg, cfg.data.train)
    if cfg.data.val:
        val_ds = _read_dataset(cfg, cfg.data.val)
        if val_ds.class_names != ds.class_names:
            raise DatasetError(
                f"data.val classes {val_ds.class_names} differ from data.train {ds.class_names}"
            )
        train, val = ds.samples, val_ds.samples
    else:
        train, val = split_train_val(ds.samples, cfg.data.val_fraction, cfg.train.seed)  # type: ignore[arg-type]
    if not val:
        raise DatasetError("The validation set is empty: raise data.val_fraction or set data.val.")
    num_classes = cfg.model.num_classes or len(ds.class_names)
    if num_classes < len(ds.class_names):
        raise ConfigError(
            "model.num_classes",
            num_classes,
            f"The dataset has {len(ds.class_names)} classes; use at least that.",
        )
    names = ds.class_names + [f"class_{i}" for i in range(len(ds.class_names), num_classes)]

    return {  # the samples travel to the workers as they are (pickled): each task lists its own kind
        "train": list(train),
        "val": list(val),
        "class_names": names,
        "num_classes": num_classes,
        "n_train": len(train),
        "n_val": len(val),
    }
