"""Input planning, the read/decode stage and the driver's writes, without a model; the model actors'
placement group (the full pipeline: test_end_to_end.py, test_annotation_medical.py)."""

import glob
import json
import os
import re
import shutil
import time
import tracemalloc
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file

from raycv.annotation import pipeline as annotation
from raycv.annotation import placement
from raycv.annotation.plan import PLAN_SCHEMA, plan_inputs
from raycv.annotation.read import read_bytes_batch, read_decode_batch
from raycv.annotation.write import write_blocks
from raycv.cli import main
from raycv.config import AnnotateConfig
from raycv.data.images import decode_image, encode_png
from raycv.data.synthetic import write_flat_archive
from raycv.errors import ConfigError
from raycv.outputs import schema as outputs
from raycv.storage import Storage
from tests._ray_cluster import write_run_dir
from tests._util import write_yaml

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)


@pytest.fixture
def archive(tmp_path):
    for rel in ["a/1.png", "a/2.jpg", "b/3.png", "notes.txt"]:
        STORE.write_bytes(str(tmp_path / rel), encode_png(np.zeros((4, 6, 3), np.uint8)))
    return tmp_path


def test_prefix_glob_and_list_inputs(archive):
    by_prefix = [u for u, _ in plan_inputs(str(archive), STORE)]
    assert [u.split(str(archive))[1] for u in by_prefix] == ["/a/1.png", "/a/2.jpg", "/b/3.png"]
    assert [u for u, _ in plan_inputs(str(archive / "*" / "*.png"), STORE)] == [
        str(archive / "a/1.png"),
        str(archive / "b/3.png"),
    ]
    listed = plan_inputs(
        [str(archive / "b/3.png"), str(archive / "a/1.png"), str(archive / "b/3.png")], STORE
    )
    assert [u for u, _ in listed] == [
        str(archive / "b/3.png"),
        str(archive / "a/1.png"),
    ]  # order kept, de-duplicated
    assert all(f and f.startswith("size:") for _, f in listed)


def test_manifests_txt_csv_parquet(archive, tmp_path):
    uris = [str(archive / "a/1.png"), str(archive / "b/3.png")]
    STORE.write_bytes(str(tmp_path / "m.txt"), ("# comment\n" + "\n".join(uris) + "\n").encode())
    STORE.write_bytes(
        str(tmp_path / "m.csv"), ("image_uri,other\n" + "\n".join(f"{u},1" for u in uris)).encode()
    )
    pq.write_table(pa.table({"image_uri": uris}), str(tmp_path / "m.parquet"))
    for name in ["m.txt", "m.csv", "m.parquet"]:
        assert [u for u, _ in plan_inputs(str(tmp_path / name), STORE)] == uris
    pq.write_table(pa.table({"path": uris}), str(tmp_path / "bad.parquet"))
    with pytest.raises(ConfigError, match="needs an 'image_uri' column"):
        plan_inputs(str(tmp_path / "bad.parquet"), STORE)
    with pytest.raises(ConfigError, match="Nothing there"):
        plan_inputs(str(tmp_path / "missing"), STORE)


def test_read_decode_turns_each_failure_into_its_own_error(archive):
    uris = [str(archive / "a/1.png"), str(archive / "missing.png"), str(archive / "notes.txt")]
    batch = {"image_uri": np.array(uris, dtype=object), "image_id": np.array(["x", "y", "z"], dtype=object)}
    out = read_decode_batch(batch, size_hw=(8, 8), store=STORE, max_pixels=10_000)
    assert out["pixels"].shape == (3, 8, 8, 3) and out["pixels"].dtype == np.uint8
    assert out["width"].tolist() == [6, -1, 6] and out["height"].tolist() == [4, -1, 4]
    assert list(out["error_stage"]) == ["", "read", ""]
    assert out["error_type"][1] == "FileNotFoundError" and "missing.png" in out["error_message"][1]
    small = read_decode_batch(batch, size_hw=(8, 8), store=STORE, max_pixels=10)
    assert small["error_stage"][0] == "decode" and "pixels" in small["error_message"][0]


