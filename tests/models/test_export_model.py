"""`raycv export-model`: a tiny run of each task trained with `raycv train`, exported to each format it supports
(onto the S3 server), annotates the same images as its run directory does: identical labels (scores within
1e-4), >= 99.9% identical mask pixels, boxes matched at IoU >= 0.99 with the same labels."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from raycv.cli import main
from raycv.data.images import decode_png_mask
from raycv.data.synthetic import write_detection_dataset, write_imagefolder, write_masks_dataset
from raycv.models import get_model_info
from raycv.storage import Storage
from tests._util import create_bucket, write_yaml

STORE = Storage()
# task -> (tiny registry model, dataset format)
TASKS = {
    "classification": ("test_classifier", "imagefolder"),
    "semantic_segmentation": ("test_segmenter", "masks"),
    "detection": ("test_detector", "coco"),
    "instance_segmentation": ("test_instance_segmenter", "coco"),
}
FORMATS = ("onnx", "pt2", "torchscript")
CASES = [
    pytest.param(task, fmt)
    for task, (arch, _) in TASKS.items()
    for fmt in FORMATS
    if fmt not in get_model_info(arch).export_notes
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local, s3_endpoint) -> dict:
    """Datasets, a few images to annotate per task, and a cache of trained runs and their annotations."""
    bucket = create_bucket("export-model")
    write_imagefolder(f"{bucket}/data/classification", n_per_class=6, size=32, seed=0)
    write_masks_dataset(f"{bucket}/data/semantic_segmentation", n=24, size=48, seed=0)
    write_detection_dataset(f"{bucket}/data/coco", n=24, size=64, seed=0, fmt="coco", n_objects=(1, 3))
    write_masks_dataset(f"{bucket}/archive/seg", n=4, size=(40, 56), seed=3)
    write_detection_dataset(f"{bucket}/archive/det/a", n=4, size=(80, 112), seed=5, fmt="coco")
    # sizes whose resize TorchScript and ONNX computed to a pixel less than eager mode before raycv's exact resize
    write_detection_dataset(f"{bucket}/archive/det/tall", n=2, size=(100, 75), seed=6, fmt="coco")
    write_detection_dataset(f"{bucket}/archive/det/wide", n=2, size=(75, 100), seed=7, fmt="coco")
    return {"bucket": bucket, "tmp": tmp_path_factory.mktemp("export"), "runs": {}, "annotated": {}}


def _inputs(world: dict, task: str) -> str:
    b = world["bucket"]
    if task == "classification":
        return f"{b}/data/classification/circle/"  # a few of the training images suffice for parity
    # the detection archive's images (its COCO files are not images: never listed)
    return f"{b}/archive/seg/images/" if task == "semantic_segmentation" else f"{b}/archive/det/"


def _run(world: dict, task: str) -> str:
    """One `raycv train` per task (cached for the module): 2 epochs, 1 worker, 32-64 px."""
    if task in world["runs"]:
        return world["runs"][task]
    arch, fmt = TASKS[task]
    data = f"{world['bucket']}/data/{'coco' if fmt == 'coco' else task}"
    run = f"{world['bucket']}/runs/{task}"
    cfg = write_yaml(
        world["tmp"],
        f"train-{task}.yaml",
        {
            "task": task,
            "model": {"arch": arch},
            "data": {"train": data, "format": fmt, "image_size": 64 if fmt == "coco" else 32},
            "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "scheduler": "none"},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "output": {"dir": run},
        },
    )
    assert main(["train", cfg]) == 0
    world["runs"][task] = run
    return run


def _annotate(world: dict, task: str, model: str, name: str) -> dict[str, list[dict]]:
    """Rows of `images` (and `objects`) by image_uri, from annotating the task's inputs with ``model``."""
    out = f"{world['bucket']}/out/{name}"
    cfg = write_yaml(
        world["tmp"],
        f"annotate-{name}.yaml",
        {
            "model": model,
            "input": _inputs(world, task),
            "output": out,
            "batch_size": 4,
            "actors": 1,
            "score_threshold": 0.05,
        },
    )
    assert main(["annotate", cfg]) == 0
    fs, path = STORE.pyarrow_filesystem(out)
    tables = {"images": pq.read_table(f"{path}/images", filesystem=fs).to_pylist()}
    if task in ("detection", "instance_segmentation"):
        tables["objects"] = pq.read_table(f"{path}/objects", filesystem=fs).to_pylist()
    by_uri: dict[str, list[dict]] = {}
    for table, rows in tables.items():
        for r in rows:
            by_uri.setdefault(f"{table}:{r['image_uri']}", []).append(r)
    return by_uri


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix
    return ix / union if union > 0 else 0.0


def _same(task: str, ref: dict[str, list[dict]], got: dict[str, list[dict]]) -> None:
    images = sorted(k for k in ref if k.startswith("images:"))
    assert images and images == sorted(k for k in got if k.startswith("images:"))
    for key in images:
        r, g = ref[key][0], got[key][0]
        assert r["status"] == g["status"] == "ok", g
        if task == "classification":
            assert r["label"] == g["label"] and r["score"] == pytest.approx(g["score"], abs=1e-4)
        elif task == "semantic_segmentation":
            a, b = decode_png_mask(r["mask_png"]), decode_png_mask(g["mask_png"])
            assert a.shape == b.shape and (a == b).mean() >= 0.999
    if task in ("detection", "instance_segmentation"):
        objects = sorted(k for k in ref if k.startswith("objects:"))
        assert objects, "the run directory found no boxes above score_threshold"
        assert objects == sorted(k for k in got if k.startswith("objects:"))
        for key in objects:
            assert len(ref[key]) == len(got[key]), key
            for o in ref[key]:
                best = max(got[key], key=lambda p: _iou(o["box"], p["box"]))
                assert _iou(o["box"], best["box"]) >= 0.99 and best["label"] == o["label"], (o, best)


@pytest.mark.parametrize(("task", "fmt"), CASES)
def test_export_annotates_like_the_run(world, task, fmt):
    run = _run(world, task)
    if task not in world["annotated"]:
        world["annotated"][task] = _annotate(world, task, run, f"{task}-run")
    out = f"{world['bucket']}/exports/{task}-{fmt}"
    assert main(["export-model", run, "--format", fmt, "--out", out]) == 0
    card = STORE.read_bytes(f"{out}/model.json").decode()
    assert f'"format": "{fmt}"' in card and STORE.exists(
        f"{out}/model.{ {'torchscript': 'ts'}.get(fmt, fmt) }"
    )
    _same(task, world["annotated"][task], _annotate(world, task, out, f"{task}-{fmt}"))


def test_a_format_a_model_cannot_export_to_exits_2_with_the_reason(world, capsys):
    arch, task = "test_detector", "detection"
    fmt, why = next(iter(get_model_info(arch).export_notes.items()))
    assert main(["export-model", _run(world, task), "--format", fmt, "--out", str(world["tmp"] / "x")]) == 2
    assert why[:40] in capsys.readouterr().err


def test_models_lists_the_formats_and_why_not(capsys):
    assert main(["models", "test_*"]) == 0
    out = capsys.readouterr().out
    assert "exports to" in out and "onnx,pt2,torchscript" in out
    assert "test_detector -> pt2: cannot" in out
