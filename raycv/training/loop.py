"""Distributed training with Ray Train V2: ``train_loop_per_worker`` and :func:`run_training`.

Every worker builds the model, wraps it in DDP (gloo on CPU, nccl on GPU), reads its own shard of the
dataset from object storage, and after each epoch the whole validation set (split across workers) is
scored from one confusion matrix summed over all ranks. Rank 0 then writes the run directory and a Ray
Train checkpoint; a worker that dies is replaced and every rank resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from raycv import storage
from raycv.config import TrainConfig, config_to_dict
from raycv.data.formats import (
    DetectionSample,
    Sample,
)
from raycv.data.loader import BatchLoader, Target, Transform, shard_indices
from raycv.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment,
    augment_pair,
    normalize,
    resize_mask,
    to_tensor_resized,
)
from raycv.errors import RaycvError
from raycv.models import saved
from raycv.runtime import ensure_ray
from raycv.tasks import TaskOps, task_ops
from raycv.tasks import classification as cls_task
from raycv.training import run_directory
from raycv.training.dataset import plan_dataset
from raycv.training.detection import (
    DETECTION_TASKS,
    evaluate_detection,
    make_detection_transforms,
    train_epoch_detection,
)
from raycv.training.step import GradientAccumulation, all_reduce_sum, batches_of, epoch_seed, say

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "state.pt"
_NOT_METRICS = ("lr", "epoch_s", "epoch_cpu_s")  # recorded per epoch, but not model quality


class TrainingError(RaycvError, RuntimeError):
    """Training failed after the allowed number of worker failures."""


@dataclass
class TrainResult:
    run_dir: str
    epochs: int
    best_metrics: dict[str, float]
    duration_s: float


# --------------------------------------------------------------------------------------------- worker side


def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from raycv.models import create_model, freeze_backbone, load_weights

    h, _ = cfg.data.size_hw
    model = create_model(cfg.model.arch, num_classes=num_classes, image_size=h, **cfg.model.options)
    if cfg.model.weights:
        state = saved.load_state_dict(
            storage.read_bytes(cfg.model.weights, cfg.storage.endpoint_url), cfg.model.weights
        )
        report = load_weights(model, state)
        if ray.train.get_context().get_world_rank() == 0:
            say(
                f"[raycv] weights {cfg.model.weights}: {len(report.loaded)} tensors loaded, "
                f"{len(report.skipped)} skipped (shape differs, e.g. the head)"
            )
    if cfg.model.freeze_backbone:
        freeze_backbone(model)
    return model


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt: torch.optim.Optimizer
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay, nesterov=True)
    elif t.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched: Any = None
    if t.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    elif t.scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, t.epochs // 3), gamma=0.1)
    return opt, sched


def make_transforms(cfg: TrainConfig) -> tuple[Transform, Transform]:
    """The train and eval transforms of ``cfg``: (image, target, rng) -> (normalised tensor, target).

    Label maps get the image's geometric augmentations (nearest neighbour) and never its colour ones.
    """
    size = cfg.data.size_hw
    aug = cfg.train.augment

    def train_tf(image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[torch.Tensor, Any]:
        if isinstance(target, np.ndarray):
            t, m = augment_pair(
                image,
                target,
                size,
                rng,
                hflip=aug.hflip,
                vflip=aug.vflip,
                rotate=aug.rotate,
                color_jitter=aug.color_jitter,
                crop_scale=aug.crop_scale,
            )
            return normalize(t, IMAGENET_MEAN, IMAGENET_STD), m
        t = augment(
            to_tensor_resized(image, size),
            rng,
            hflip=aug.hflip,
            vflip=aug.vflip,
            rotate=aug.rotate,
            color_jitter=aug.color_jitter,
        )
        return normalize(t, IMAGENET_MEAN, IMAGENET_STD), target

    def eval_tf(image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[torch.Tensor, Any]:
        t = normalize(to_tensor_resized(image, size), IMAGENET_MEAN, IMAGENET_STD)
        return t, resize_mask(target, size) if isinstance(target, np.ndarray) else target

    return train_tf, eval_tf


def _amp(device: torch.device, enabled: bool) -> tuple[Any, torch.amp.GradScaler | None]:
    """Native AMP on GPU: bf16 where supported (no scaler needed), else fp16 with a GradScaler."""
    if device.type != "cuda" or not enabled:
        return torch.autocast(device.type, enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def _freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Keep the running statistics of frozen BatchNorm layers fixed: a frozen backbone stays as loaded."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters()
        ):
            m.eval()


def _train_epoch(
    model, loader, indices, opt, scaler, autocast, cfg, ops, num_classes, epoch, device
) -> float:  # type: ignore[no-untyped-def]
    model.train()
    if cfg.model.freeze_backbone:
        _freeze_frozen_batchnorm(model)
    aug = cfg.train.augment
    rng = np.random.default_rng([cfg.train.seed, epoch, ray.train.get_context().get_world_rank()])
    total = torch.zeros(2, dtype=torch.float64)
    acc = GradientAccumulation(
        model, opt, scaler, cfg.train.grad_accum_steps, batches_of(indices, loader.batch_size)
    )
    for i, (images, labels) in enumerate(loader.iterate(indices, seed=epoch_seed(cfg.train.seed, epoch))):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        targets: torch.Tensor = labels
        if aug.mixup > 0:
            images, targets = cls_task.mixup(images, labels, num_classes, aug.mixup, rng)
        with acc.window(i):
            with autocast:
                loss = ops.loss(model(images), targets, cfg)
            acc.backward(i, loss)
        total[0] += float(loss.detach()) * len(labels)
        total[1] += len(labels)
    total = all_reduce_sum(total)
    return float(total[0]) / max(float(total[1]), 1.0)


@torch.no_grad()
def evaluate_confusion(
    model: nn.Module, loader: BatchLoader, indices: list[int], ops: TaskOps, num_classes: int, device: Any
) -> torch.Tensor:
    """The [K, K] confusion matrix of ``model``'s argmax predictions on ``indices`` (this rank's part).

    Classification compares one label per image, segmentation one per pixel: both argmax over dim 1.
    """
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, targets in loader.iterate(indices):
        preds = model(images.to(device)).argmax(dim=1).cpu()
        cm += ops.confusion(targets, preds, num_classes)
    return cm


def _round(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """``ray.train.report`` with ``state`` (rank 0) as the checkpoint. report() copies the folder to the run's
    storage before it returns (Ray's default, synchronous upload), so the local copy is removed right after."""
    if state is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="raycv-ckpt-") as path:
        torch.save(state, os.path.join(path, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path))


