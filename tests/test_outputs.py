import datetime as dt
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from raycv import outputs, storage


def _rows(run_id: str, uris: list[str], status: str = "ok") -> pa.Table:
    n = len(uris)
    now = dt.datetime.now(dt.timezone.utc)
    cols = {
        "image_id": [outputs.image_id_of(u) for u in uris],
        "image_uri": uris,
        "source_etag": ["e"] * n,
        "status": [status] * n,
        "error_stage": [None] * n,
        "error_type": [None] * n,
        "error_message": [None] * n,
        "width": [4] * n,
        "height": [4] * n,
        "task": ["classification"] * n,
        "model_id": ["m"] * n,
        "run_id": [run_id] * n,
        "annotated_at": [now] * n,
        "crs": [None] * n,
        "transform": [None] * n,
        "label": [1] * n,
        "label_name": ["b"] * n,
        "score": [0.5] * n,
        "topk": [[{"label": 1, "label_name": "b", "score": 0.5}]] * n,
    }
    return pa.table(cols, schema=outputs.images_schema("classification"))


def _stage(out: str, run_id: str, uris: list[str]) -> None:
    path = os.path.join(outputs.staging_dir(out, run_id), "part-0.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(_rows(run_id, uris), path)


def test_image_id_is_stable_and_distinct():
    assert outputs.image_id_of("s3://b/a.jpg") == outputs.image_id_of("s3://b/a.jpg")
    assert outputs.image_id_of("s3://b/a.jpg") != outputs.image_id_of("s3://b/b.jpg")
    assert len(outputs.image_id_of("x")) == 32


def test_staged_rows_are_invisible_until_committed(tmp_path):
    out = str(tmp_path / "out")
    _stage(out, "r1", ["a", "b"])
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    assert pq.read_table(os.path.join(out, "images")).num_rows == 0
    files = outputs.commit(out, "r1", {}, None)
    table = pq.read_table(os.path.join(out, "images"))
    assert sorted(table.column("image_uri").to_pylist()) == ["a", "b"] and len(files) == 1
    assert not os.path.exists(outputs.staging_dir(out, "r1"))


def test_rerun_supersedes_old_rows_so_each_image_has_one(tmp_path):
    out = str(tmp_path / "out")
    _stage(out, "r1", ["a", "b", "c"])
    outputs.commit(out, "r1", {}, None)
    index = outputs.read_index(out)
    assert set(index) == {outputs.image_id_of(u) for u in "abc"}
    _stage(out, "r2", ["b", "d"])
    old = index[outputs.image_id_of("b")].file
    outputs.commit(out, "r2", {old: [outputs.image_id_of("b")]}, None)
    table = pq.read_table(os.path.join(out, "images"))
    runs = dict(zip(table.column("image_uri").to_pylist(), table.column("run_id").to_pylist(), strict=True))
    assert runs == {"a": "r1", "b": "r2", "c": "r1", "d": "r2"}
    assert outputs.count_status(outputs.committed_files(out)) == {"ok": 4}


def test_a_half_done_commit_is_finished_by_recover(tmp_path):
    out = str(tmp_path / "out")
    _stage(out, "r1", ["a", "b"])
    outputs.commit(out, "r1", {}, None)
    old = outputs.read_index(out)[outputs.image_id_of("a")].file
    _stage(out, "r2", ["a"])
    # the journal of a commit that crashed right after being written
    staged = next(storage.iter_files(outputs.staging_dir(out, "r2"))).uri
    journal = {
        "run_id": "r2",
        "moves": [[staged, os.path.join(out, "images", "r2-00000.parquet")]],
        "supersede": {old: [outputs.image_id_of("a")]},
    }
    storage.write_bytes(os.path.join(out, "_journal", "r2.json"), json.dumps(journal).encode())
    assert outputs.recover(out) == ["r2"]
    table = pq.read_table(os.path.join(out, "images"))
    assert sorted(zip(table.column("image_uri").to_pylist(), table.column("run_id").to_pylist())) == [
        ("a", "r2"),
        ("b", "r1"),
    ]
    assert outputs.recover(out) == []
