"""Embeddings end to end: `raycv train` on generated digits -> `raycv annotate` with task `embedding` over
held-out digits -> `raycv similar`: the nearest images of a query show its digit (SPEC §6)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raycv.cli import main
from raycv.data.synthetic import write_digits
from raycv.outputs.similar import nearest
from raycv.storage import Storage
from tests._util import write_yaml

STORE = Storage()


@pytest.mark.timeout(600)
def test_embeddings_of_a_trained_digits_classifier_find_the_same_digit(tmp_path, ray_local, capsys):
    """A digits classifier (10 classes, 150 images each, 32 px) trained by raycv; the embeddings of 100
    held-out digits (its pooled penultimate features, L2-normalised): the 5 nearest images of each query
    show its digit (precision@5 >= 0.9 averaged over every query), and `raycv similar --json` lists them."""
    write_digits(str(tmp_path / "digits"), n_per_class=150, size=32, seed=0)
    cfg = write_yaml(
        tmp_path,
        "train.yaml",
        {
            "model": {"arch": "test_classifier"},
            "data": {"train": str(tmp_path / "digits"), "image_size": 32, "val_fraction": 0.2},
            "train": {"epochs": 12, "batch_size": 16, "lr": 0.003, "seed": 0},
            "scaling": {"num_workers": 1, "cpus_per_worker": 2},
            "output": {"dir": str(tmp_path / "run")},
        },
    )
    assert main(["train", cfg]) == 0
    card = json.loads(STORE.read_bytes(str(tmp_path / "run" / "model.json")))
    assert card["class_names"] == [str(d) for d in range(10)]
    assert card["best_metrics"]["accuracy"] >= 0.9, card["best_metrics"]

    truth = write_digits(str(tmp_path / "held_out"), n_per_class=10, size=32, seed=1)
    out = str(tmp_path / "emb")
    spec = {"model": {"run": str(tmp_path / "run"), "task": "embedding"}, "input": str(tmp_path / "held_out")}
    assert (
        main(["annotate", write_yaml(tmp_path, "emb.yaml", {**spec, "output": out, "batch_size": 32})]) == 0
    )
    rows = pq.read_table(f"{out}/images").to_pylist()
    assert len(rows) == 100 and {r["status"] for r in rows} == {"ok"}
    dims = {len(r["embedding"]) for r in rows}
    assert len(dims) == 1 and all(abs(np.linalg.norm(r["embedding"]) - 1) < 1e-4 for r in rows)
    precisions = []
    for r in rows:
        found = nearest(out, STORE, image_id=r["image_id"], k=5)
        assert len(found) == 5 and r["image_id"] not in {n.image_id for n in found}
        precisions.append(np.mean([truth[n.image_uri] == truth[r["image_uri"]] for n in found]))
    assert np.mean(precisions) >= 0.9, np.mean(precisions)

    query = rows[0]
    capsys.readouterr()  # what the runs printed
    assert main(["similar", out, "--id", query["image_id"], "--k", "3", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [n["image_id"] for n in listed] == [
        n.image_id for n in nearest(out, STORE, image_id=query["image_id"], k=3)
    ]
