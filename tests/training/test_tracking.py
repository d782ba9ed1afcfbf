"""Experiment tracking: TensorBoard event files in RUN_DIR/tensorboard/ on every run (S3 included), MLflow
params, per-epoch metrics and the model card with tracking.mlflow_uri (a file:// store read back with
MLflow's client); a tracking server that is down warns once and never fails training."""

from __future__ import annotations

import json
import os
import socket

import pytest

from raycv.cli import main
from raycv.data.synthetic import write_imagefolder
from raycv.storage import Storage
from tests._util import write_yaml

EPOCHS = 3


def _train(tmp_path, run: str, **tracking) -> int:
    data = str(tmp_path / "shapes")
    if not os.path.exists(data):
        write_imagefolder(data, n_per_class=16, size=16, seed=2)
    cfg = {
        "model": {"arch": "test_classifier"},
        "data": {"train": data, "image_size": 16, "val_fraction": 0.25},
        "train": {"epochs": EPOCHS, "batch_size": 8},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "output": {"dir": run},
    }
    if tracking:
        cfg["tracking"] = tracking
    return main(["train", write_yaml(tmp_path, "train.yaml", cfg)])


def _scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(300)
def test_tensorboard_events_on_s3_and_mlflow_file_store(tmp_path, bucket, ray_local):
    run = f"{bucket}/runs/tracked"
    store = tmp_path / "mlruns"
    assert _train(tmp_path, run, mlflow_uri=f"file://{store}", experiment="shapes") == 0
    events = tmp_path / "events"
    events.mkdir()
    files = list(Storage().iter_files(f"{run}/tensorboard"))
    assert files
    for entry in files:
        (events / entry.uri.rsplit("/", 1)[-1]).write_bytes(Storage().read_bytes(entry.uri))
    scalars = _scalars(str(events))
    for tag in ("train_loss", "accuracy", "f1", "lr", "images_per_s"):
        assert [step for step, _ in scalars[tag]] == list(range(1, EPOCHS + 1)), tag
    history = [json.loads(x) for x in Storage().read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [v for _, v in scalars["train_loss"]] == pytest.approx(
        [h["train_loss"] for h in history], rel=1e-6
    )

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"file://{store}")
    exp = client.get_experiment_by_name("shapes")
    (found,) = client.search_runs([exp.experiment_id])
    assert (
        found.data.params["train.epochs"] == str(EPOCHS)
        and found.data.params["model.arch"] == "test_classifier"
    )
    acc = client.get_metric_history(found.info.run_id, "accuracy")
    assert [m.step for m in acc] == list(range(1, EPOCHS + 1))
    assert [m.value for m in acc] == pytest.approx([h["accuracy"] for h in history])
    card = client.download_artifacts(found.info.run_id, "model.json", str(tmp_path / "dl"))
    assert json.loads(open(card).read())["arch"] == "test_classifier"
    assert found.info.status == "FINISHED"


@pytest.mark.timeout(300)
def test_a_tracking_server_that_is_down_warns_once_and_training_goes_on(tmp_path, ray_local, capsys):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    assert _train(tmp_path, str(run), mlflow_uri=f"http://127.0.0.1:{port}") == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("MLflow tracking stopped, training goes on") == 1, text[-3000:]
    assert (run / "model.json").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    assert any((run / "tensorboard").iterdir())
