"""Classification end to end on S3: `raycv train` (2 Ray Train workers) -> `raycv annotate` -> Parquet.

Real parts only: moto's S3 server over HTTP, a local Ray, the `raycv` CLI entry point, pyarrow reading back.
"""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from raycv.cli import main
from raycv.data.special_images import make_special_images
from raycv.data.synthetic import write_flat_archive, write_imagefolder
from raycv.storage import Storage
from tests._util import create_bucket, write_yaml

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

BAD = {"truncated.jpg": "decode", "empty.png": "decode", "text.png": "decode", "bomb.png": "decode"}
GOOD_SPECIAL = [
    "gray16.png",
    "cmyk.jpg",
    "rgba.png",
    "gray.png",
    "exif_rotated.jpg",
    "palette.gif",
    "image.webp",
    "image.bmp",
    "image.tif",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local, s3_endpoint):
    create_bucket("e2e")
    write_imagefolder("s3://e2e/datasets/shapes", n_per_class=100, size=32, seed=0)
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = write_yaml(
        tmp,
        "train.yaml",
        {
            "model": {"arch": "test_classifier"},
            "data": {"train": "s3://e2e/datasets/shapes", "image_size": 32, "val_fraction": 0.2},
            "train": {"epochs": 15, "batch_size": 8, "lr": 0.003, "seed": 0},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            "output": {"dir": "s3://e2e/runs/shapes", "max_failures": 1},
        },
    )
    assert main(["train", cfg]) == 0
    return {"cfg": cfg, "run": "s3://e2e/runs/shapes", "tmp": tmp}


def _annotate(tmp, run: str, inp, out: str, **extra) -> dict:
    cfg = write_yaml(
        tmp,
        "annotate.yaml",
        {
            "model": run,
            "input": inp,
            "output": out,
            "batch_size": 16,
            "actors": 2,
            "cpus_per_actor": 0.5,
            **extra,
        },
    )
    assert main(["annotate", cfg]) == 0
    return json.loads(STORE.read_bytes(f"{out}/_summary.json"))


def _read(out: str) -> list[dict]:
    fs, path = STORE.pyarrow_filesystem(out)
    return pq.read_table(f"{path}/images", filesystem=fs).to_pylist()


def test_training_writes_the_run_directory_and_learns(trained):
    lines = STORE.read_bytes(f"{trained['run']}/metrics.jsonl").decode().splitlines()
    history = [json.loads(x) for x in lines]
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert {"train_loss", "accuracy", "precision", "recall", "f1"} <= set(history[-1])
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    card = json.loads(STORE.read_bytes(f"{trained['run']}/model.json"))
    assert card["class_names"] == ["circle", "square", "triangle"] and card["num_classes"] == 3
    assert card["arch"] == "test_classifier" and card["task"] == "classification" and card["image_size"] == 32
    assert card["best_metrics"]["accuracy"] >= 0.9, card["best_metrics"]
    assert card["val_images"] == 60 and card["train_images"] == 240
    assert card["config"]["train"]["epochs"] == 15


def test_evaluate_prints_the_metrics_as_json(trained, capsys):
    assert main(["evaluate", trained["cfg"]]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 60 and result["accuracy"] >= 0.9
    assert sum(map(sum, result["confusion_matrix"])) == 60


def test_annotate_archive_one_row_per_file_with_errors_as_rows(trained):
    truth = write_flat_archive("s3://e2e/archive", n=60, size=48, seed=7)
    for name, data in make_special_images().items():
        STORE.write_bytes(f"s3://e2e/archive/special/{name}", data)
    n_files = len(list(STORE.iter_files("s3://e2e/archive")))
    summary = _annotate(trained["tmp"], trained["run"], "s3://e2e/archive/", "s3://e2e/out/a")
    rows = _read("s3://e2e/out/a")
    uris = [r["image_uri"] for r in rows]
    assert len(uris) == len(set(uris)) == n_files == summary["total"]
    assert summary["ok"] + summary["error"] == n_files and summary["skipped"] == 0
    by_name = {os.path.basename(r["image_uri"]): r for r in rows}
    for name, stage in BAD.items():
        r = by_name[name]
        assert r["status"] == "error" and r["error_stage"] == stage, r
        assert r["error_type"] == "DecodeError" and name in r["error_message"] and r["label"] is None
    assert "empty" in by_name["empty.png"]["error_message"]
    assert "pixels" in by_name["bomb.png"]["error_message"]
    for name in GOOD_SPECIAL:
        assert by_name[name]["status"] == "ok" and by_name[name]["label_name"] in {
            "circle",
            "square",
            "triangle",
        }
    assert (by_name["exif_rotated.jpg"]["height"], by_name["exif_rotated.jpg"]["width"]) == (40, 20)
    correct = sum(by_name[os.path.basename(u)]["label"] == label for u, label in truth.items())
    assert correct / len(truth) >= 0.9
    ok = next(r for r in rows if r["image_uri"] in truth)
    assert len(ok["topk"]) == 3 and ok["topk"][0]["label"] == ok["label"] and 0 < ok["score"] <= 1
    assert ok["model_id"] == summary["model_id"] and ok["run_id"] == summary["run_id"]
    assert ok["source_etag"].startswith("etag:") and ok["width"] == 48


def test_rerun_never_duplicates_and_incremental_skips(trained):
    write_flat_archive("s3://e2e/small", n=12, size=32, seed=3)
    first = _annotate(trained["tmp"], trained["run"], "s3://e2e/small", "s3://e2e/out/b")
    assert (first["total"], first["ok"], first["skipped"]) == (12, 12, 0)
    again = _annotate(trained["tmp"], trained["run"], "s3://e2e/small", "s3://e2e/out/b")
    assert (again["total"], again["skipped"], again["ok"]) == (12, 12, 0)
    write_flat_archive("s3://e2e/small", n=15, size=32, seed=3)  # 3 new files, the first 12 rewritten equal
    forced = _annotate(trained["tmp"], trained["run"], "s3://e2e/small", "s3://e2e/out/b", incremental=False)
    assert (forced["total"], forced["ok"], forced["skipped"]) == (15, 15, 0)
    rows = _read("s3://e2e/out/b")
    assert len(rows) == 15 and len({r["image_uri"] for r in rows}) == 15
    assert {r["run_id"] for r in rows} == {forced["run_id"]}


def test_manifest_input(trained, tmp_path):
    uris = [e.uri for e in STORE.iter_files("s3://e2e/small")][:5]
    STORE.write_bytes("s3://e2e/manifests/five.txt", ("\n".join(uris) + "\n").encode())
    summary = _annotate(trained["tmp"], trained["run"], "s3://e2e/manifests/five.txt", "s3://e2e/out/c")
    assert summary["total"] == 5 and summary["ok"] == 5
    assert sorted(r["image_uri"] for r in _read("s3://e2e/out/c")) == sorted(uris)
