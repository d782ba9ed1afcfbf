"""The `raycv` entry point as users run it (subprocesses of the installed console script)."""

import os
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq


def _raycv() -> list[str]:
    exe = shutil.which("raycv", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "raycv.cli"]


def test_models_lists_the_registry_by_task():
    out = subprocess.run(
        [*_raycv(), "models", "--task", "classification", "resnet*"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    names = [line.split()[0] for line in out.splitlines()[1:] if line.strip() and not line.endswith("models")]
    assert "resnet18" in names and "resnet50" in names and all(n.startswith("resnet") for n in names)
    bad = subprocess.run([*_raycv(), "models", "--task", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--task: got 'nope'" in bad.stderr


def test_usage_errors_exit_2():
    proc = subprocess.run([*_raycv(), "train"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "CONFIG.yaml" in proc.stderr
    missing = subprocess.run(
        [*_raycv(), "annotate", "/nonexistent.yaml"], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "Pass the path of an existing YAML config file" in missing.stderr


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [*_raycv(), "demo", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "=== raycv demo ===" in out
    # each worker line once in what the user sees (Ray Train's print patch also wrote it to stderr)
    epochs = re.findall(r"\[raycv\] epoch (\d+)/8 ", proc.stdout + proc.stderr)
    assert epochs == [str(e) for e in range(1, 9)], epochs
    for name in ["truncated.jpg", "empty.png", "text.png", "bomb.png"]:
        assert f"error row: {name}" in out
    # the reason, not only the type: e.g. "... stage=decode  DecodeError: the file is empty (0 bytes)"
    assert re.search(r"error row: empty\.png +stage=decode +DecodeError: .*empty", out), out
    assert re.search(r"error row: bomb\.png +stage=decode +DecodeError: .*pixels", out), out
    table = pq.read_table(str(tmp_path / "annotations" / "shapes" / "images"))
    assert table.num_rows == 73 and len(set(table.column("image_uri").to_pylist())) == 73
    assert (tmp_path / "runs" / "shapes" / "model.pt").exists()
    # a quiet console: at most 40 lines, none of Ray's own (worker logs, Ray Data/Train messages, core-worker
    # lines), no stack trace; Ray's output is in the logs the run saved
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) <= 40, "\n".join(console)
    internals = (
        "core_worker",
        "Reporting training result",
        "Checkpoint successfully",
        "(RayTrainWorker",
        "(MapWorker",
        "streaming_executor",
        "logging_progress",
        "Traceback",
        "system state",
        "\tINFO ",
        "\tWARNING ",
    )
    assert not [line for line in console if any(p in line for p in internals)], "\n".join(console)
    logs = list((tmp_path / "annotations" / "shapes" / "_logs").iterdir())
    assert len(logs) == 1 and logs[0].stat().st_size > 0
    assert list((tmp_path / "runs" / "shapes" / "logs").iterdir())


def test_a_one_class_dataset_given_by_a_relative_path_exits_2(tmp_path):
    """`data.train: ds` (relative, run from the folder holding it) with only ds/cat: refused before anything
    starts, naming the class found and the fix (a relative root used to give one class called 'mp')."""
    from raycv.data.synthetic import write_flat_archive

    write_flat_archive(str(tmp_path / "ds" / "cat"), n=3, size=16, seed=0)
    cfg = {"model": {"arch": "test_classifier"}, "data": {"train": "ds"}, "output": {"dir": "run"}}
    (tmp_path / "train.yaml").write_text(str(cfg).replace("'", '"'))  # JSON is YAML
    proc = subprocess.run(
        [*_raycv(), "train", "train.yaml"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "raycv: invalid dataset: Found 1 class folder 'cat' under " + str(tmp_path / "ds") in proc.stderr
    assert "at least two classes" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