def test_a_large_prefix_is_listed_into_arrow_chunks(tmp_path):
    """A few thousand objects: the plan is built chunk by chunk, never as one Python list of the listing."""
    root = tmp_path / "big"
    for d in range(40):
        os.makedirs(root / f"d{d:02d}")
        for i in range(75):
            (root / f"d{d:02d}" / f"{i:03d}.png").write_bytes(b"x")
    (root / "d00" / "notes.txt").write_bytes(b"x")
    tracemalloc.start()
    plan = plan_inputs(str(root), STORE, chunk_rows=500)
    _, plan_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    listed = [(e.uri, e.fingerprint) for e in STORE.iter_files(str(root), extensions=(".png",))]
    ids = [outputs.image_id_of(u) for u, _ in listed]
    _, list_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(plan) == 3000 == len(listed)
    assert [c.num_rows for c in plan.chunks] == [500] * 6 and all(
        c.schema == PLAN_SCHEMA for c in plan.chunks
    )
    assert [u for u, _ in plan] == [u for u, _ in listed] and plan.chunks[5]["image_id"][-1].as_py() == ids[
        -1
    ]
    assert plan_peak < 0.5 * list_peak, (plan_peak, list_peak)  # Arrow buffers are outside tracemalloc
    blocks = plan.blocks(actors=2)
    assert sum(b.num_rows for b in blocks) == 3000 and max(b.num_rows for b in blocks) == 64


def _medical(tmp_path) -> dict[str, str]:
    files = {
        "rtdose.dcm": get_testdata_file("rtdose.dcm", download=False),  # 15 frames
        "rle_2frame.dcm": get_testdata_file("SC_rgb_rle_2frame.dcm", download=False),
        "ct.dcm": get_testdata_file("CT_small.dcm", download=False),
        "brain.nii": os.path.join(NIBABEL_DATA, "anatomical.nii"),  # 25 axial slices
        "lossy.dcm": get_testdata_file("JPEG-lossy.dcm", download=False),  # no decoder for 12-bit JPEG here
    }
    out = {}
    for name, src in files.items():
        shutil.copy(str(src), tmp_path / name)
        out[name] = str(tmp_path / name)
    (tmp_path / "corrupt.dcm").write_bytes(b"patient,age\nanon,42\n" * 20)
    out["corrupt.dcm"] = str(tmp_path / "corrupt.dcm")
    return out


EXPECTED_FRAMES = {"rtdose.dcm": 15, "rle_2frame.dcm": 2, "ct.dcm": 1, "brain.nii": 25, "lossy.dcm": 1}


def _batch(uris: list[str]) -> dict[str, np.ndarray]:
    return {
        "image_id": np.array([outputs.image_id_of(u) for u in uris], dtype=object),
        "image_uri": np.array(uris, dtype=object),
        "source_etag": np.array(["e"] * len(uris), dtype=object),
    }


