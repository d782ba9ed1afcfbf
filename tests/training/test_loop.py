"""Ray Train behaviour that needs a live cluster: surviving a killed worker."""

from __future__ import annotations

import glob
import json
import os
import signal
import tempfile
import threading
import time

import pytest

from raycv.config import TrainConfig
from raycv.data.synthetic import write_imagefolder
from raycv.training.loop import run_training


def _registered_checkpoint_epoch(run_dir: str) -> int:
    """The epoch of the latest checkpoint the Ray Train controller has registered (0 if none yet).

    A worker's report reaches the controller when the controller next polls the workers, so a worker
    killed right after reporting may die before its checkpoint counts; the test kills after this.
    """
    path = os.path.join(run_dir, "checkpoints", "ray_train", "checkpoint_manager_snapshot.json")
    try:
        latest = json.loads(open(path).read()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return 0
    return int(latest["metrics"]["epoch"]) if latest else 0


def test_a_sigkilled_worker_is_replaced_and_training_resumes_from_the_checkpoint(tmp_path, ray_local):
    from ray.util.state import list_actors

    write_imagefolder(str(tmp_path / "ds"), n_per_class=80, size=48, seed=1)
    run_dir = str(tmp_path / "run")
    cfg = TrainConfig.model_validate(
        {
            "model": {"arch": "simple_cnn"},
            "data": {"train": str(tmp_path / "ds"), "image_size": 48},
            "train": {"epochs": 6, "batch_size": 8},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            "output": {"dir": run_dir, "max_failures": 2},
        }
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=run_training(cfg)), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while _registered_checkpoint_epoch(run_dir) < 1 and time.time() < deadline:
        time.sleep(0.05)
    checkpointed = _registered_checkpoint_epoch(run_dir)
    assert 1 <= checkpointed < 6, "no checkpoint registered before the end of training"
    workers = list_actors(
        address=ray_local.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    assert len(workers) == 2
    os.kill(workers[0]["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert "r" in result, "training did not finish after the worker was killed"

    history = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 7))  # each epoch once, none lost or repeated
    card = json.loads(open(os.path.join(run_dir, "model.json")).read())
    assert card["resumed_at_epochs"] and card["resumed_at_epochs"][0] >= checkpointed
    assert card["best_metrics"]["accuracy"] > 0.5


def test_transfer_learning_with_a_frozen_backbone_and_every_augmentation(tmp_path, ray_local):
    import torch

    from raycv.models import create_model
    from raycv.models.saved import load_state_dict

    pretrained = create_model("test_classifier", num_classes=5)  # another head size: it must be replaced
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    write_imagefolder(str(tmp_path / "ds"), n_per_class=20, size=32, seed=2)
    cfg = TrainConfig.model_validate(
        {
            "model": {
                "arch": "test_classifier",
                "weights": str(tmp_path / "pretrained.pt"),
                "freeze_backbone": True,
            },
            "data": {"train": str(tmp_path / "ds"), "image_size": 32},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "optimizer": "sgd",
                "scheduler": "step",
                "augment": {
                    "hflip": 0.5,
                    "vflip": 0.5,
                    "rotate": 15,
                    "color_jitter": 0.3,
                    "mixup": 0.4,
                    "label_smoothing": 0.1,
                },
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    leftovers_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "raycv-ckpt-*")))
    run_training(cfg)
    # each epoch's checkpoint reached the run's storage, and its local copy is gone (one per epoch filled /tmp)
    saved = glob.glob(str(tmp_path / "run" / "checkpoints" / "ray_train" / "*" / "state.pt"))
    assert len(saved) >= 1
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "raycv-ckpt-*"))) <= leftovers_before
    trained = load_state_dict((tmp_path / "run" / "model.pt").read_bytes())
    before = pretrained.state_dict()
    backbone = [k for k in trained if k.startswith("features.")]
    assert backbone and all(torch.equal(trained[k], before[k]) for k in backbone)  # frozen, BN stats included
    assert trained["classifier.weight"].shape == (3, 32)  # a new head for the 3 classes
    history = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl").read().splitlines()]
    assert len(history) == 2 and all(h["train_loss"] > 0 for h in history)


@pytest.mark.gpu
def test_gpu_training_with_amp_learns(tmp_path, ray_local):
    write_imagefolder(str(tmp_path / "ds"), n_per_class=60, size=32, seed=4)
    cfg = TrainConfig.model_validate(
        {
            "model": {"arch": "resnet18"},
            "data": {"train": str(tmp_path / "ds"), "image_size": 32, "val_fraction": 0.2},
            "train": {"epochs": 8, "batch_size": 16, "amp": True},
            "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 1},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    result = run_training(cfg)
    assert result.best_metrics["accuracy"] >= 0.8
