"""A real Ray cluster of this test's own: ``ray start`` processes with token auth on and free ports.

Each node runs ``ray start --block`` in its own process group under its own short ``--temp-dir``, so the
test stops exactly its processes (never ``ray stop``, which would stop other tests' clusters too), and
never meets the session's ``ray_local`` or anything on Ray's default ports. Also: a tiny run directory
for the jobs to annotate with.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from raycv.models import create_model
from raycv.storage import Storage
from raycv.training import run_directory

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

BIN = Path(sys.executable).parent  # the venv's ray and raycv scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_ports() -> list[str]:
    # Every port a node opens that has a fixed default (the dashboard agent's 52365, metrics, ...).
    flags = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    return [f"{flag}={free_port()}" for flag in flags]


class LocalCluster:
    """A head (dashboard + Jobs API) and optional worker nodes on 127.0.0.1, token auth on."""

    def __init__(self, head_cpus: int) -> None:
        self.token = secrets.token_hex(32)
        # Short: Ray's unix sockets live under it and their paths are limited to ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rcvsub", dir="/tmp")
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "RAY_AUTH_MODE": "token",  # explicit: the default differs between ray.init and ray start
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # job entrypoints find `raycv`
        }
        try:
            self._start_head(head_cpus)
        except BaseException:
            self.stop()  # a head that failed to come up still leaves processes behind
            raise

    def _start_head(self, cpus: int) -> None:
        self._start(
            [
                "--head",
                f"--port={self.gcs.split(':')[1]}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
                f"--ray-client-server-port={free_port()}",
            ],
            cpus,
        )
        self._wait_for(lambda: len(self.alive_nodes()) == 1, "the head node")

    def _start(self, args: list[str], cpus: int) -> None:
        node_dir = tempfile.mkdtemp(prefix="n", dir=self.temp_dir)
        cmd = [
            str(BIN / "ray"),
            "start",
            *args,
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            "--object-store-memory=300000000",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={node_dir}",
            "--disable-usage-stats",
            "--block",
            *_node_ports(),
        ]
        with open(os.path.join(node_dir, "ray-start.log"), "w") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)

    def add_worker(self, cpus: int) -> None:
        """Join one more node (its own temp dir); returns when the cluster lists it alive."""
        before = len(self.alive_nodes())
        self._start([f"--address={self.gcs}"], cpus)
        self._wait_for(lambda: len(self.alive_nodes()) > before, "the worker node")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _get(self, path: str, **params: object) -> requests.Response:
        return requests.get(self.dashboard + path, headers=self.headers(), params=params, timeout=10)

    def alive_nodes(self) -> list[dict]:
        r = self._get("/api/v0/nodes", limit=100)
        if r.status_code != 200:
            return []
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def actors(self) -> list[dict]:
        """Every actor the cluster has seen (any state), from the state API, with its node id."""
        r = self._get("/api/v0/actors", limit=10_000, detail=1)
        r.raise_for_status()
        return list(r.json()["data"]["result"]["result"])

    def _wait_for(self, ready, what: str, timeout_s: float = 90) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"ray start exited while waiting for {what}: {self.logs()}")
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{what} not up after {timeout_s}s: {self.logs()}")

    def node_of_worker(self, pid: int) -> str:
        """The node (its temp dir) whose raylet started worker ``pid``: where that worker's log file lives.

        Evidence that survives the worker: the state API may forget a dead actor's node_id.
        """
        found = {
            p.parts[len(Path(self.temp_dir).parts)]
            for p in Path(self.temp_dir).glob(f"*/session_*/logs/worker-*-{pid}.out")
        }
        if len(found) != 1:
            raise LookupError(
                f"worker {pid}: log found under {sorted(found) or 'no node'} of {self.temp_dir}"
            )
        return found.pop()

    def logs(self) -> str:
        return "".join(p.read_text()[-2000:] for p in Path(self.temp_dir).glob("*/ray-start.log"))

    def stop(self) -> None:
        """Stop this cluster's processes only: its process groups, then anything left under its temp dir,
        then any descendant that outlived them (a Ray worker renames itself ``ray::<Actor>`` and may leave
        the group, so neither of the first two finds it)."""
        descendants = _descendants([proc.pid for proc in self.procs])
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for pid in _pids_mentioning(self.temp_dir):  # anything that left the groups (setsid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid, started in descendants:
            _kill_if_same(pid, started)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid`` from /proc, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])  # ppid, starttime (fields 4 and 22 of proc(5))


def _descendants(pids: list[int]) -> list[tuple[int, int]]:
    """Every process below ``pids`` now (children, recursively) as (pid, start time): the start time
    tells a later pid reuse apart, so :func:`_kill_if_same` never kills another process."""
    parents: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(entry.name))
        if stat is not None:
            parents.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found, todo = [], list(pids)
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _kill_if_same(pid: int, started: int, sig: int = signal.SIGKILL) -> None:
    stat = _stat(pid)
    if stat is not None and stat[1] == started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_tree(pid: int) -> None:
    """SIGKILL the process group of ``pid`` and every process below it, as a user's ``kill -9`` of a run and
    the local Ray it started. Each is stopped first, twice over, so that none (a raylet) starts another in
    between; the Ray workers that leave the group are found by parentage and killed too, not left as orphans."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGSTOP)
    found: dict[int, int] = {}
    for _ in range(2):
        for child, started in _descendants([pid]):
            if child not in found:
                found[child] = started
                _kill_if_same(child, started, signal.SIGSTOP)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for child, started in found.items():
        _kill_if_same(child, started)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return [p for p in pids if p != os.getpid()]


def write_run_dir(path: str) -> str:
    """A classification run directory (untrained test_classifier): what `raycv annotate` needs."""
    run_directory.save_weights(
        f"{path}/model.pt", create_model("test_classifier", num_classes=3).state_dict()
    )
    card = {
        "task": "classification",
        "arch": "test_classifier",
        "num_classes": 3,
        "class_names": ["circle", "square", "triangle"],
        "image_size": 32,
        "in_channels": 3,
    }
    STORE.write_json(f"{path}/model.json", card)
    return path
