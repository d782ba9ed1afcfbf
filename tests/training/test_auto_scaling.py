"""`scaling: auto` (the default): Ray Train workers sized from the cluster, GPUs first; numbers kept."""

from __future__ import annotations

import json

import pytest

from raycv.cli import main
from raycv.config import TrainConfig
from raycv.data.synthetic import write_imagefolder
from raycv.training.loop import size_workers
from tests._util import write_yaml


def _cfg(**scaling) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": {"arch": "test_classifier"},
            "data": {"train": "/x"},
            "scaling": scaling,
            "output": {"dir": "/r"},
        }
    )


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"CPU": 2}, (1, False, 2.0)),  # one worker on both cores, no all-reduce between two halves
        ({"CPU": 16}, (2, False, 8.0)),
        ({"CPU": 64}, (8, False, 8.0)),
        ({"CPU": 8, "GPU": 1}, (1, True, 8.0)),  # GPUs first: one worker per GPU, the CPUs shared
        ({"CPU": 32, "GPU": 4}, (4, True, 8.0)),
    ],
)
def test_auto_scaling_from_the_cluster(resources, expected, capsys):
    sc = size_workers(_cfg(), resources).scaling
    assert (sc.num_workers, sc.use_gpu, sc.cpus_per_worker) == expected
    assert "(auto: num_workers, use_gpu, cpus_per_worker)" in capsys.readouterr().out


def test_explicit_scaling_is_kept():
    sc = size_workers(_cfg(num_workers=2, use_gpu=False, cpus_per_worker=1), {"CPU": 16, "GPU": 2}).scaling
    assert (sc.num_workers, sc.use_gpu, sc.cpus_per_worker) == (2, False, 1.0)
    sc = size_workers(_cfg(use_gpu=False), {"CPU": 8, "GPU": 1}).scaling  # CPU training on a GPU node
    assert (sc.num_workers, sc.use_gpu, sc.cpus_per_worker) == (1, False, 8.0)


@pytest.mark.timeout(300)
def test_a_config_without_scaling_trains_on_the_whole_test_ray(tmp_path, ray_local, capsys):
    data = str(tmp_path / "shapes")
    write_imagefolder(data, n_per_class=20, size=16, seed=1)
    run = tmp_path / "run"
    cfg = write_yaml(
        tmp_path,
        "train.yaml",
        {
            "model": {"arch": "test_classifier"},
            "data": {"train": data, "image_size": 16},
            "train": {"epochs": 1, "batch_size": 8},
            "output": {"dir": str(run)},
        },
    )
    assert main(["train", cfg]) == 0
    assert (
        "[raycv] train: 1 worker(s) x 2 CPU (auto: num_workers, use_gpu, cpus_per_worker)"
        in capsys.readouterr().out
    )
    card = json.loads((run / "model.json").read_text())
    assert card["config"]["scaling"] == {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 2.0}
    progress = json.loads((run / "progress.json").read_text())  # the driver's record, final
    assert progress["state"] == "done" and progress["epoch"] == progress["epochs"] == 1
