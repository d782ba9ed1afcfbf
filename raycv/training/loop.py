"""Distributed training with Ray Train V2: ``train_loop_per_worker`` and :func:`run_training`.

Every worker builds the model, wraps it in DDP (gloo on CPU, nccl on GPU), reads its own shard of the
dataset from object storage, and after each epoch the whole validation set (split across workers) is
scored from one confusion matrix summed over all ranks. Rank 0 then writes the run directory and a Ray
Train checkpoint; a worker that dies is replaced and every rank resumes from that checkpoint. A loss that
turns NaN/inf is caught by :mod:`raycv.training_guard` (steps skipped, lr halved, or the run stopped).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray import cloudpickle
from torch import nn

from raycv import storage
from raycv.config import TrainConfig, config_to_dict
from raycv.data.loader import BatchLoader, shard_indices
from raycv.errors import RaycvError
from raycv.models import saved
from raycv.outputs.progress import RUN_RECORD, ProgressWriter
from raycv.runtime import ensure_ray, save_logs, stamp
from raycv.storage import Storage
from raycv.tasks.registry import Task, get_task
from raycv.training.checkpoint import (
    NOT_METRICS,
    best_of,
    keep_best,
    report,
    restore,
    round_floats,
)
from raycv.training.console import EpochLines
from raycv.training.dataset import plan_dataset
from raycv.training.epoch import step_context, train_epoch, validate
from raycv.training.guard import (
    DivergenceGuard,
    LrSchedule,
    TrainingDivergedError,
    clip_grad_norm_of,
    divergence_message,
)
from raycv.training.run_directory import first_conv_adapted, write_run_dir
from raycv.training.step import say
from raycv.training.tracking import Tracker

log = logging.getLogger(__name__)


class TrainingError(RaycvError, RuntimeError):
    """Training failed after the allowed number of worker failures."""


@dataclass
class TrainResult:
    run_dir: str
    epochs: int
    best_metrics: dict[str, float]
    duration_s: float
    log: str | None = None  # Ray's output of this run (workers, Ray Train), when the session is local


# --------------------------------------------------------------------------------------------- worker side


def _build_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model, with ``model.weights`` loaded; and the card's ``first_conv_adapted`` (None if none)."""
    from raycv.models import create_model, freeze_backbone, load_weights

    h, _ = cfg.data.size_hw
    model = create_model(cfg.model.arch, num_classes=num_classes, image_size=h, **cfg.model.options)
    adapted = None
    if cfg.model.weights:
        store = Storage(endpoint_url=cfg.storage.endpoint_url)
        state = saved.load_state_dict(store.read_bytes(cfg.model.weights), cfg.model.weights)
        report = load_weights(model, state)
        adapted = first_conv_adapted(report)
        if ray.train.get_context().get_world_rank() == 0:
            say(
                f"[raycv] weights {cfg.model.weights}: {len(report.loaded)} tensors loaded, "
                f"{len(report.skipped)} skipped (shape differs, e.g. the head)"
                + (f", {len(report.adapted)} adapted to the input bands" if report.adapted else "")
            )
    if cfg.model.freeze_backbone:
        freeze_backbone(model)
    return model, adapted


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser; its lr is set before every step by :class:`~raycv.training_guard.LrSchedule`."""
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay, nesterov=True)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def _amp(device: torch.device, enabled: bool) -> tuple[Any, torch.amp.GradScaler | None]:
    """Native AMP on GPU: bf16 where supported (no scaler needed), else fp16 with a GradScaler."""
    if device.type != "cuda" or not enabled:
        return torch.autocast(device.type, enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def _steps_per_epoch(cfg: TrainConfig, n_train: int, world: int) -> int:
    """Optimiser steps per epoch on every rank (shards are padded to the same length)."""
    shard = len(shard_indices(n_train, 0, world, shuffle=False, seed=0, pad=True))
    return math.ceil(math.ceil(shard / cfg.train.batch_size) / cfg.train.grad_accum_steps)


@dataclass
class _Worker:
    """What every epoch of one Ray Train worker uses."""

    cfg: TrainConfig
    info: dict[str, Any]
    model: nn.Module  # the bare model; ``ddp`` wraps it
    ddp: nn.Module
    opt: torch.optim.Optimizer
    guard: DivergenceGuard
    amp: tuple[Any, Any]  # (autocast, scaler)
    device: Any
    task: Task
    loaders: tuple[BatchLoader, BatchLoader]  # train, val
    record: dict[str, Any]
    rank: int
    world: int
    tracker: Tracker | None = None  # rank 0


def _setup(loop_config: dict[str, Any]) -> tuple[_Worker, int]:
    """Build the model, optimiser, guard and loaders of this worker; returns them and the first epoch."""
    payload = cloudpickle.loads(loop_config[PAYLOAD])
    task: Task = payload["task"]  # the driver's object: a task registered outside raycv works too
    cfg = TrainConfig.model_validate(payload["cfg"])
    info = payload["dataset"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray sets OMP_NUM_THREADS, but a reused worker keeps the thread count of its first torch import.
    torch.set_num_threads(max(1, int(float(cfg.scaling.cpus_per_worker))))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank before DDP broadcasts
    model, adapted = _build_model(cfg, info["num_classes"])
    opt = _make_optimizer(cfg, model)
    start, record, guard_state = restore(model, opt)
    if adapted:  # set after restore, which rebuilds the record; the card reads it from there
        record["first_conv_adapted"] = adapted
    unused = {"find_unused_parameters": task.find_unused_parameters}
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=unused)
    schedule = LrSchedule.from_config(cfg, _steps_per_epoch(cfg, len(info["train"]), world))
    guard = DivergenceGuard(model, opt, schedule, verbose=rank == 0)
    guard.load_state_dict(guard_state)
    device = ray.train.torch.get_device()
    amp, loaders = _amp(device, cfg.train.amp), _loaders(cfg, task, info)
    w = _Worker(cfg, info, model, ddp, opt, guard, amp, device, task, loaders, record, rank, world)
    if rank == 0:
        w.tracker = Tracker(cfg, Storage(endpoint_url=cfg.storage.endpoint_url), len(info["train"]))
    return w, start


def _loaders(cfg: TrainConfig, task: Task, info: dict[str, Any]) -> tuple[BatchLoader, BatchLoader]:
    """The train and validation loaders of a worker, with the task's transforms, targets and collate."""
    bands = int(cfg.model.options.get("in_channels", 3))
    train_tf, eval_tf = task.transforms_for(cfg.data.size_hw, cfg.train.augment, bands)
    # Decode threads in proportion to the worker's CPUs: more would only take turns with the training step
    # (measured on 1 CPU, resnet18 @ 64: 8 or 2 threads give the same epoch time; loading is ~2% of it).
    kw: dict[str, Any] = {
        "batch_size": cfg.train.batch_size,
        "threads": max(2, round(2 * float(cfg.scaling.cpus_per_worker))),
        "store": Storage(endpoint_url=cfg.storage.endpoint_url),
        "load_target": task.load_target,
        "collate": task.collate,
        # transforms that resize whole images first: large JPEGs decode smaller
        "decode_size": cfg.data.size_hw if task.decode_at_size else None,
        "bands": bands,
    }
    return BatchLoader(info["train"], train_tf, **kw), BatchLoader(info["val"], eval_tf, **kw)