@pytest.mark.parametrize("stage", ["decode", "bytes"])
def test_medical_files_expand_into_one_row_per_frame(tmp_path, stage):
    files = _medical(tmp_path)
    uris = list(files.values())
    if stage == "decode":
        out = read_decode_batch(_batch(uris), size_hw=(16, 16), store=STORE, max_pixels=10**8)
        assert out["pixels"].shape == (len(out["image_uri"]), 16, 16, 3)
    else:
        out = read_bytes_batch(_batch(uris), store=STORE, max_pixels=10**8)
    n = sum(EXPECTED_FRAMES.values()) + 1
    assert all(len(v) == n for v in out.values()), {k: len(v) for k, v in out.items()}
    rows = [dict(zip(out, vals, strict=True)) for vals in zip(*out.values(), strict=True)]
    assert len({r["image_uri"] for r in rows}) == n
    for name, uri in files.items():
        mine = [r for r in rows if r["image_uri"] == uri or r["image_uri"].startswith(uri + "#frame=")]
        frames = EXPECTED_FRAMES.get(name, 1)
        assert len(mine) == frames, name
        if frames > 1:
            assert [r["frame"] for r in mine] == list(range(frames))
            assert [r["image_uri"] for r in mine] == [f"{uri}#frame={k}" for k in range(frames)]
            assert {r["frame_count"] for r in mine} == {frames}
            assert all(r["image_id"] == outputs.image_id_of(r["image_uri"]) for r in mine)
        else:
            assert mine[0]["frame"] == -1 and mine[0]["image_id"] == outputs.image_id_of(uri)
    by_uri = {r["image_uri"]: r for r in rows}
    for bad, words in [("lossy.dcm", "JPEG Extended"), ("corrupt.dcm", "not a DICOM file")]:
        r = by_uri[files[bad]]
        assert (r["error_stage"], r["error_type"]) == ("decode", "DecodeError") and words in r[
            "error_message"
        ]
    good = by_uri[files["rtdose.dcm"] + "#frame=3"]
    assert good["error_stage"] == ""
    if stage == "bytes":  # frames travel as PNG of the displayed pixels, decoded by the actors like any image
        assert decode_image(bytes(good["data"])).shape == (10, 10, 3)
        assert decode_image(bytes(by_uri[files["brain.nii"] + "#frame=0"]["data"])).shape == (41, 33, 3)
    else:
        assert (good["width"], good["height"]) == (10, 10)
    small = read_decode_batch(_batch([files["ct.dcm"]]), size_hw=(8, 8), store=STORE, max_pixels=100)
    assert small["error_stage"][0] == "decode" and "pixels" in small["error_message"][0]


def test_writes_stop_taking_blocks_once_too_many_images_failed(tmp_path, ray_local):
    """The driver's write loop: counts come back from the write tasks; past the limit no block is taken."""
    import ray

    def block(i: int, status: str) -> pa.Table:
        uris = [f"s3://b/{i}-{j}.png" for j in range(4)]
        return pa.table(
            {
                "image_uri": uris,
                "status": [status] * 4,
                "error_stage": ["decode"] * 4,
                "error_type": ["DecodeError"] * 4,
                "error_message": ["bad"] * 4,
            }
        )

    taken = []

    def blocks():
        for i in range(40):
            taken.append(i)
            time.sleep(0.25)  # a pipeline that is slower than the writes, as on a large archive
            yield ray.put(block(i, "ok" if i % 4 == 0 else "error")), 4, 1000

    staging = str(tmp_path / "staging")
    tally = write_blocks(blocks(), staging, STORE, max_error_fraction=0.5, in_flight=2, rows_per_file=8)
    assert tally.exceeds(0.5) and len(taken) < 40
    assert len(tally.first_errors) == 3
    assert all(re.fullmatch(r"s3://b/\d+-\d\.png: decode DecodeError: bad", e) for e in tally.first_errors)
    written = pq.read_table(staging)
    assert written.num_rows == tally.ok + tally.error == 4 * len(taken)
    assert tally.error == written.filter(pa.compute.equal(written["status"], "error")).num_rows


