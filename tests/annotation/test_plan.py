"""One file, one name: inputs in any spelling plan and annotate as their canonical URI, and names with glob
characters are looked up as named (the annotation runs use the session's Ray and an untrained
test_classifier, as in test_annotation.py)."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycv.annotation import pipeline as annotation
from raycv.annotation.plan import plan_inputs
from raycv.config import AnnotateConfig
from raycv.data.images import encode_png
from raycv.data.synthetic import write_flat_archive
from raycv.outputs import schema as outputs
from raycv.storage import Storage
from tests._ray_cluster import write_run_dir

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

RUN = {"batch_size": 4, "actors": 1, "cpus_per_actor": 0.5}


def _png(value: int) -> bytes:
    return encode_png(np.full((8, 8, 3), value, np.uint8))


def _rows(output: str) -> pa.Table:
    return pq.read_table(os.path.join(output, "images"), columns=["image_id", "image_uri", "source_etag"])


@pytest.fixture
def tiny(tmp_path):
    """An untrained test_classifier run and 6 images to annotate with it."""
    write_flat_archive(str(tmp_path / "images"), n=6, size=32, seed=3)
    return {"model": write_run_dir(str(tmp_path / "run")), "output": str(tmp_path / "out")}


def test_one_file_in_several_spellings_is_one_plan_row(tmp_path, monkeypatch):
    path = str(tmp_path / "x.png")
    STORE.write_bytes(path, _png(1))
    monkeypatch.chdir(tmp_path)
    plan = plan_inputs(["x.png", path, "file://" + path, "./x.png", "file://x.png"], STORE)
    assert [u for u, _ in plan] == [path]
    assert plan.chunks[0]["image_id"].to_pylist() == [outputs.image_id_of(path)]
    assert {outputs.image_id_of(u) for u in ("x.png", "file://" + path, "file://localhost" + path)} == {
        outputs.image_id_of(path)
    }
    STORE.write_bytes("m.txt", b"x.png\n./x.png\nfile://" + path.encode() + b"\n")
    assert [u for u, _ in plan_inputs("m.txt", STORE)] == [path]
    assert [u for u, _ in plan_inputs("file://.", STORE)] == [path]  # a relative prefix lists absolute paths


def test_manifest_entries_with_glob_characters_keep_their_own_fingerprint(tmp_path):
    STORE.write_bytes(str(tmp_path / "d" / "img1.png"), _png(1))
    STORE.write_bytes(str(tmp_path / "d" / "img[1].png"), _png(2) + b"trailer")
    STORE.write_bytes(str(tmp_path / "d[1]" / "a.png"), _png(3))
    bracket = str(tmp_path / "d" / "img[1].png")
    STORE.write_bytes(str(tmp_path / "m.txt"), bracket.encode() + b"\n")
    [(uri, etag)] = list(plan_inputs(str(tmp_path / "m.txt"), STORE))
    assert uri == bracket and etag == f"size:{os.path.getsize(bracket)}-mtime:{os.path.getmtime(bracket)}"
    assert etag != next(iter(plan_inputs([str(tmp_path / "d" / "img1.png")], STORE)))[1]
    assert etag == STORE.file_entry(bracket).fingerprint
    assert [u for u, _ in plan_inputs(str(tmp_path / "d[1]"), STORE)] == [str(tmp_path / "d[1]" / "a.png")]
    os.remove(bracket)
    assert list(plan_inputs([bracket], STORE)) == [(bracket, None)]  # missing: an error row, not img1.png


@pytest.mark.parametrize("incremental", [True, False])
def test_annotating_by_path_then_by_file_uri_keeps_one_row_per_image(tiny, tmp_path, ray_local, incremental):
    folder = str(tmp_path / "images")
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder))
    manifest = str(tmp_path / "m.txt")
    STORE.write_bytes(manifest, "\n".join(os.path.relpath(f) for f in files).encode())
    for source in (folder, "file://" + folder, manifest, ["file://" + f for f in files]):
        cfg = AnnotateConfig(**tiny, **RUN, input=source, incremental=incremental)
        summary = annotation.run_annotation(cfg)
        assert summary.files == 6 and summary.ok + summary.skipped == 6, (source, summary)
        rows = _rows(tiny["output"])
        assert sorted(rows["image_uri"].to_pylist()) == files, source
        assert sorted(rows["image_id"].to_pylist()) == sorted(outputs.image_id_of(f) for f in files)
    assert summary.skipped == (6 if incremental else 0)


def test_a_changed_file_with_brackets_in_its_name_is_annotated_again(tiny, tmp_path, ray_local):
    """``img[1].png`` used to take the fingerprint of ``img1.png``: its change went unseen."""
    folder = tmp_path / "in"
    STORE.write_bytes(str(folder / "img1.png"), _png(10))
    bracket = str(folder / "img[1].png")
    STORE.write_bytes(bracket, _png(20))
    cfg = AnnotateConfig(**tiny, **RUN, input=[bracket, str(folder / "img1.png")], incremental=True)
    assert annotation.run_annotation(cfg).ok == 2
    assert annotation.run_annotation(cfg).skipped == 2
    shutil.copy(str(tmp_path / "images" / sorted(os.listdir(tmp_path / "images"))[0]), bracket)
    summary = annotation.run_annotation(cfg)
    assert (summary.ok, summary.skipped) == (1, 1)
    rows = _rows(tiny["output"])
    etags = dict(zip(rows["image_uri"].to_pylist(), rows["source_etag"].to_pylist(), strict=True))
    assert etags == {
        bracket: STORE.file_entry(bracket).fingerprint,
        str(folder / "img1.png"): STORE.file_entry(str(folder / "img1.png")).fingerprint,
    }