def _train(w: _Worker, epoch: int) -> float:
    """One epoch of training on this worker's shard; the mean finite loss over all ranks."""
    cfg = w.cfg
    idx = shard_indices(
        len(w.info["train"]), w.rank, w.world, shuffle=True, seed=cfg.train.seed + epoch, pad=True
    )
    ctx = step_context(cfg, w.device, w.info["num_classes"], epoch, w.rank)
    return train_epoch(
        w.ddp,
        w.task,
        w.loaders[0],
        idx,
        w.opt,
        w.amp,
        ctx,
        seed=cfg.train.seed,
        epoch=epoch,
        grad_accum_steps=cfg.train.grad_accum_steps,
        clip_grad_norm=clip_grad_norm_of(cfg),
        guard=w.guard,
        frozen_backbone=cfg.model.freeze_backbone,
    )


def _validate(w: _Worker, metrics: dict[str, Any]) -> dict[str, Any]:
    """Add the validation metrics of all ranks to ``metrics``; returns the evaluator's card extras."""
    vidx = shard_indices(len(w.info["val"]), w.rank, w.world, shuffle=False, seed=0, pad=False)
    scores, extras = validate(w.model, w.task, w.loaders[1], vidx, w.info["num_classes"], w.device)
    metrics.update(round_floats(scores))
    return extras


