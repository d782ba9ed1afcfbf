"""Smoke tests of the benchmark scripts in jobs/bench/: each runs end to end on tiny inputs and writes its
JSON with the expected keys and positive figures. No timing is asserted (a shared 2-core machine).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

from raycv.storage import Storage

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

TINY = ["--n", "12", "--src-size", "32", "--image-size", "32", "--arch", "test_classifier"]
TINY += ["--batch-size", "4", "--format", "png"]


def _script(name: str):
    """The benchmark module ``jobs.bench.NAME`` (the tests run from the repository root, as the scripts do)."""
    return importlib.import_module(f"jobs.bench.{name}")


def _read(path: Path, benchmark: str) -> dict:
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == benchmark and doc["target"]
    machine = doc["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["ray"] and machine["date"]
    assert "gpu" in machine and machine["command"]
    return doc["results"]


def _positive(results: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(results[key], int | float) and results[key] > 0, (key, results[key])


def test_annotate_efficiency(ray_local, tmp_path):
    out = tmp_path / "eff.json"
    argv = [*TINY, "--decode", "actor", "--json", str(out)]  # no --actors/--cpus-per-actor: auto
    _script("annotate_efficiency").main(argv)
    r = _read(out, "annotate_efficiency")
    assert r["images"] == r["ok"] == 12 and r["decode"] == "actor"
    _positive(r, "bare_model_images_per_s", "pipeline_images_per_s", "efficiency", "pipeline_first_rows_s")
    # at defaults on the 2-CPU test Ray: one actor on 1.5 CPUs with 2 torch threads, and the bare model is
    # given all the cores (1 process x 2 threads)
    assert r["torch_threads_per_actor"] == 2 and r["precision"] == "fp32" and r["compile"] is False
    assert (r["bare_model_processes"], r["bare_model_threads"]) == (1, 2)
    assert r["layout"].startswith("1 actor(s) x 1.5 CPU, 2 thread(s) each (auto: actors, cpus_per_actor)")
    # the bare model ran at the niceness of Ray's workers (Ray starts them 15 above the raylet)
    assert r["ray_worker_niceness"] > r["driver_niceness"]
    assert r["bare_model_niceness"] == r["ray_worker_niceness"]


def test_naive_baseline(ray_local, tmp_path):
    out = tmp_path / "naive.json"
    argv = [*TINY, "--actors", "1", "--cpus-per-actor", "0.5", "--threads", "1", "--json", str(out)]
    argv += ["--workdir", str(tmp_path / "w")]
    _script("naive_baseline").main([*argv, "--naive-like-raycv"])
    r = _read(out, "naive_baseline")
    assert r["images"] == r["ok"] == 12 and r["naive_torch_threads"] == 1
    assert r["naive_like_raycv"] is True and r["pipeline_channels_last"] is True
    assert r["layout"] == "pipeline: 1 actor(s) x 0.5 CPU, 1 thread(s) each; naive: 1 process x 1 threads"
    assert r["naive_niceness"] == r["ray_worker_niceness"] > r["driver_niceness"]
    _positive(r, "naive_images_per_s", "pipeline_images_per_s", "speedup")
    # end to end counts the naive script's imports and model load; its steady rate starts at the first batch
    assert r["naive_steady_images_per_s"] > r["naive_images_per_s"]
    import pyarrow.parquet as pq

    naive = pq.read_table(tmp_path / "w" / "naive.parquet")  # the naive script's output
    assert naive.num_rows == 12 and set(naive.column("width").to_pylist()) == {32}


def test_memory(ray_local, tmp_path):
    out = tmp_path / "mem.json"
    argv = [
        "--sizes",
        "8",
        "16",
        "--actors",
        "1",
        "--batch-size",
        "4",
        "--interval",
        "0.05",
        "--json",
        str(out),
    ]
    _script("memory").main(argv)
    r = _read(out, "memory")
    assert [run["images"] for run in r["runs"]] == [8, 16] and [run["ok"] for run in r["runs"]] == [8, 16]
    for run in r["runs"]:
        _positive(run, "samples", "peak_driver_mib", "peak_worker_max_mib", "peak_workers_sum_mib")
    _positive(r, "driver_growth", "workers_sum_growth")
    assert isinstance(r["flat"], bool)


@pytest.mark.slow
def test_train_throughput(ray_local, tmp_path):
    out = tmp_path / "train.json"
    argv = [*TINY[:-2], "--n", "18", "--epochs", "2", "--workers", "2", "--cpus-per-worker", "0.5"]
    _script("train_throughput").main(
        [*argv, "--val-fraction", "0.2", "--grad-accum-steps", "2", "--json", str(out)]
    )
    r = _read(out, "train_throughput")
    assert r["epochs"] == 2 and len(r["ray_epoch_s"]) == len(r["plain_epoch_s"]) == 2
    assert r["grad_accum_steps"] == 2
    _positive(r, "train_images", "ray_images_per_s", "plain_images_per_s", "per_worker_core_ratio")
    _positive(r, "per_worker_ratio_side_by_side", "per_cpu_second_ratio", "ray_cpu_share", "plain_cpu_share")
    assert r["plain_niceness"] == r["ray_worker_niceness"] > r["driver_niceness"]
    assert len(r["side_by_side_epoch_s"]) == 2 and len(r["ray_epoch_cpu_s_rank0"]) == 2
    # the plain loop on all the ranks' cores: 2 x 0.5 CPU -> 1 thread
    assert r["plain_all_cores_threads"] == 1 and len(r["plain_all_cores_epoch_s"]) == 2
    _positive(r, "plain_all_cores_images_per_s", "per_core_ratio_same_cores")


@pytest.fixture
def registry_restored(monkeypatch):
    """The benchmark model registers itself in the process: keep it out of the other tests' registry."""
    from raycv.models import registry

    registry.list_models()  # the models registered on first use are registered now, outside the copies
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BY_TASK", {t: set(names) for t, names in registry._BY_TASK.items()})


