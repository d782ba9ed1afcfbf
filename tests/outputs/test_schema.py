import datetime as dt
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from raycv.annotation import commit as outputs_commit
from raycv.outputs import schema as outputs
from raycv.storage import Storage

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)


def _rows(
    run_id: str, uris: list[str], status: str = "ok", frames: list[int | None] | None = None, count=None
) -> pa.Table:
    n = len(uris)
    now = dt.datetime.now(dt.timezone.utc)
    cols = {
        "image_id": [outputs.image_id_of(u) for u in uris],
        "image_uri": uris,
        "frame": frames or [None] * n,
        "frame_count": [count if f is not None else None for f in frames or [None] * n],
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


def _stage(out: str, run_id: str, uris: list[str], **kw) -> None:
    path = os.path.join(outputs_commit.staging_dir(out, run_id), "part-0.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(_rows(run_id, uris, **kw), path)


def test_image_id_is_stable_and_distinct():
    assert outputs.image_id_of("s3://b/a.jpg") == outputs.image_id_of("s3://b/a.jpg")
    assert outputs.image_id_of("s3://b/a.jpg") != outputs.image_id_of("s3://b/b.jpg")
    assert len(outputs.image_id_of("x")) == 32


def test_staged_rows_are_invisible_until_committed(tmp_path):
    out = str(tmp_path / "out")
    _stage(out, "r1", ["a", "b"])
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    assert pq.read_table(os.path.join(out, "images")).num_rows == 0
    files = outputs_commit.commit(out, "r1", {}, STORE)
    table = pq.read_table(os.path.join(out, "images"))
    assert sorted(table.column("image_uri").to_pylist()) == ["a", "b"] and len(files) == 1
    assert not os.path.exists(outputs_commit.staging_dir(out, "r1"))


def test_rerun_supersedes_old_rows_so_each_image_has_one(tmp_path):
    out = str(tmp_path / "out")
    _stage(out, "r1", ["a", "b", "c"])
    outputs_commit.commit(out, "r1", {}, STORE)
    index = outputs.read_index(out, STORE)
    assert sorted(index.table["source_uri"].to_pylist()) == ["a", "b", "c"]
    _stage(out, "r2", ["b", "d"])
    supersede = index.superseded(outputs_commit.staged_sources(out, "r2", STORE))
    assert list(supersede.values()) == [[outputs.image_id_of("b")]]
    outputs_commit.commit(out, "r2", supersede, STORE)
    table = pq.read_table(os.path.join(out, "images"))
    runs = dict(zip(table.column("image_uri").to_pylist(), table.column("run_id").to_pylist(), strict=True))
    assert runs == {"a": "r1", "b": "r2", "c": "r1", "d": "r2"}
    assert outputs.count_status(outputs.committed_files(out, STORE), STORE) == {"ok": 4}


def test_a_half_done_commit_is_finished_by_recover(tmp_path):
    out = str(tmp_path / "out")
    _stage(out, "r1", ["a", "b"])
    outputs_commit.commit(out, "r1", {}, STORE)
    old = outputs.committed_files(out, STORE)[0]
    _stage(out, "r2", ["a"])
    # the journal of a commit that crashed right after being written
    staged = next(STORE.iter_files(outputs_commit.staging_dir(out, "r2"))).uri
    journal = {
        "run_id": "r2",
        "moves": [[staged, os.path.join(out, "images", "r2-00000.parquet")]],
        "supersede": {old: [outputs.image_id_of("a")]},
    }
    STORE.write_bytes(os.path.join(out, "_journal", "r2.json"), json.dumps(journal).encode())
    assert outputs_commit.recover(out, STORE) == ["r2"]
    table = pq.read_table(os.path.join(out, "images"))
    assert sorted(zip(table.column("image_uri").to_pylist(), table.column("run_id").to_pylist())) == [
        ("a", "r2"),
        ("b", "r1"),
    ]
    assert outputs_commit.recover(out, STORE) == []


def test_frames_are_superseded_by_their_source_file_and_current_only_when_complete(tmp_path):
    out = str(tmp_path / "out")
    vol = "s3://b/ct.dcm"
    frames = [outputs.frame_uri(vol, k) for k in range(3)]
    assert frames[1] == "s3://b/ct.dcm#frame=1"
    _stage(out, "r1", [*frames, "s3://b/x#frame=7.png"], frames=[0, 1, 2, None], count=3)
    outputs_commit.commit(out, "r1", {}, STORE)
    index = outputs.read_index(out, STORE)
    assert sorted(set(index.table["source_uri"].to_pylist())) == [vol, "s3://b/x#frame=7.png"]
    current = index.current("m")
    keys = outputs.plan_keys(pa.array([vol, "s3://b/x#frame=7.png"]), pa.array(["e", "e"]))
    assert sorted(current["key"].to_pylist()) == sorted(keys.to_pylist())
    assert sorted(current["rows"].to_pylist()) == [1, 3]
    assert index.current("other-model").num_rows == 0
    # a stopped run left 2 of 3 frames: not current; a re-run's single error row replaces all frames
    partial = str(tmp_path / "partial")
    _stage(partial, "r1", frames[:2], frames=[0, 1], count=3)
    outputs_commit.commit(partial, "r1", {}, STORE)
    assert outputs.read_index(partial, STORE).current("m").num_rows == 0
    _stage(out, "r2", [vol], status="error")
    supersede = outputs.read_index(out, STORE).superseded(outputs_commit.staged_sources(out, "r2", STORE))
    assert sorted(next(iter(supersede.values()))) == sorted(outputs.image_id_of(u) for u in frames)
    outputs_commit.commit(out, "r2", supersede, STORE)
    table = pq.read_table(os.path.join(out, "images"))
    assert sorted(table["image_uri"].to_pylist()) == [vol, "s3://b/x#frame=7.png"]


def test_index_reads_files_written_before_the_frame_columns(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "images"))
    old = _rows("r0", ["a", "b"]).drop_columns(["frame", "frame_count"])
    pq.write_table(old, os.path.join(out, "images", "r0-00000.parquet"))
    index = outputs.read_index(out, STORE)
    assert index.table["source_uri"].to_pylist() == ["a", "b"] and index.table["frame"].null_count == 2
    assert index.current("m").num_rows == 2