def _epoch(w: _Worker, epoch: int) -> None:
    """Train, validate, keep the best weights, write the run directory (rank 0) and report (every rank)."""
    t0, cpu0 = time.time(), time.process_time()
    w.guard.start_epoch(epoch)
    loss = _train(w, epoch)
    w.guard.end_epoch()
    metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": round(loss, 6)}
    # A diverged epoch stops at once: its weights are no better than the last good ones, so no validation.
    extras = {} if w.guard.diverged else _validate(w, metrics)
    metrics["lr"] = w.opt.param_groups[0]["lr"]
    metrics.update(w.guard.epoch_metrics())
    metrics["epoch_s"] = round(time.time() - t0, 3)
    # CPU seconds this rank's process used (all its threads): well below epoch_s * cpus_per_worker means
    # the worker waited for a CPU (a shared node) or for the other ranks, not that the step is slow.
    metrics["epoch_cpu_s"] = round(time.process_time() - cpu0, 3)
    w.record["history"].append(metrics)
    keep_best(w.cfg, w.record, metrics, w.task.primary_metric, w.model, extras, w.rank)
    state: dict[str, Any] | None = None
    if w.rank == 0:
        write_run_dir(w.cfg, w.info, w.record)
        if not w.guard.diverged:  # a re-run resumes from the last epoch that did not diverge
            opt_state = w.opt.state_dict()
            state = {"model": w.model.state_dict(), "optimizer": opt_state, "guard": w.guard.state_dict()}
            state.update(epoch=epoch, **w.record)
        if w.tracker is not None:
            w.tracker.epoch(metrics)
    report(metrics, state)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    w, start = _setup(loop_config)
    if start and w.rank == 0:
        say(f"[raycv] resumed from the checkpoint of epoch {start}")
    for epoch in range(start, w.cfg.train.epochs):
        _epoch(w, epoch)
        if w.guard.diverged:  # every rank agrees: the guard decides on all-reduced flags
            break
    for loader in w.loaders:
        loader.close()
    if w.tracker is not None:
        w.tracker.finish(_card_or_none(w.cfg))


def _card_or_none(cfg: TrainConfig) -> dict[str, Any] | None:
    from raycv.models.saved import read_card

    try:
        return read_card(cfg.output.dir, Storage(endpoint_url=cfg.storage.endpoint_url))
    except Exception:  # no finite epoch: no card
        return None


# --------------------------------------------------------------------------------------------- driver side


PAYLOAD = "raycv_payload"  # the one key of train_loop_config: the pickled config, file list and task

CPUS_PER_CPU_WORKER = 8  # torch's intra-op threads scale well up to about this many cores


