"""``raycv config example|schema train|annotate``: a commented config to start from, and the JSON Schema
editors validate and complete YAML with (e.g. with ``# yaml-language-server: $schema=raycv-annotate.json``)."""

from __future__ import annotations

import json
from typing import Any

TRAIN = """\
# raycv train CONFIG.yaml: a commented example; every key but data.train and output.dir is optional.
task: classification            # classification | semantic_segmentation | detection | instance_segmentation
model:
  arch: resnet18                # any name from `raycv models --task classification`
  num_classes: null             # default: from the dataset
  weights: null                 # a raycv model.pt or a torchvision state_dict (path or URI): transfer learning
  freeze_backbone: false        # train the head only
data:
  train: s3://bucket/datasets/shapes/train   # imagefolder: ROOT/<class>/<image>
  val: null                     # default: val_fraction of train, split by seed
  val_fraction: 0.1
  image_size: 64                # int or [h, w]
train:
  epochs: 10
  batch_size: 32                # per worker
  optimizer: adamw              # sgd | adam | adamw
  lr: 0.001
  scheduler: cosine             # cosine | step | none
  warmup_epochs: null           # linear warmup (fractions allowed); default per task (detection: 1)
  clip_grad_norm: null          # default per task (detection: 10)
  augment: {hflip: 0.5, label_smoothing: 0.0, mixup: 0.0}
scaling: {num_workers: auto, use_gpu: auto, cpus_per_worker: auto}   # auto: sized from the cluster
storage: {endpoint_url: null}   # an S3-compatible endpoint; or AWS_ENDPOINT_URL
output:
  dir: s3://bucket/runs/shapes  # model.json, model.pt, metrics.jsonl, checkpoints
  max_failures: 2               # worker failures survived by resuming from the last checkpoint
"""

ANNOTATE = """\
# raycv annotate CONFIG.yaml: a commented example; only model, input and output are required.
model: s3://bucket/runs/shapes  # a `raycv train` run or `raycv export-model` folder; or a mapping:
# model: {task: classification, arch: "torchvision:resnet50", weights: s3://m/r50.safetensors, classes: s3://m/classes.txt}
input: s3://archive/images/     # a prefix, a glob, a list of URIs, a manifest (.txt/.csv/.parquet) or STAC JSON
output: s3://annotations/shapes/
batch_size: 32
actors: auto                    # model replicas, sized from the cluster (GPUs first); or an int
cpus_per_actor: auto
gpus_per_actor: auto
tile: null                      # {size: 1024, overlap: 128}: large images tiled and stitched back
score_threshold: 0.25           # detection
iou_threshold: 0.5
incremental: true               # skip images already annotated by this model with the same content
max_error_fraction: 1.0         # stop (exit 1) once more than this fraction of at least 32 images failed
storage: {endpoint_url: null}
"""

EXAMPLES = {"train": TRAIN, "annotate": ANNOTATE}


def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a ``train`` or ``annotate`` config."""
    from raycv.config import AnnotateConfig, TrainConfig

    model = TrainConfig if kind == "train" else AnnotateConfig
    out = model.model_json_schema()
    out["title"] = f"raycv {kind} config"
    return out


def schema_json(kind: str) -> str:
    return json.dumps(schema(kind), indent=2)
