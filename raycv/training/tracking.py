"""Experiment tracking on rank 0: TensorBoard event files in ``RUN_DIR/tensorboard/`` for every run, and
MLflow (params, per-epoch metrics, the model card) when ``tracking.mlflow_uri`` is set.

Tracking never fails training: a tracking server that is down (or any tracking error) warns once and
tracking stops for that backend; the run goes on. Event files are written locally and copied to the run
directory after every epoch (any URI: S3 included). A resumed run logs to the same MLflow run (its id is
kept in ``RUN_DIR/tracking.json``).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from raycv import storage
from raycv.config import TrainConfig, config_to_dict
from raycv.storage import Storage
from raycv.training.step import say

TENSORBOARD_DIR = "tensorboard"
STATE = "tracking.json"
NOT_SCALARS = ("epoch", "epoch_s", "epoch_cpu_s", "diverged")


class Tracker:
    """Rank 0's tracking of one run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, store: Storage, train_images: int) -> None:
        self.cfg, self.store, self.images = cfg, store, train_images
        self.run_dir = cfg.output.dir
        self.local = tempfile.mkdtemp(prefix="raycv-tb-")
        self.tb: Any = None
        self.mlflow: Any = None
        self.mlflow_run: str | None = None
        self._start_tensorboard()
        if cfg.tracking.mlflow_uri:
            self._start_mlflow(cfg.tracking.mlflow_uri, cfg.tracking.experiment)

    def _failed(self, backend: str, exc: Exception) -> None:
        say(f"[raycv] warning: {backend} tracking stopped, training goes on: {type(exc).__name__}: {exc}")

    def _start_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(self.local)
        except Exception as exc:
            self._failed("TensorBoard", exc)

    def _start_mlflow(self, uri: str, experiment: str) -> None:
        # Fail fast on a server that is down: MLflow's client retries for minutes by default.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if uri.startswith("file:"):  # the user's choice; MLflow 3 asks to opt in to its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=uri)
            state = self._state()
            run_id = state.get("mlflow_run_id")
            if run_id is None:
                found = client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found else client.create_experiment(experiment)
                run = client.create_run(exp_id, run_name=self.run_dir.rstrip("/").rsplit("/", 1)[-1])
                run_id = run.info.run_id
                params = _flat(config_to_dict(self.cfg))
                for key, value in params.items():
                    client.log_param(run_id, key, value)
                self.store.write_json(storage.join(self.run_dir, STATE), {"mlflow_run_id": run_id})
            self.mlflow, self.mlflow_run = client, run_id
        except Exception as exc:
            self._failed("MLflow", exc)

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads(self.store.read_bytes(storage.join(self.run_dir, STATE)))  # type: ignore[no-any-return]
        except FileNotFoundError:
            return {}

    def epoch(self, metrics: dict[str, Any]) -> None:
        """Log one epoch's row of ``metrics.jsonl`` (loss, validation metrics, lr) and its img/s."""
        step = int(metrics["epoch"])
        scalars = {
            k: float(v)
            for k, v in metrics.items()
            if k not in NOT_SCALARS and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if metrics.get("epoch_s"):
            scalars["images_per_s"] = self.images / float(metrics["epoch_s"])
        if self.tb is not None:
            try:
                for k, v in scalars.items():
                    self.tb.add_scalar(k, v, step)
                self.tb.flush()
                self._upload_events()
            except Exception as exc:
                self.tb = None
                self._failed("TensorBoard", exc)
        if self.mlflow is not None:
            try:
                for k, v in scalars.items():
                    self.mlflow.log_metric(self.mlflow_run, k, v, step=step)
            except Exception as exc:
                self.mlflow = None
                self._failed("MLflow", exc)

    def _upload_events(self) -> None:
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                self.store.write_bytes(storage.join(self.run_dir, TENSORBOARD_DIR, name), f.read())

    def finish(self, card: dict[str, Any] | None) -> None:
        """Close the event files; give MLflow the model card and end its run."""
        if self.tb is not None:
            try:
                self.tb.close()
                self._upload_events()
            except Exception as exc:
                self._failed("TensorBoard", exc)
        if self.mlflow is not None:
            try:
                if card is not None:
                    self.mlflow.log_dict(self.mlflow_run, card, "model.json")
                self.mlflow.set_terminated(self.mlflow_run)
            except Exception as exc:
                self._failed("MLflow", exc)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out
