"""Adding a task is one new file: a task defined here, outside raycv, goes through the public surface.

``brightness`` is image-level regression of the mean brightness, with a two-layer model. Nothing in raycv/
names it: this module registers the task and its model, and raycv trains it on Ray (2 workers), annotates
an archive with it into Parquet, and inspects the output. Ray's workers import this module (the test's
working directory is on their path), which registers the task there too.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raycv import storage
from raycv.annotation.actor import Annotator, incoming_errors
from raycv.cli import main
from raycv.data.images import encode_png
from raycv.data.transforms import to_tensor_resized
from raycv.errors import error_fields
from raycv.models import register_model
from raycv.outputs.inspect import inspect_output
from raycv.storage import Storage
from raycv.tasks.registry import StepContext, Task, get_task, register_task
from tests._util import write_yaml


@dataclass(frozen=True)
class BrightnessSample:
    uri: str
    value: float  # the image's mean pixel value, 0..1


@dataclass(frozen=True)
class BrightnessDataset:
    samples: list[BrightnessSample]
    class_names: list[str]


class MeanAbsoluteError:
    """Sums of |error| and counts, all-reduced over the ranks."""

    def __init__(self, device: Any) -> None:
        self.device, self.sums = device, torch.zeros(2, dtype=torch.float64)

    def update(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> None:
        pred = model(images.to(self.device)).squeeze(1).cpu()
        self.sums += torch.tensor([float((pred - targets).abs().sum()), len(targets)], dtype=torch.float64)

    def compute(self) -> tuple[dict[str, Any], dict[str, Any]]:
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        mae = float(sums[0] / max(float(sums[1]), 1.0))
        return {"neg_mae": -mae, "mae": mae}, {}


class Brightness(Task):
    name = "brightness"
    formats = ("brightness_csv",)  # ROOT/targets.csv: file,value with the images beside it
    primary_metric = "neg_mae"  # higher is better
    metrics = ("neg_mae", "mae")
    image_fields = (pa.field("value", pa.float32()),)
    unit_pixels = True  # the model takes 0..1 pixels (written in the card: the annotator feeds it the same)
    annotator = "tests.tasks.test_custom_task:BrightnessAnnotator"

    def read_dataset(self, fmt: str, root: str, store: Any, num_classes: int | None) -> BrightnessDataset:
        text = store.read_bytes(storage.join(root, "targets.csv")).decode()
        rows = list(csv.reader(io.StringIO(text)))
        samples = [BrightnessSample(storage.join(root, f), float(v)) for f, v in rows]
        return BrightnessDataset(samples, [])

    def load_target(self, sample: BrightnessSample, fetch: Any) -> float:
        return sample.value

    def transforms(self, size_hw: tuple[int, int], augment: Any) -> tuple[Any, Any]:
        def tf(image: np.ndarray, value: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
            return to_tensor_resized(image, size_hw), value

        return tf, tf

    def collate(self, items: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([im for im, _ in items]), torch.tensor([v for _, v in items], dtype=torch.float32)

    def loss(self, model: nn.Module, images: Any, targets: Any, ctx: StepContext) -> torch.Tensor:
        return F.mse_loss(model(images).squeeze(1), targets)

    def evaluator(self, num_classes: int, device: Any) -> MeanAbsoluteError:
        return MeanAbsoluteError(device)


class BrightnessAnnotator(Annotator):
    """Rows with the predicted ``value`` of each decoded image."""

    reads = "pixels"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = incoming_errors(batch)
        good = [i for i, e in enumerate(errors) if e is None]
        values: list[float | None] = [None] * len(errors)
        if good:
            try:
                out = self._forward(np.stack([batch["pixels"][i] for i in good]))
                for i, v in zip(good, out[:, 0].tolist(), strict=True):
                    values[i] = v
            except Exception as exc:
                for i in good:
                    errors[i] = error_fields("model", exc)
        cols = self._common(batch, errors)
        cols["width"] = [int(w) if w >= 0 else None for w in batch["width"]]
        cols["height"] = [int(h) if h >= 0 else None for h in batch["height"]]
        cols["value"] = values
        return pa.table(cols, schema=self.schema)


BRIGHTNESS = register_task(Brightness())  # before its model: a model is registered for a known task


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


@register_model("tiny_brightness", task="brightness", min_input_size=8)
def tiny_brightness(*, num_classes: int = 1, **_: Any) -> nn.Module:
    """Two layers: a 1x1 convolution, global average pooling, a linear head."""
    return _TwoLayers()


STORE = Storage()


def _images(root: str, n: int, seed: int) -> list[float]:
    """``n`` 16x16 images of random colour noise around a random brightness, and targets.csv."""
    rng = np.random.default_rng(seed)
    rows, values = [], []
    for i in range(n):
        level = rng.uniform(0.1, 0.9)
        pixels = np.clip(rng.normal(level * 255, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        STORE.write_bytes(f"{root}/img{i:03d}.png", encode_png(pixels))
        value = float(pixels.mean() / 255)
        rows.append(f"img{i:03d}.png,{value:.6f}\n")
        values.append(value)
    STORE.write_bytes(f"{root}/targets.csv", "".join(rows).encode())
    return values


def test_a_task_registered_outside_raycv_trains_annotates_and_inspects(tmp_path, ray_local, capsys):
    assert get_task("brightness") is BRIGHTNESS
    _images(str(tmp_path / "ds"), 64, seed=0)
    cfg = {
        "task": "brightness",
        "model": {"arch": "tiny_brightness", "num_classes": 1},
        "data": {"train": str(tmp_path / "ds"), "image_size": 16, "val_fraction": 0.25},
        "train": {"epochs": 24, "batch_size": 8, "lr": 0.05, "augment": {"hflip": 0.0}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "output": {"dir": str(tmp_path / "run")},
    }
    assert main(["train", write_yaml(tmp_path, "train.yaml", cfg)]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 24 and history[-1]["mae"] < 0.05, history[-1]
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["task"] == "brightness" and card["best_metrics"]["mae"] < 0.05

    truth = _images(str(tmp_path / "archive"), 10, seed=1)
    (tmp_path / "archive" / "targets.csv").unlink()
    (tmp_path / "archive" / "broken.png").write_bytes(b"not an image")
    annotate = {
        "model": str(tmp_path / "run"),
        "input": str(tmp_path / "archive"),
        "output": str(tmp_path / "out"),
        "actors": 1,
        "cpus_per_actor": 0.5,
    }
    capsys.readouterr()
    assert main(["annotate", write_yaml(tmp_path, "annotate.yaml", annotate)]) == 0
    rows = pq.read_table(str(tmp_path / "out" / "images")).to_pylist()
    assert len(rows) == 11 and {r["task"] for r in rows} == {"brightness"}
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["image_uri"])
    assert len(ok) == 10 and next(r for r in rows if r["status"] == "error")["image_uri"].endswith(
        "broken.png"
    )
    errors = [abs(r["value"] - t) for r, t in zip(ok, truth, strict=True)]
    assert max(errors) < 0.08, errors

    summary = inspect_output(str(tmp_path / "out"), STORE)
    assert summary["task"] == "brightness" and summary["status"] == {"ok": 10, "error": 1}


def test_a_task_whose_transforms_take_no_bands_trains_rgb_models_only(tmp_path, capsys):
    """A task written before N-band inputs (its transforms take no ``bands``) keeps working for RGB models and
    refuses a 4-band one at once (exit 2), not in the workers."""
    assert not BRIGHTNESS.takes_bands() and get_task("classification").takes_bands()
    cfg = {
        "task": "brightness",
        "model": {"arch": "tiny_brightness", "num_classes": 1, "options": {"in_channels": 4}},
        "data": {"train": str(tmp_path), "image_size": 16},
        "output": {"dir": str(tmp_path / "run")},
    }
    assert main(["train", write_yaml(tmp_path, "bands.yaml", cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.options.in_channels: got 4" in err and "reads RGB images only" in err
