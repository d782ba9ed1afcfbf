"""Issue 5, multi-node: `raycv annotate --address` on a two-node Ray cluster (a head and a worker node on
this machine, token auth on) places annotation actors on both nodes and writes one row per image."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from raycv.data.synthetic import write_flat_archive
from tests._ray_cluster import BIN, LocalCluster, write_run_dir
from tests._util import write_yaml

N_IMAGES = 24


@pytest.fixture(scope="module")
def two_nodes():
    c = LocalCluster(head_cpus=1)
    try:
        c.add_worker(1)
        yield c
    finally:
        c.stop()


def test_annotation_actors_run_on_both_nodes(two_nodes, tmp_path):
    write_flat_archive(str(tmp_path / "images"), n=N_IMAGES, size=32, seed=2)
    out = str(tmp_path / "out")
    cfg = write_yaml(
        tmp_path,
        "annotate.yaml",
        {
            "model": write_run_dir(str(tmp_path / "run")),
            "input": str(tmp_path / "images"),
            "output": out,
            "batch_size": 2,
            "actors": 2,
            # Two actors could share one node: Ray Data's own "SPREAD" is best-effort (the read tasks can
            # fill a node first); raycv's placement group, placed before any task of the run, puts one
            # on each.
            "cpus_per_actor": 0.5,
        },
    )
    raycv = [str(BIN / "raycv")] if (BIN / "raycv").exists() else [sys.executable, "-m", "raycv.cli"]
    # A subprocess: this test process may already hold the session's local Ray (ray_local).
    proc = subprocess.run(
        [*raycv, "annotate", cfg, "--address", two_nodes.gcs],
        env=two_nodes.env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pq.read_table(f"{out}/images").to_pylist()
    assert len(rows) == len({r["image_uri"] for r in rows}) == N_IMAGES
    assert all(r["status"] == "ok" for r in rows)

    # Which node ran each annotation actor: its worker's log lives under that node's own --temp-dir.
    annotators = [a for a in two_nodes.actors() if "Classifier" in a["class_name"]]
    assert len(annotators) >= 2, [a["class_name"] for a in two_nodes.actors()]
    assert all(a.get("placement_group_id") for a in annotators), annotators
    used = {two_nodes.node_of_worker(int(a["pid"])) for a in annotators}
    assert len(two_nodes.alive_nodes()) == 2 and len(used) == 2, used
