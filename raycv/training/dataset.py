"""The dataset plan of a training run (driver side): read the labelled dataset, split train/val, as plain rows the workers rebuild."""

from __future__ import annotations

import dataclasses
from typing import Any

from raycv.config import DEFAULT_FORMATS, TrainConfig
from raycv.data.formats import (
    Dataset,
    DetectionDataset,
    DetectionSample,
    read_coco,
    read_imagefolder,
    read_masks,
    read_yolo,
    split_train_val,
)
from raycv.errors import ConfigError, DatasetError
from raycv.storage import Storage
from raycv.training.detection import (
    DETECTION_TASKS,
)


def _read_dataset(cfg: TrainConfig, root: str) -> Dataset | DetectionDataset:
    ep = Storage(endpoint_url=cfg.storage.endpoint_url)
    if cfg.task in DETECTION_TASKS and cfg.data_format in ("coco", "yolo"):
        if cfg.task == "instance_segmentation" and cfg.data_format == "yolo":
            raise ConfigError(
                "data.format", "yolo", "Instance segmentation needs masks: use the coco format."
            )
        return read_coco(root, ep) if cfg.data_format == "coco" else read_yolo(root, ep)
    if cfg.data_format == "imagefolder" and cfg.task == "classification":
        return read_imagefolder(root, ep)
    if cfg.data_format == "masks" and cfg.task == "semantic_segmentation":
        return read_masks(root, ep, cfg.model.num_classes)
    raise ConfigError(
        "data.format", cfg.data_format, f"Task '{cfg.task}' reads the {DEFAULT_FORMATS[cfg.task]} format."
    )


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

    def row(s: Any) -> Any:
        return dataclasses.asdict(s) if isinstance(s, DetectionSample) else (s.uri, s.label, s.mask_uri)

    return {
        "train": [row(s) for s in train],
        "val": [row(s) for s in val],
        "class_names": names,
        "num_classes": num_classes,
        "n_train": len(train),
        "n_val": len(val),
    }