def test_fixed_cost_model_sleeps_per_image(tmp_path, registry_restored):
    import time

    import torch

    common = _script("_common")
    common.register_bench_models()
    common.register_bench_models()  # idempotent: Ray calls it in every worker process
    common.make_run(
        str(tmp_path), arch=common.FIXED_COST_ARCH, image_size=8, options={"seconds_per_image": 0.02}
    )
    from raycv.models import saved

    run = saved.load_run(str(tmp_path), STORE)
    t0 = time.perf_counter()
    logits = run.model(torch.zeros(5, 3, 8, 8))
    assert time.perf_counter() - t0 >= 0.1 and logits.shape == (5, 3)


def test_scaling_starts_and_stops_only_its_own_node(tmp_path):
    """The piece of scaling.py that touches the machine: a `ray start` head in its own temp dir, stopped
    by the ids of exactly the processes that name that dir (the full two-node run takes minutes)."""
    import psutil

    scaling = _script("scaling")
    cluster = scaling.LocalCluster(cpus_per_node=1)
    others = {p.pid for p in psutil.process_iter() if p.pid not in cluster.pids()}
    try:
        cluster.add_node()
        ours = cluster.pids()
        assert ours and not set(ours) & others
    finally:
        cluster.stop()
    assert not cluster.pids() and not os.path.exists(cluster.temp_dir)


