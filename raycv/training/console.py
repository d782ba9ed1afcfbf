"""What ``raycv train`` shows while it runs: a header, then one line per epoch (epoch, train loss, the
primary validation metric, img/s, ETA), printed by the driver from ``metrics.jsonl`` as rank 0 writes it
(the workers' own output goes to Ray's log files, see :mod:`raycv.runtime`)."""

from __future__ import annotations

import json
from typing import Any

from raycv import storage
from raycv.config import TrainConfig
from raycv.models.saved import METRICS
from raycv.storage import Storage


def train_header(cfg: TrainConfig, plan: dict[str, Any]) -> None:
    sc = cfg.scaling
    gpu = " + 1 GPU" if sc.use_gpu else ""
    print(
        f"[raycv] train: {cfg.task}, {cfg.model.arch}, {len(plan['train'])} training / {len(plan['val'])} "
        f"validation images, {plan['num_classes']} classes; {sc.num_workers} worker(s) x "
        f"{float(sc.cpus_per_worker):g} CPU{gpu}",
        flush=True,
    )


class EpochLines:
    """The fields of ``RUN_DIR/progress.json`` (:class:`~raycv.outputs.progress.ProgressWriter` calls it every
    period), printing each epoch's line once as it appears in ``metrics.jsonl``."""

    def __init__(self, cfg: TrainConfig, plan: dict[str, Any], store: Storage) -> None:
        from raycv.tasks.registry import get_task

        self.cfg, self.store, self.images = cfg, store, len(plan["train"])
        self.primary = get_task(cfg.task).primary_metric
        self.printed = 0
        train_header(cfg, plan)

    def _history(self) -> list[dict[str, Any]]:
        try:
            text = self.store.read_bytes(storage.join(self.cfg.output.dir, METRICS)).decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def __call__(self) -> dict[str, Any]:
        history = self._history()
        epochs = self.cfg.train.epochs
        times = [float(h["epoch_s"]) for h in history if h.get("epoch_s")]
        mean = sum(times) / len(times) if times else None
        for row in history[self.printed :]:
            self._print(row, epochs, mean)
        self.printed = max(self.printed, len(history))
        return {
            "unit": "epochs",
            "done": len(history),
            "total": epochs,
            "epoch": len(history),
            "epochs": epochs,
            "img_s": round(self.images / times[-1], 3) if times else None,
            "eta_s": round((epochs - len(history)) * mean, 1) if mean else None,
        }

    def _print(self, row: dict[str, Any], epochs: int, mean: float | None) -> None:
        parts = [
            f"[raycv] epoch {row['epoch']}/{epochs} ",
            f"train_loss {row.get('train_loss', float('nan')):.4f}",
        ]
        if isinstance(row.get(self.primary), int | float):
            parts.append(f"{self.primary} {row[self.primary]:.4f}")
        if row.get("epoch_s"):
            parts.append(f"{self.images / float(row['epoch_s']):.1f} img/s")
        left = epochs - int(row["epoch"])
        if mean and left > 0:
            parts.append(f"ETA {left * mean:.0f} s")
        if row.get("nonfinite_steps"):
            parts.append(f"{row['nonfinite_steps']} non-finite steps skipped, lr {row.get('lr', 0):.3g}")
        if row.get("diverged"):
            parts.append(f"diverged: {row['diverged']}")
        print("  ".join(parts), flush=True)