def test_blocks_are_grouped_into_files_by_rows_and_by_bytes(tmp_path, ray_local, monkeypatch):
    """Files of >= rows_per_file rows (whole blocks), fewer when the blocks pass MAX_FILE_BYTES; every
    row written once, in order."""
    import ray

    from raycv.annotation import write as writing

    def blocks(n: int, size: int):
        for i in range(n):
            rows = {"image_uri": [f"u{i}-{j}" for j in range(4)], "status": ["ok"] * 4}
            rows.update({k: [None] * 4 for k in ("error_stage", "error_type", "error_message")})
            yield ray.put(pa.table(rows)), 4, size

    def files(staging: str) -> list[list[str]]:
        return [
            pq.read_table(p).column("image_uri").to_pylist()
            for p in sorted(glob.glob(f"{staging}/*.parquet"))
        ]

    tally = write_blocks(blocks(10, 1000), str(tmp_path / "a"), STORE, 1.0, in_flight=2, rows_per_file=10)
    written = files(str(tmp_path / "a"))
    assert [len(f) for f in written] == [12, 12, 12, 4] and tally.ok == 40
    assert [u for f in written for u in f] == [f"u{i}-{j}" for i in range(10) for j in range(4)]
    # The first files are small and double (32, 64, ... rows) up to rows_per_file: errors are judged early.
    write_blocks(blocks(40, 1000), str(tmp_path / "c"), STORE, 1.0, in_flight=2, rows_per_file=10_000)
    assert [len(f) for f in files(str(tmp_path / "c"))] == [32, 64, 64]
    monkeypatch.setattr(writing, "MAX_FILE_BYTES", 2500)  # two blocks of 1000 bytes fit, the third flushes
    write_blocks(blocks(5, 1000), str(tmp_path / "b"), STORE, 1.0, in_flight=2, rows_per_file=10_000)
    assert [len(f) for f in files(str(tmp_path / "b"))] == [12, 8]


