"""Exactly once under failure (SPEC §6): a SIGKILLed `raycv annotate`, a killed model actor, and no credential
in anything a run leaves behind. Real processes are killed; the outputs are read back with pyarrow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raycv import storage
from raycv.cli import main
from raycv.data.images import encode_png
from raycv.models import create_model, saved
from raycv.outputs import schema as outputs
from raycv.storage import Storage
from raycv.training import run_directory
from tests._util import write_yaml

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

N_IMAGES = 240


def _make_run(run_dir: str, arch: str = "resnet18", size: int = 64) -> None:
    """A raycv run of an untrained (random-weight) model: these tests are about rows, not accuracy."""
    torch_model = create_model(arch, num_classes=3)
    run_directory.save_weights(storage.join(run_dir, saved.WEIGHTS), torch_model.state_dict())
    card = {
        "task": "classification",
        "arch": arch,
        "num_classes": 3,
        "class_names": ["circle", "square", "triangle"],
        "image_size": size,
        "in_channels": 3,
    }
    STORE.write_json(storage.join(run_dir, saved.MODEL_CARD), card)


def _write_archive(root: str, n: int, size: int = 96) -> list[str]:
    rng = np.random.default_rng(0)
    uris = []
    for i in range(n):
        uri = storage.join(root, f"{i // 100:02d}", f"img{i:05d}.png")
        STORE.write_bytes(uri, encode_png(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)))
        uris.append(uri)
    return uris


def _rows(out: str) -> list[dict]:
    fs, path = STORE.pyarrow_filesystem(out)
    if fs.get_file_info(f"{path}/images").type.name != "Directory":
        return []
    return pq.read_table(f"{path}/images", filesystem=fs).to_pylist()


def _staged_files(out: str) -> list[str]:
    staging = Path(out) / outputs.STAGING_DIR
    return [str(p) for p in staging.rglob("*.parquet")] if staging.exists() else []


def _assert_exactly_once(out: str, uris: list[str]) -> list[dict]:
    rows = _rows(out)
    got = [r["image_uri"] for r in rows]
    assert len(got) == len(set(got)), "duplicated rows"
    assert set(got) == set(uris), f"lost {len(set(uris) - set(got))} images"
    assert all(r["status"] == "ok" for r in rows)
    return rows


@pytest.fixture
def archive(tmp_path, ray_local):
    run = str(tmp_path / "run")
    _make_run(run)
    uris = _write_archive(str(tmp_path / "archive"), N_IMAGES)
    cfg = {
        "model": run,
        "input": str(tmp_path / "archive"),
        "output": str(tmp_path / "out"),
        "batch_size": 8,
        "actors": 1,
        "cpus_per_actor": 1,
        "rows_per_file": 16,  # files staged while the run goes (the default 8192 would be one at the end)
    }
    return {"run": run, "uris": uris, "cfg": cfg, "out": str(tmp_path / "out"), "tmp": tmp_path}


def test_a_sigkilled_annotate_process_loses_and_duplicates_nothing_on_rerun(archive, monkeypatch):
    import ray

    cfg = write_yaml(archive["tmp"], "annotate.yaml", archive["cfg"])
    raycv = Path(sys.executable).with_name("raycv")
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [str(raycv), "annotate", cfg, "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not _staged_files(archive["out"]) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before any rows were staged: nothing to interrupt"
    staged = _staged_files(archive["out"])
    assert staged, "no rows were written within 120 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The killed run's rows are staged, never visible: readers see no row of an unfinished write.
    assert _rows(archive["out"]) == []

    # The killed run still holds the output's lease: a re-run within its stale time exits 2 naming it; once
    # stale (2 minutes; 1 s here), the next run takes it over and recovers.
    assert main(["annotate", cfg]) == 2
    monkeypatch.setenv("RAYCV_LEASE_STALE_S", "1")
    time.sleep(1.5)
    assert main(["annotate", cfg]) == 0
    rows = _assert_exactly_once(archive["out"], archive["uris"])
    assert len({r["run_id"] for r in rows}) == 1
    assert not _staged_files(archive["out"])  # the abandoned staging area is gone
    # and a third run finds everything current: nothing re-done, nothing added
    assert main(["annotate", cfg]) == 0
    assert len(_rows(archive["out"])) == N_IMAGES
    summary = json.loads(STORE.read_bytes(storage.join(archive["out"], outputs.SUMMARY)))
    assert summary["skipped"] == N_IMAGES and summary["total"] == N_IMAGES


def test_a_killed_model_actor_is_replaced_and_the_run_completes(archive):
    import ray
    from ray.util.state import list_actors

    from raycv.annotation.pipeline import run_annotation
    from raycv.config import AnnotateConfig

    address = ray.get_runtime_context().gcs_address  # explicit: other Ray instances may run on this machine
    cfg = AnnotateConfig(**archive["cfg"])
    result: dict = {}

    def annotate() -> None:
        try:
            result["summary"] = run_annotation(cfg)
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=annotate)
    thread.start()
    victim = None
    deadline = time.time() + 120
    while victim is None and thread.is_alive() and time.time() < deadline:
        if _staged_files(archive["out"]):  # the actor has done work and has more to do
            alive = list_actors(
                address=address, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False
            )
            models = [a for a in alive if "Classifier" in (a.class_name or "") and a.pid]
            victim = models[0] if models else None
        time.sleep(0.05)
    assert victim is not None, "no model actor to kill while the run was going"
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert result["summary"].ok == N_IMAGES and result["summary"].error == 0
    _assert_exactly_once(archive["out"], archive["uris"])
    restarted = list_actors(
        address=address, filters=[("class_name", "=", victim.class_name)], raise_on_missing_output=False
    )
    assert len(restarted) >= 2 or any(a.state == "DEAD" for a in restarted)


def test_no_credential_appears_in_outputs_logs_or_summary(tmp_path, bucket, ray_local, capfd):
    """The S3 key pair reaches the workers through the environment and must never be written anywhere."""
    import ray

    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    run = f"{bucket}/run"
    _make_run(run, arch="test_classifier", size=32)
    uris = _write_archive(f"{bucket}/archive", 12, size=40)
    STORE.write_bytes(f"{bucket}/archive/broken.png", b"\x89PNG not really")
    cfg = write_yaml(
        tmp_path,
        "annotate.yaml",
        {
            "model": run,
            "input": f"{bucket}/archive/",
            "output": f"{bucket}/out",
            "actors": 1,
            "batch_size": 4,
        },
    )
    assert main(["annotate", cfg]) == 0
    rows = _rows(f"{bucket}/out")
    assert len(rows) == len(uris) + 1 and sum(r["status"] == "error" for r in rows) == 1

    corpus: dict[str, bytes] = {}
    fs, root = STORE.filesystem(f"{bucket}/")
    for key in fs.find(root):  # every object in the bucket: outputs, _summary.json, journal, model card
        corpus[f"s3://{key}"] = fs.cat_file(key)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file():
            corpus[str(path)] = path.read_bytes()
    captured = capfd.readouterr()
    corpus["stdout"], corpus["stderr"] = captured.out.encode(), captured.err.encode()
    run_id = rows[0]["run_id"].encode()
    # The search is real: the run's id is found in what it wrote, in the summary and in the console.
    assert any(run_id in data for uri, data in corpus.items() if uri.endswith(outputs.SUMMARY))
    assert any(b"broken.png" in data for uri, data in corpus.items() if "/out/images/" in uri)
    assert len([u for u in corpus if u.startswith(str(logs))]) > 5
    leaks = [uri for uri, data in corpus.items() if secret.encode() in data or key_id.encode() in data]
    assert leaks == []
