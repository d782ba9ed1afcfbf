"""Ray Train behaviour that needs a live cluster: surviving a killed worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from raycv.config import TrainConfig
from raycv.data.synthetic import write_imagefolder
from raycv.training import run_training


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
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[0]["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert "r" in result, "training did not finish after the worker was killed"

    history = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 7))  # each epoch once, none lost or repeated
    card = json.loads(open(os.path.join(run_dir, "model.json")).read())
    assert card["resumed_at_epochs"] and card["resumed_at_epochs"][0] >= checkpointed
    assert card["best_metrics"]["accuracy"] > 0.5