def test_write_tasks_take_arrow_blocks_as_they_are_without_importing_ray_data():
    """The annotators' blocks are Arrow tables: a fresh write worker skips ray.data's import (~0.4 s); any
    other block type still goes through Ray Data's BlockAccessor."""
    import subprocess
    import sys

    import pandas as pd

    from raycv.annotation import write as writing

    table = pa.table({"a": [1, 2]})
    assert writing._arrow(table) is table
    assert writing._arrow(pd.DataFrame({"a": [1, 2]})).column("a").to_pylist() == [1, 2]
    code = (
        "import sys, pyarrow as pa, raycv.annotation.write as w; w._arrow(pa.table({'a': [1]})); "
        "print('ray.data' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.fixture
def tiny(tmp_path):
    """An untrained test_classifier run and 8 images to annotate with it."""
    write_flat_archive(str(tmp_path / "images"), n=8, size=32, seed=3)
    run = write_run_dir(str(tmp_path / "run"))
    return {"model": run, "input": str(tmp_path / "images"), "output": str(tmp_path / "out"), "batch_size": 4}


def _raycv_groups(timeout_s: float = 30) -> dict[str, str]:
    """Name -> state of every placement group of an annotation run, once none is still being removed."""
    from ray.util import placement_group_table

    deadline = time.time() + timeout_s
    while True:
        groups = {g["name"]: g["state"] for g in placement_group_table().values()}
        groups = {name: state for name, state in groups.items() if name.startswith("raycv-annotate-")}
        if all(state == "REMOVED" for state in groups.values()) or time.time() > deadline:
            return groups  # removal is asynchronous
        time.sleep(0.2)


def test_a_run_removes_its_placement_group_and_hands_its_actors_two_inputs_each(tiny, ray_local):
    """8 images, 2 actors: the plan's 4 blocks of 2 reach the model stage as 4 inputs (the read stage used to
    merge them into one, so one actor got the whole archive: Ray Data warned "only received 1 input(s)")."""
    from ray.util import placement_group_table
    from ray.util.state import list_actors, list_tasks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = annotation.run_annotation(AnnotateConfig(**tiny, actors=2, cpus_per_actor=0.5))
    assert summary.ok == 8 and summary.error == 0
    assert not [w for w in caught if "only received" in str(w.message)], [str(w.message) for w in caught]
    name = f"raycv-annotate-{summary.run_id}"
    assert _raycv_groups()[name] == "REMOVED"
    group = next(pg_id for pg_id, g in placement_group_table().items() if g["name"] == name)
    actors = [a.actor_id for a in list_actors(filters=[("placement_group_id", "=", group)], detail=True)]
    assert len(actors) == 2
    deadline = time.time() + 30  # the workers report task events about once a second
    while True:
        tasks = [t.name for a in actors for t in list_tasks(filters=[("actor_id", "=", a)], detail=True)]
        submits = sum(t.endswith(".submit") for t in tasks)
        if submits >= 4 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert submits == 4, tasks


def test_actors_that_cannot_fit_the_cluster_fail_fast_with_exit_2(
    tiny, tmp_path, ray_local, monkeypatch, capsys
):
    """3 actors x 1 CPU on the session's 2-CPU Ray: a config error naming the ask, the cluster and the fix;
    the group is removed, so the session's Ray gets its CPUs back."""
    monkeypatch.setattr(placement, "PLACEMENT_TIMEOUT_S", 3.0)
    before = _raycv_groups()
    cfg = write_yaml(tmp_path, "annotate.yaml", {**tiny, "actors": 3, "cpus_per_actor": 1})
    t0 = time.time()
    assert main(["annotate", cfg]) == 2
    assert time.time() - t0 < 60
    err = capsys.readouterr().err
    assert "raycv: invalid config: actors: got 3. " in err
    assert "could not place 3 model actors of {'CPU': 1.0} each (3 CPU, 0 GPU in all) within 3 s" in err
    assert "it has 2 CPU, 0 GPU in all" in err and "Lower actors or cpus_per_actor to fit" in err
    after = _raycv_groups()
    assert len(after) == len(before) + 1 and set(after.values()) == {"REMOVED"}, after
    assert not os.path.exists(tiny["output"] + "/images")
    deadline = time.time() + 30
    while ray_local.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources().get("CPU", 0) == 2


def test_actors_that_leave_no_cpu_for_reading_exit_2_at_once_and_auto_fits(tiny, tmp_path, ray_local, capsys):
    """2 actors x 1 CPU on the 2-CPU Ray would reserve every CPU and the read stage would wait forever:
    refused before anything is reserved, naming the setting, what the cluster has and what fits. The
    defaults (actors, cpus_per_actor, gpus_per_actor: auto) size the stage from the cluster and run."""
    defaults = AnnotateConfig(model="m", input="i", output="o")
    assert (defaults.actors, defaults.cpus_per_actor, defaults.gpus_per_actor) == ("auto", "auto", "auto")
    before = _raycv_groups()
    cfg = write_yaml(tmp_path, "annotate.yaml", {**tiny, "actors": 2, "cpus_per_actor": 1})
    t0 = time.time()
    assert main(["annotate", cfg]) == 2
    assert time.time() - t0 < 60
    err = capsys.readouterr().err
    assert "raycv: invalid config: actors: got 2. 2 model actors x cpus_per_actor 1 reserve 2 of the " in err
    assert "cluster's 2 CPUs and leave less than the 0.5 CPU a read task needs" in err
    assert "Set cpus_per_actor: 0.75 or actors: 1 (or add nodes)." in err
    assert _raycv_groups() == before  # no placement group was made
    assert not os.path.exists(tiny["output"] + "/images")
    # the suggested setting fits: the run goes to the end
    summary = annotation.run_annotation(AnnotateConfig(**tiny, actors=2, cpus_per_actor=0.75))
    assert summary.ok == 8 and summary.error == 0
    # and so do the defaults: one actor with the 1.5 CPUs reading does not need, on 2 torch threads
    assert main(["annotate", write_yaml(tmp_path, "auto.yaml", {**tiny, "incremental": False})]) == 0
    out = capsys.readouterr().out
    assert "[raycv] annotate: 1 model actor(s) x 1.5 CPU, 2 torch thread(s) each; 0.5 CPU for reading" in out
    assert "(auto: gpus_per_actor, actors, cpus_per_actor); cluster: 2 CPUs, 0 GPUs" in out
    progress = json.loads(open(tiny["output"] + "/_progress.json").read())  # the driver's record, final
    assert progress["state"] == "done" and progress["done"] == progress["total"] == 8