def size_workers(cfg: TrainConfig, resources: dict[str, Any]) -> TrainConfig:
    """``cfg`` with its ``auto`` scaling values sized from the cluster's ``resources`` (printed): GPUs first
    (one worker per GPU, the CPUs shared among them), else one worker per ~8 CPUs sharing every CPU (on a
    2-CPU machine one worker on 2 threads, not two workers all-reducing every step)."""
    sc = cfg.scaling
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    use_gpu = gpus >= 1 if sc.use_gpu == "auto" else bool(sc.use_gpu)
    if sc.num_workers == "auto":
        n = max(1, int(gpus)) if use_gpu else max(1, round(cpus / CPUS_PER_CPU_WORKER))
    else:
        n = int(sc.num_workers)
    if sc.cpus_per_worker == "auto":
        each = max(0.25, math.floor(cpus / n * 4) / 4) if cpus else 1.0
    else:
        each = float(sc.cpus_per_worker)
    auto = [k for k in ("num_workers", "use_gpu", "cpus_per_worker") if getattr(sc, k) == "auto"]
    if auto:
        print(  # the driver: a plain print (say() is for Ray Train workers)
            f"[raycv] train: {n} worker(s) x {each:g} CPU{' + 1 GPU' if use_gpu else ''} "
            f"(auto: {', '.join(auto)}); cluster: {cpus:g} CPUs, {gpus:g} GPUs",
            flush=True,
        )
    scaling = sc.model_copy(
        update={"num_workers": int(n), "use_gpu": use_gpu, "cpus_per_worker": float(each)}
    )
    return cfg.model_copy(update={"scaling": scaling})


def run_training(cfg: TrainConfig, address: str | None = None) -> TrainResult:
    """Train ``cfg`` on Ray (a cluster at ``address``, or local) and write the run directory.

    Re-running with the same ``output.dir`` resumes from its last checkpoint.

    Raises:
        TrainingError: when the workers failed more than ``output.max_failures`` times.
        TrainingDivergedError: when the loss stayed NaN/inf after the lr was halved three times (the run
            directory keeps the best finite epoch, if any, and ``metrics.jsonl`` the diverged one).
    """
    t0 = time.time()
    task = get_task(cfg.task)
    plan = plan_dataset(cfg)
    ensure_ray(address)
    cfg = size_workers(cfg, ray.cluster_resources())
    store = Storage(endpoint_url=cfg.storage.endpoint_url)
    fs, path = store.pyarrow_filesystem(storage.join(cfg.output.dir, "checkpoints"))
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        # As bytes: Ray Train's controller receives the loop config too and would otherwise unpickle the task
        # (importing raycv, torchvision and torch._dynamo: ~2 s of a 2-CPU node's start-up) and the file list.
        train_loop_config={
            PAYLOAD: cloudpickle.dumps({"cfg": config_to_dict(cfg), "dataset": plan, "task": task})
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(cfg.scaling.num_workers),
            use_gpu=bool(cfg.scaling.use_gpu),
            resources_per_worker={"CPU": float(cfg.scaling.cpus_per_worker)},
        ),
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.output.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    log_uri = storage.join(cfg.output.dir, "logs", f"{stamp()}.log")
    try:
        with ProgressWriter(
            storage.join(cfg.output.dir, RUN_RECORD), store, EpochLines(cfg, plan, store), period_s=2.0
        ):
            trainer.fit()
    except ray.train.TrainingFailedError as exc:
        log = save_logs(log_uri, store, t0)
        raise TrainingError(
            f"training failed after {cfg.output.max_failures} allowed worker failures: {exc}"
            + (f"; Ray's log of the run: {log}" if log else "")
        ) from exc
    log = save_logs(log_uri, store, t0)
    history = _read_history(cfg.output.dir, store)
    if history and history[-1].get("diverged"):
        raise TrainingDivergedError(divergence_message(cfg, history[-1]))
    primary = task.primary_metric
    best = best_of(history, primary)
    if best is None:
        raise TrainingDivergedError(
            f"training diverged: none of the {len(history)} epochs ended with a finite train loss and {primary}; "
            f"lower train.lr (now {cfg.train.lr:g}), raise train.warmup_epochs or set train.clip_grad_norm"
        )
    best = {k: v for k, v in best.items() if k not in NOT_METRICS}
    return TrainResult(cfg.output.dir, len(history), best, time.time() - t0, log)


def _read_history(run_dir: str, store: Storage) -> list[dict[str, Any]]:
    text = store.read_bytes(storage.join(run_dir, saved.METRICS)).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
