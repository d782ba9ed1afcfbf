"""Medical archives and max_error_fraction through `raycv annotate` (S3 server, local Ray, the CLI).

pydicom's and nibabel's bundled files (nothing downloaded): a multi-frame DICOM gives one row per frame, a
NIfTI volume one per slice, as ``<uri>#frame=<k>``; bad files become error rows; re-runs never duplicate.
"""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file

from raycv.cli import main
from raycv.data.synthetic import write_flat_archive
from raycv.storage import Storage
from tests._ray_cluster import write_run_dir
from tests._util import create_bucket, write_yaml

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

DICOM = {  # name in the archive -> (pydicom's bundled file, rows expected)
    "ct/rtdose.dcm": ("rtdose.dcm", 15),  # multi-frame dose grid
    "ct/rle_2frame.dcm": ("SC_rgb_rle_2frame.dcm", 2),  # RLE-compressed colour, 2 frames
    "ct/ct_small.dcm": ("CT_small.dcm", 1),
    "mr/mr_small.dcm": ("MR_small.dcm", 1),
}
NIFTI = {"mr/anatomical.nii": ("anatomical.nii", 25), "mr/standard.nii.gz": ("standard.nii.gz", 7)}
BAD = {
    "bad/lossy.dcm": ("JPEG-lossy.dcm", "JPEG Extended"),  # 12-bit JPEG: no decoder installed reads it
    "bad/truncated.dcm": ("MR_truncated.dcm", "less than expected"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local, s3_endpoint):
    """An untrained test_classifier run directory on S3: these tests are about rows, not accuracy, and
    `raycv train` on S3 is covered by test_end_to_end (a Ray Train start-up less here)."""
    create_bucket("med")
    return {"run": write_run_dir("s3://med/runs/tiny"), "tmp": tmp_path_factory.mktemp("med")}


def _put(name: str, path: str, archive: str = "s3://med/archive") -> str:
    with open(path, "rb") as f:
        STORE.write_bytes(f"{archive}/{name}", f.read())
    return f"{archive}/{name}"


def _annotate(run: dict, inp: str, out: str, **extra) -> int:
    cfg = write_yaml(
        run["tmp"],
        "annotate.yaml",
        {"model": run["run"], "input": inp, "output": out, "batch_size": 8, "actors": 1, **extra},
    )
    return main(["annotate", cfg])


def _rows(out: str) -> list[dict]:
    fs, path = STORE.pyarrow_filesystem(out)
    return pq.read_table(f"{path}/images", filesystem=fs).to_pylist()


def _summary(out: str) -> dict:
    return json.loads(STORE.read_bytes(f"{out}/_summary.json"))


def test_frames_and_slices_become_rows_and_reruns_add_nothing(run):
    expected = {}
    for name, (bundled, frames) in DICOM.items():
        expected[_put(name, str(get_testdata_file(bundled, download=False)))] = frames
    for name, (bundled, frames) in NIFTI.items():
        expected[_put(name, os.path.join(NIBABEL_DATA, bundled))] = frames
    for name, (bundled, _) in BAD.items():
        expected[_put(name, str(get_testdata_file(bundled, download=False)))] = 1
    STORE.write_bytes("s3://med/archive/bad/corrupt.dcm", b"not a dicom file at all" * 40)
    expected["s3://med/archive/bad/corrupt.dcm"] = 1
    out = "s3://med/out/a"
    assert _annotate(run, "s3://med/archive/", out) == 0
    rows = _rows(out)
    uris = [r["image_uri"] for r in rows]
    assert len(uris) == len(set(uris)) == sum(expected.values())
    for src, frames in expected.items():
        mine = sorted((r for r in rows if r["image_uri"].split("#")[0] == src), key=lambda r: r["frame"] or 0)
        assert len(mine) == frames, src
        if frames == 1:
            assert mine[0]["frame"] is None and mine[0]["frame_count"] is None and mine[0]["image_uri"] == src
        else:
            assert [r["frame"] for r in mine] == list(range(frames))
            assert [r["image_uri"] for r in mine] == [f"{src}#frame={k}" for k in range(frames)]
            assert {r["frame_count"] for r in mine} == {frames} and {r["status"] for r in mine} == {"ok"}
    by_uri = {r["image_uri"]: r for r in rows}
    assert by_uri["s3://med/archive/ct/rtdose.dcm#frame=0"]["width"] == 10
    assert by_uri["s3://med/archive/ct/rtdose.dcm#frame=0"]["label_name"] in {"circle", "square", "triangle"}
    assert (by_uri["s3://med/archive/mr/anatomical.nii#frame=0"]["width"],) == (33,)
    for name, (_, words) in {**BAD, "bad/corrupt.dcm": ("", "not a DICOM file")}.items():
        r = by_uri[f"s3://med/archive/{name}"]
        assert (r["status"], r["error_stage"], r["error_type"]) == ("error", "decode", "DecodeError"), r
        assert words in r["error_message"] and name in r["error_message"]
    first = _summary(out)
    n_ok = sum(r["status"] == "ok" for r in rows)
    assert (first["total"], first["ok"], first["error"], first["files"]) == (
        len(rows),
        n_ok,
        3,
        len(expected),
    )

    # Re-run: unchanged files (all their frames) are skipped, the 3 error files are retried; nothing doubles.
    assert _annotate(run, "s3://med/archive/", out) == 0
    again = _rows(out)
    assert sorted(r["image_uri"] for r in again) == sorted(uris)
    assert (_summary(out)["skipped"], _summary(out)["error"], _summary(out)["ok"]) == (n_ok, 3, 0)
    assert {r["run_id"] for r in again if r["status"] == "ok"} == {first["run_id"]}

    # A multi-frame file that changes (15 frames -> 2) replaces all of its old rows.
    _put("ct/rtdose.dcm", str(get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)))
    assert _annotate(run, "s3://med/archive/", out) == 0
    changed = _rows(out)
    dose = sorted(r["image_uri"] for r in changed if r["image_uri"].startswith("s3://med/archive/ct/rtdose"))
    assert dose == [f"s3://med/archive/ct/rtdose.dcm#frame={k}" for k in range(2)]
    assert len(changed) == len(rows) - 13 and len({r["image_uri"] for r in changed}) == len(changed)


