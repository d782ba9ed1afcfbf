"""One run per output (SPEC §6): the lease on a local folder and on the S3 server, then whole `raycv annotate`
runs in subprocesses: two at once on one S3 output, and a run killed with SIGKILL then run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raycv.annotation import lease as leases
from raycv.annotation.lease import LEASE, Lease
from raycv.data.synthetic import write_flat_archive
from raycv.errors import ConfigError, LeaseLostError
from raycv.storage import Storage
from tests._ray_cluster import kill_tree, write_run_dir
from tests._util import write_yaml

STORE = Storage()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("bucket") + "/out"


def _record(output: str) -> dict:
    return json.loads(STORE.read_bytes(f"{output}/{LEASE}"))


def test_a_second_run_is_refused_naming_the_holder_until_the_first_releases(output):
    with Lease(output, STORE, run_id="run-a") as first:
        record = _record(output)
        assert (
            record["run_id"] == "run-a" and record["pid"] == os.getpid() and record["expires_after_s"] == 120
        )
        assert {"host", "started_at", "renewed_at"} <= set(record)
        with pytest.raises(ConfigError) as caught:
            Lease(output, STORE, run_id="run-b").acquire()
        message = str(caught.value)
        assert caught.value.field == "output"
        assert (
            f"run_id=run-a, host={record['host']}, pid={os.getpid()}, started {record['started_at']}"
            in message
        )
        assert "goes stale after 2 minutes and the next run takes over" in message
        first.check()  # still this run's
    assert not STORE.exists(f"{output}/{LEASE}")
    with Lease(output, STORE, run_id="run-b"):
        assert _record(output)["run_id"] == "run-b"


def test_a_stale_lease_is_taken_over_and_its_old_holder_stops_before_committing(output):
    dead = Lease(output, STORE, run_id="dead", stale_after_s=0.5)
    dead.acquire()  # never renewed: as if its process was killed
    time.sleep(0.6)
    with Lease(output, STORE, run_id="next", stale_after_s=0.5) as taker:
        assert taker.taken_over is not None and taker.taken_over["run_id"] == "dead"
        assert _record(output)["run_id"] == "next"
        with pytest.raises(LeaseLostError, match=r"lost its lease .* now belongs to run next"):
            dead.check()
        with pytest.raises(LeaseLostError):
            dead.renew()
        dead.release()  # leaves the new holder's lease alone
        assert _record(output)["run_id"] == "next"
    assert not STORE.exists(f"{output}/{LEASE}")


def test_renewal_keeps_the_lease_fresh(output):
    with Lease(output, STORE, run_id="long", stale_after_s=1.0, renew_every_s=0.2):
        first = _record(output)["renewed_at"]
        time.sleep(1.5)  # longer than the stale time: only renewals keep it fresh
        assert _record(output)["renewed_at"] > first
        with pytest.raises(ConfigError, match="Another run holds it: run_id=long"):
            Lease(output, STORE, run_id="other", stale_after_s=1.0).acquire()


def test_the_stale_time_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(leases.STALE_ENV, "3")
    lease = Lease(str(tmp_path / "out"), STORE, run_id="r")
    assert lease.stale_after_s == 3.0 and lease.renew_every_s == 0.75
    monkeypatch.setenv(leases.STALE_ENV, "soon")
    with pytest.raises(ConfigError, match="RAYCV_LEASE_STALE_S: got 'soon'"):
        Lease(str(tmp_path / "out"), STORE, run_id="r")


def test_an_output_that_cannot_be_written_is_a_config_error(tmp_path, s3_endpoint):
    with pytest.raises(ConfigError, match=r"output: got 's3://no-such-bucket-raycv/out'.*Cannot write"):
        Lease("s3://no-such-bucket-raycv/out", STORE, run_id="r").acquire()
    # a local output under a regular file: no one can create it, root included
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"Cannot write"):
        Lease(str(blocker / "out"), STORE, run_id="r").acquire()


def test_a_store_without_conditional_writes_falls_back_to_write_then_read(bucket, monkeypatch):
    """The store answers 501 to If-None-Match/If-Match: the lease still lets one run in, one at a time."""
    monkeypatch.setattr(leases, "SETTLE_S", 0.1)
    real = leases._S3Lease._call

    def no_conditions(self, method, **kwargs):
        if "IfNoneMatch" in kwargs or "IfMatch" in kwargs:
            raise leases._Unsupported
        return real(self, method, **kwargs)

    monkeypatch.setattr(leases._S3Lease, "_call", no_conditions)
    output = f"{bucket}/out"
    with Lease(output, STORE, run_id="a", stale_after_s=5, renew_every_s=0.2):
        time.sleep(0.5)
        with pytest.raises(ConfigError, match="run_id=a"):
            Lease(output, STORE, run_id="b").acquire()
    assert not STORE.exists(f"{output}/{LEASE}")


# --- whole runs, as users start them: each subprocess starts its own local Ray -----------------------------


def _annotate_cmd(cfg: str) -> list[str]:
    return [sys.executable, "-m", "raycv.cli", "annotate", cfg]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _config(tmp_path: Path, output: str, n: int, **extra: object) -> str:
    write_flat_archive(str(tmp_path / "images"), n=n, size=32, seed=3)
    run = write_run_dir(str(tmp_path / "run"))
    data = {"model": run, "input": str(tmp_path / "images"), "output": output, "batch_size": 4}
    return write_yaml(
        tmp_path, "annotate.yaml", {**data, "incremental": False, "actors": 1, "cpus_per_actor": 0.5, **extra}
    )


def _assert_each_image_once(output: str, n: int) -> None:
    fs, path = STORE.filesystem(f"{output}/images")
    uris = pq.read_table(path, filesystem=fs, columns=["image_uri"]).column("image_uri").to_pylist()
    assert len(uris) == n == len(set(uris)), (len(uris), len(set(uris)))


def test_two_runs_at_once_on_one_s3_output_one_wins_and_the_other_exits_2(tmp_path, bucket):
    output = f"{bucket}/archive"
    cfg = _config(tmp_path, output, n=8)
    procs = [
        subprocess.Popen(
            _annotate_cmd(cfg), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, err[-1500:]) for p, (_, err) in zip(procs, outs, strict=True)]
    winner = json.loads(STORE.read_bytes(f"{output}/_summary.json"))
    loser_err = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 2)
    assert f"Another run holds it: run_id={winner['run_id']}, host=" in loser_err, loser_err[-1500:]
    _assert_each_image_once(output, 8)
    assert not STORE.exists(f"{output}/{LEASE}")


def _staged(staging: Path) -> list[Path]:
    """The staged Parquet files; a run folder that its commit removes while it is listed holds none."""
    try:
        return list(staging.glob("*/*.parquet"))
    except FileNotFoundError:
        return []


def test_a_run_killed_with_sigkill_is_taken_over_and_recovered_by_the_next(tmp_path):
    output = str(tmp_path / "out")
    # 240 images in files of 4 rows: staged files appear from the first batches on, the commit comes after
    # the last one, so the poll below sees staged rows long before the run could commit them.
    cfg = _config(tmp_path, output, n=240, rows_per_file=4)
    proc = subprocess.Popen(
        _annotate_cmd(cfg),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    staging = tmp_path / "out" / "_staging"
    try:
        deadline = time.time() + 240
        # Killed once it has staged rows, and before it commits them: what it leaves must be recovered.
        while not _staged(staging) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "out" / LEASE).exists() and proc.poll() is None, (
            "the run ended before it was killed"
        )
    finally:
        kill_tree(proc.pid)  # the run and the local Ray it started
        proc.wait()
    killed = _record(output)
    assert _staged(staging) and not (tmp_path / "out" / "images").exists()
    time.sleep(1.0)
    rerun = subprocess.run(
        _annotate_cmd(cfg), env=_env(RAYCV_LEASE_STALE_S="1"), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Took over the stale lease of run {killed['run_id']}" in rerun.stderr
    _assert_each_image_once(output, 240)
    assert not list(staging.glob("*/*")) and not (tmp_path / "out" / LEASE).exists()
