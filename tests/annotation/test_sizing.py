"""`actors: auto`: the model stage sized from the cluster's resources (GPUs first), explicit values kept."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raycv.annotation.sizing import size_actors


@pytest.mark.parametrize(
    ("cpus", "actors", "cpus_per_actor", "threads", "read"),
    [
        (2, 1, 1.5, 2, 0.5),  # the smallest machine: one actor, every CPU that reading does not need
        (4, 1, 3.5, 4, 0.5),
        (16, 2, 7.0, 7, 2.0),  # beyond ~8 threads, more replicas
        (64, 7, 8.0, 8, 8.0),
    ],
)
def test_cpu_only_clusters_give_the_model_the_cpus_reading_does_not_need(
    cpus, actors, cpus_per_actor, threads, read
):
    s = size_actors("auto", "auto", "auto", {"CPU": cpus})
    assert (s.actors, s.cpus_per_actor, s.gpus_per_actor, s.threads, s.read_cpus) == (
        actors,
        cpus_per_actor,
        0.0,
        threads,
        read,
    )
    assert s.auto == ("gpus_per_actor", "actors", "cpus_per_actor")


def test_gpus_come_first_one_actor_per_gpu_the_cpus_to_reading():
    s = size_actors("auto", "auto", "auto", {"CPU": 8, "GPU": 1})
    assert (s.actors, s.gpus_per_actor, s.cpus_per_actor, s.read_cpus) == (1, 1.0, 1.0, 7.0)
    s = size_actors("auto", "auto", "auto", {"CPU": 32, "GPU": 4})
    assert (s.actors, s.gpus_per_actor, s.cpus_per_actor, s.read_cpus) == (4, 1.0, 1.0, 28.0)
    half = size_actors("auto", "auto", 0.5, {"CPU": 8, "GPU": 2})  # fractional GPUs: two actors per GPU
    assert (half.actors, half.gpus_per_actor) == (4, 0.5)
    cpu = size_actors("auto", "auto", 0, {"CPU": 8, "GPU": 1})  # gpus_per_actor: 0 keeps the actors on CPU
    assert (cpu.gpus_per_actor, cpu.actors, cpu.cpus_per_actor) == (0.0, 1, 7.0)


def test_explicit_values_are_kept_and_auto_fills_the_rest():
    s = size_actors(2, 1.0, 0, {"CPU": 16})
    assert (s.actors, s.cpus_per_actor, s.threads, s.auto) == (2, 1.0, 1, ())
    s = size_actors(3, "auto", "auto", {"CPU": 16})
    assert (s.actors, s.cpus_per_actor, s.threads) == (3, 4.5, 5) and s.auto == (
        "gpus_per_actor",
        "cpus_per_actor",
    )
    s = size_actors("auto", 2, "auto", {"CPU": 16})
    assert (s.actors, s.cpus_per_actor) == (7, 2.0)


def test_gpu_layout_through_rays_declared_resources(tmp_path):
    """A local Ray that declares 8 CPUs and 1 GPU (no GPU needed to declare one): one GPU actor, one CPU
    to feed it, seven to reading and decoding. In a subprocess: the session's Ray is the 2-CPU one."""
    code = (
        "import json, ray\n"
        "from raycv.annotation.pipeline import _sized\n"
        "from raycv.config import AnnotateConfig\n"
        "ray.init(num_cpus=8, num_gpus=1, include_dashboard=False)\n"
        "s = _sized(AnnotateConfig(model='m', input='i', output='o'))\n"
        "print(json.dumps([s.actors, s.gpus_per_actor, s.cpus_per_actor, s.threads, s.read_cpus]))\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert (
        "[raycv] annotate: 1 model actor(s) x 1 CPU + 1 GPU, 1 torch thread(s) each; 7 CPU for reading"
        in lines[0]
    )
    assert json.loads(lines[-1]) == [1, 1.0, 1.0, 1, 7.0]