def test_max_error_fraction_stops_commits_and_resumes(run, capsys):
    archive = "s3://med/mostly_bad"
    write_flat_archive(archive, n=6, size=32, seed=1)
    for i in range(60):
        STORE.write_bytes(f"{archive}/broken/{i:03d}.dcm", b"corrupt" * 50)
    out = "s3://med/out/errors"
    assert _annotate(run, archive, out, max_error_fraction=0.5, batch_size=4) == 1
    err = capsys.readouterr().err
    assert "TooManyErrorsError" in err and "> max_error_fraction 0.5" in err and "%" in err, err
    assert "broken/" in err and "decode DecodeError" in err and "re-run" in err
    rows = _rows(out)
    summary = _summary(out)
    print("SUMMARY", summary)
    assert len(rows) == summary["ok"] + summary["error"] >= 32
    assert len({r["image_uri"] for r in rows}) == len(rows)
    assert all(
        r["error_stage"] and r["error_type"] and r["error_message"] for r in rows if r["status"] == "error"
    )
    # The same limit stops the re-run too (the broken files are retried); nothing is ever doubled.
    assert _annotate(run, archive, out, max_error_fraction=0.5) == 1
    assert len({r["image_uri"] for r in _rows(out)}) == len(_rows(out))
    # Without a limit the run finishes: every file once.
    assert _annotate(run, archive, out) == 0
    final = _rows(out)
    assert len(final) == len({r["image_uri"] for r in final}) == 66
    assert sum(r["status"] == "error" for r in final) == 60