def _restore(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> tuple[int, dict[str, Any]]:
    """Load the last reported checkpoint, if any; returns the epoch to start at and the run's record."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, {"history": [], "best": None, "resumed_at_epochs": []}
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None and state.get("scheduler"):
        sched.load_state_dict(state["scheduler"])
    start = int(state["epoch"]) + 1
    record = {
        "history": list(state["history"]),
        "best": state["best"],
        "resumed_at_epochs": [*state.get("resumed_at_epochs", []), start],
    }
    return start, record


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    cfg = TrainConfig.model_validate(loop_config["cfg"])
    info = loop_config["dataset"]
    is_det = cfg.task in DETECTION_TASKS
    make: Any = (lambda row: DetectionSample(**row)) if is_det else (lambda row: Sample(*row))
    train_samples = [make(row) for row in info["train"]]
    val_samples = [make(row) for row in info["val"]]
    ops = None if is_det else task_ops(cfg.task)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray sets OMP_NUM_THREADS, but a reused worker keeps the thread count of its first torch import.
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank before DDP broadcasts
    device = ray.train.torch.get_device()
    num_classes = info["num_classes"]

    model = _build_model(cfg, num_classes)
    opt, sched = _make_optimizer(cfg, model)
    start, record = _restore(model, opt, sched)
    # Detectors skip some heads on images without objects: DDP must not wait for their gradients.
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": is_det})
    autocast, scaler = _amp(device, cfg.train.amp)
    train_tf, eval_tf = make_detection_transforms(cfg) if is_det else make_transforms(cfg)
    ep = cfg.storage.endpoint_url
    # Decode threads in proportion to the worker's CPUs: more would only take turns with the training step
    # (measured on 1 CPU, resnet18 @ 64: 8 or 2 threads give the same epoch time; loading is ~2% of it).
    threads = max(2, round(2 * cfg.scaling.cpus_per_worker))
    bs = cfg.train.batch_size
    kw: dict[str, Any] = {"batch_size": bs, "store": storage.Storage(endpoint_url=ep), "threads": threads}
    if cfg.task == "classification":  # transforms that resize whole images first: large JPEGs decode smaller
        kw["decode_size"] = cfg.data.size_hw
    train_loader = BatchLoader(train_samples, train_tf, **kw)
    val_loader = BatchLoader(val_samples, eval_tf, **kw)
    if start and rank == 0:
        say(f"[raycv] resumed from the checkpoint of epoch {start}")

    primary = "map" if is_det else ops.primary_metric  # type: ignore[union-attr]
    for epoch in range(start, cfg.train.epochs):
        t0, cpu0 = time.time(), time.process_time()
        idx = shard_indices(
            len(train_samples), rank, world, shuffle=True, seed=cfg.train.seed + epoch, pad=True
        )
        if is_det:
            seed = epoch_seed(cfg.train.seed, epoch)
            loss = train_epoch_detection(
                ddp, train_loader, idx, opt, scaler, autocast, device, seed, cfg.train.grad_accum_steps
            )
        else:
            loss = _train_epoch(
                ddp, train_loader, idx, opt, scaler, autocast, cfg, ops, num_classes, epoch, device
            )
        if sched is not None:
            sched.step()
        vidx = shard_indices(len(val_samples), rank, world, shuffle=False, seed=0, pad=False)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": round(loss, 6)}
        if is_det:
            metrics.update(_round(evaluate_detection(model, val_loader, vidx, cfg.task, num_classes, device)))
        else:
            cm = all_reduce_sum(evaluate_confusion(model, val_loader, vidx, ops, num_classes, device))  # type: ignore[arg-type]
            metrics.update(_round(ops.metrics(cm)))  # type: ignore[union-attr]
        metrics["lr"] = opt.param_groups[0]["lr"]
        metrics["epoch_s"] = round(time.time() - t0, 3)
        # CPU seconds this rank's process used (all its threads): well below epoch_s * cpus_per_worker means
        # the worker waited for a CPU (a shared node) or for the other ranks, not that the step is slow.
        metrics["epoch_cpu_s"] = round(time.process_time() - cpu0, 3)
        record["history"].append(metrics)
        best = record["best"]
        if best is None or metrics[primary] > best["metrics"][primary]:
            record["best"] = {
                "epoch": epoch + 1,
                "metrics": {k: v for k, v in metrics.items() if k not in _NOT_METRICS},
            }
            if cfg.task == "classification":
                record["best"]["confusion"] = cm.tolist()
            if rank == 0:
                run_directory.save_weights(
                    storage.join(cfg.output.dir, saved.WEIGHTS), model.state_dict(), ep
                )
        state: dict[str, Any] | None = None
        if rank == 0:
            run_directory.write_run_dir(cfg, info, record)
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "epoch": epoch,
                **record,
            }
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "lr" and isinstance(v, float))
            say(f"[raycv] epoch {epoch + 1}/{cfg.train.epochs} {shown}")
        _report(metrics, state)
    train_loader.close()
    val_loader.close()


# --------------------------------------------------------------------------------------------- driver side


def run_training(cfg: TrainConfig, address: str | None = None) -> TrainResult:
    """Train ``cfg`` on Ray (a cluster at ``address``, or local) and write the run directory.

    Re-running with the same ``output.dir`` resumes from its last checkpoint.

    Raises:
        TrainingError: when the workers failed more than ``output.max_failures`` times.
    """
    t0 = time.time()
    plan = plan_dataset(cfg)
    ensure_ray(address)
    fs, path = storage.pyarrow_filesystem(
        storage.join(cfg.output.dir, "checkpoints"), cfg.storage.endpoint_url
    )
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_to_dict(cfg), "dataset": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.output.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(
            f"training failed after {cfg.output.max_failures} allowed worker failures: {exc}"
        ) from exc
    history = _read_history(cfg)
    primary = "map" if cfg.task in DETECTION_TASKS else task_ops(cfg.task).primary_metric
    best = max(history, key=lambda r: r[primary]) if history else dict(result.metrics or {})
    best = {k: v for k, v in best.items() if k not in _NOT_METRICS}
    return TrainResult(cfg.output.dir, len(history), best, time.time() - t0)


def _read_history(cfg: TrainConfig) -> list[dict[str, Any]]:
    import json

    text = storage.read_bytes(storage.join(cfg.output.dir, saved.METRICS), cfg.storage.endpoint_url).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
