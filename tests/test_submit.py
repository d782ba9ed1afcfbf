"""`raycv submit` against a real Ray head with token auth on (its own cluster, not the session's ray_local).

The job runs `raycv annotate` on that head; the cluster shares this machine, so local paths are fine.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from ray.job_submission import JobSubmissionClient

from raycv.cli import main
from raycv.config import build_config, config_to_dict, load_config
from raycv.data.synthetic import write_flat_archive
from raycv.errors import ConfigError
from raycv.submit import auth_token, dashboard_address
from tests._ray_cluster import LocalCluster, free_port, write_run_dir
from tests._util import write_yaml

N_IMAGES = 12


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(head_cpus=2)
    yield c
    c.stop()


@pytest.fixture
def token_env(cluster, monkeypatch):
    """This process holds the cluster's token the standard way (RAY_AUTH_TOKEN)."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    return cluster


@pytest.fixture(scope="module")
def annotate_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit")
    write_flat_archive(str(tmp / "images"), n=N_IMAGES, size=32, seed=1)
    cfg = {
        "model": write_run_dir(str(tmp / "run")),
        "input": str(tmp / "images"),
        "output": str(tmp / "not-this-one"),
        "batch_size": 4,
        "actors": 1,  # one model replica: the job's start-up dominates, not the 12 images
    }
    return {"tmp": tmp, "path": write_yaml(tmp, "annotate.yaml", cfg)}


def _jobs(cluster) -> list[str]:
    client = JobSubmissionClient(cluster.dashboard, headers=cluster.headers())
    return sorted(j.submission_id or "" for j in client.list_jobs())


def test_annotate_job_waits_streams_logs_and_writes_one_row_per_image(token_env, annotate_cfg, capsys):
    out = str(annotate_cfg["tmp"] / "out")
    argv = ["submit", "annotate", annotate_cfg["path"], "--address", token_env.dashboard, "--wait"]
    code = main([*argv, "--set", f"output={out}"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "raycv submit: job raycv-annotate-" in stdout and "ray job logs raycv-annotate-" in stdout
    # The job's own log, streamed: the entrypoint line and raycv annotate's summary on the cluster.
    assert f"raycv annotate: {N_IMAGES} images: {N_IMAGES} ok, 0 error" in stdout
    assert "SUCCEEDED" in stdout and token_env.token not in stdout + stderr
    rows = pq.read_table(f"{out}/images").to_pylist()  # the --set override reached the cluster
    assert len(rows) == len({r["image_uri"] for r in rows}) == N_IMAGES
    assert all(r["status"] == "ok" and r["label_name"] in {"circle", "square", "triangle"} for r in rows)


def test_requests_without_the_token_are_refused(cluster, annotate_cfg, monkeypatch, capsys, tmp_path):
    assert requests.get(f"{cluster.dashboard}/api/jobs/", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert requests.get(f"{cluster.dashboard}/api/jobs/", headers=wrong, timeout=10).status_code == 403
    before = _jobs(cluster)
    argv = ["submit", "annotate", annotate_cfg["path"], "--address", cluster.dashboard]

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token-here"))
    assert auth_token() is None and main(argv) == 1
    assert "requires a token and none was found" in capsys.readouterr().err

    (tmp_path / "token").write_text("f" * 64 + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert auth_token() == "f" * 64 and main(argv) == 1
    err = capsys.readouterr().err
    assert "refused the token" in err and "Traceback" not in err and "f" * 64 not in err
    assert _jobs(cluster) == before


def test_bad_config_or_address_exits_2_and_submits_nothing(token_env, annotate_cfg, capsys):
    before = _jobs(token_env)
    base = ["submit", "annotate", annotate_cfg["path"], "--address", token_env.dashboard]
    assert main([*base, "--set", "actors=0"]) == 2
    assert "actors: got 0" in capsys.readouterr().err
    assert main([*base, "--set", "batch=4"]) == 2
    assert "Did you mean 'batch_size'?" in capsys.readouterr().err
    assert main([*base, "--set", "model=/nonexistent/run"]) == 2  # paths are checked before submitting
    assert "model: got '/nonexistent/run'" in capsys.readouterr().err
    assert main(["submit", "annotate", annotate_cfg["path"], "--address", "127.0.0.1:8265"]) == 2
    assert "--address: got '127.0.0.1:8265'" in capsys.readouterr().err
    assert _jobs(token_env) == before


def test_failing_job_with_wait_exits_1(token_env, annotate_cfg, capsys):
    # Valid here with --no-check-paths; on the cluster `raycv annotate` finds no run directory and exits 2.
    argv = ["submit", "annotate", annotate_cfg["path"], "--address", token_env.dashboard, "--wait"]
    assert main([*argv, "--no-check-paths", "--set", "model=/nonexistent/run"]) == 1
    out, err = capsys.readouterr()
    assert "raycv: invalid config: model: got '/nonexistent/run'" in out  # the job's log, streamed
    assert "FAILED: Job entrypoint command failed with exit code 2" in err and "ray job logs" in err


def test_unreachable_address_exits_1(token_env, annotate_cfg, capsys):
    address = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", "annotate", annotate_cfg["path"], "--address", address]) == 1
    err = capsys.readouterr().err
    assert f"Cannot reach the Ray Jobs API at {address}" in err and "Traceback" not in err


@pytest.mark.parametrize("path", sorted(Path("jobs/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_config_validates_to_the_same_config(path):
    kind = "train" if path.name.startswith("train") else "annotate"
    cfg = load_config(path, kind=kind)
    assert build_config(type(cfg), config_to_dict(cfg)) == cfg


def test_token_and_address_come_from_the_standard_places(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    (tmp_path / "token").write_text("from-file\n")
    assert auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert auth_token() == "from-file"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert dashboard_address(None) == "http://head:8265" and dashboard_address("https://h:1") == "https://h:1"
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    with pytest.raises(ConfigError, match="Give the Ray dashboard's URL"):
        dashboard_address(None)