def test_onnx_vs_torch(tmp_path):
    out = tmp_path / "onnx.json"
    argv = ["--model", "test_classifier", "--size", "32", "--images", "10", "--batch-size", "4"]
    _script("onnx_vs_torch").main([*argv, "--threads", "1", "--warmup", "1", "--no-cuda", "--json", str(out)])
    r = _read(out, "onnx_vs_torch")
    assert r["arch"] == "test_classifier" and r["image_size"] == 32 and r["images"] == 10
    assert r["threads"] == 1 and r["rounds"] == 2 and r["onnxruntime"]
    cpu = {"torch_eager", "torch_channels_last", "onnxruntime_cpu"}
    assert set(r["backends"]) == cpu and "onnxruntime_cuda" in r["skipped"]
    for name, row in r["backends"].items():
        assert row["device"] == "cpu" and len(row["images_per_s_rounds"]) == 2
        _positive(row, "images_per_s", "ratio_vs_torch_eager", "ratio_vs_torch_channels_last")
        # the same logits from every backend, ONNX Runtime included (10 images, last batch of 2: dynamic batch)
        assert row["max_abs_diff_vs_torch_eager"] < 1e-4, (name, row["max_abs_diff_vs_torch_eager"])
    assert r["backends"]["torch_eager"]["ratio_vs_torch_eager"] == 1.0
    assert r["cpu_outputs_agree"] is True and r["max_abs_diff_cpu"] < 1e-4
    _positive(r, "onnx_export_s", "onnx_file_mib")


def test_gpu_dry_run_on_cpu_without_ray(tmp_path):
    """jobs/bench/gpu.py's logic on the CPU (--device cpu --tiny), in a fresh process where Ray, pydantic and
    moto cannot be imported, as on the GPU machine's image, which has none of them; with a GPU test log
    merged as gpu.sh does."""
    import subprocess
    import sys

    blocked = tmp_path / "blocked"
    for name in ("ray", "pydantic", "moto"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('no {name} on the GPU image')"
        )
    log = tmp_path / "gpu_tests.log"
    log.write_text("s.\n=== 1 passed, 1 skipped, 2 deselected in 31.20s ===\n")
    out = tmp_path / "gpu.json"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(root)])}
    argv = ["--device", "cpu", "--tiny", "--out", str(out), "--tests-log", str(log), "--tests-rc", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "jobs.bench.gpu", *argv], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "gpu" and doc["target"] and doc["wall_s"] > 0 and doc["skipped"] == []
    machine = doc["machine"]
    assert machine["device"].startswith("cpu") and machine["gpu"] is None
    assert machine["torch"] and machine["torchvision"] and machine["date"]

    rows = {(r["model"], r["precision"], r["channels_last"]): r for r in doc["models"]}
    models = ["test_classifier", "test_segmenter", "test_instance_segmenter", "test_detector"]
    variants = [("fp32", False), ("fp32", True), ("bf16", True)]
    assert set(rows) == {(m, *v) for m in models for v in variants}
    for row in rows.values():
        assert row["task"] and row["batch"] == 2 and row["image_size"] == 32 and row["iters"] >= 1
        _positive(row, "img_s", "ratio_vs_fp32")
    for m in models:
        assert rows[(m, "fp32", False)]["ratio_vs_fp32"] == 1.0
    # R-CNNs autocast their backbone only, as raycv's detector actor does; the others the whole forward
    scopes = {m: rows[(m, "bf16", True)]["autocast_scope"] for m in models}
    assert scopes == {
        "test_classifier": "whole",
        "test_segmenter": "whole",
        "test_instance_segmenter": "backbone",
        "test_detector": "backbone",
    }

    decode = {r["decoder"]: r for r in doc["decode"]}
    assert list(decode) == ["cpu_raycv", "cpu_raycv_threads", "nvjpeg"]
    for name in ("cpu_raycv", "cpu_raycv_threads"):
        assert decode[name]["images"] == 8 and decode[name]["out_size"] == 32
        _positive(decode[name], "img_s", "ratio_vs_cpu")
    nvjpeg = decode["nvjpeg"]
    assert nvjpeg["img_s"] is None and "CUDA" in nvjpeg["skipped"] and nvjpeg["ratio_vs_cpu"] is None

    tests = doc["gpu_tests"]
    assert tests["ran"] is True and tests["exit_code"] == 0
    assert tests["summary"] == "1 passed, 1 skipped, 2 deselected in 31.20s"
