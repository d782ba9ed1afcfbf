"""How far a running job is: the driver keeps a small record current (``OUTPUT/_progress.json`` for
``raycv annotate``, ``RUN_DIR/progress.json`` for ``raycv train``) and ``raycv status URI`` prints it.

The record: ``state`` (running, done, failed), ``done``/``total`` (images; epochs for training), ``img_s``,
``errors``, ``epoch``, ``eta_s``, ``updated_at`` (UTC ISO), ``host``, ``pid``. A background thread rewrites
it every :data:`PERIOD_S` seconds while the job runs, so a record of a "running" job not updated for
:data:`STALE_AFTER_S` seconds means its writer is gone (killed, or its machine lost).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from raycv import storage
from raycv.storage import Storage

PERIOD_S = 5.0
STALE_AFTER_S = 60.0
OUTPUT_RECORD = "_progress.json"  # in an annotation output
RUN_RECORD = "progress.json"  # in a training run directory


class ProgressWriter:
    """Keeps ``uri`` current while a job runs: ``fields()`` gives the latest numbers each period.

    Use as a context manager; leaving it writes the final state (done, or failed on an exception).
    Writing is best effort: a failed write is retried at the next period, never fails the job.
    """

    def __init__(
        self,
        uri: str,
        store: Storage,
        fields: Callable[[], dict[str, Any]],
        period_s: float = PERIOD_S,
        echo: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.uri, self.store, self.fields, self.period_s = uri, store, fields, period_s
        self.echo = echo  # called with each record written while running (a console progress line)
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raycv-progress", daemon=True)

    def __enter__(self) -> ProgressWriter:
        self.write("running")
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.period_s + 1)
        self.write("failed" if exc_type else "done")

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.write("running")

    def write(self, state: str) -> None:
        try:
            record = {"state": state, **self.fields()}
        except Exception:  # the job's own numbers are not ready yet
            record = {"state": state}
        record.update(
            started_at=_iso(self.started),
            updated_at=_iso(time.time()),
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        with contextlib.suppress(Exception):  # best effort: the next period writes again
            self.store.write_json(self.uri, record)
        if self.echo is not None and state == "running":
            with contextlib.suppress(Exception):
                self.echo(record)


def rate_and_eta(done: int, total: int | None, started: float) -> dict[str, Any]:
    """``img_s`` (per unit of ``done``) since ``started`` and the ``eta_s`` of the rest at that rate."""
    elapsed = max(time.time() - started, 1e-9)
    rate = done / elapsed
    eta = (total - done) / rate if total is not None and rate > 0 and total >= done else None
    return {"img_s": round(rate, 3), "eta_s": round(eta, 1) if eta is not None else None}


def find_record(uri: str, store: Storage) -> str:
    """The progress record of an output or a run directory.

    Raises:
        FileNotFoundError: neither record exists there.
    """
    for name in (OUTPUT_RECORD, RUN_RECORD):
        candidate = storage.join(uri, name)
        if store.exists(candidate):
            return candidate
    raise FileNotFoundError(uri)


def read_progress(uri: str, store: Storage, now: float | None = None) -> dict[str, Any]:
    """The record at ``uri`` (an output or run directory), with ``stale``: a running job whose writer
    stopped updating it."""
    record: dict[str, Any] = json.loads(store.read_bytes(find_record(uri, store)))
    age = (now or time.time()) - dt.datetime.fromisoformat(record["updated_at"]).timestamp()
    record["age_s"] = round(age, 1)
    record["stale"] = record.get("state") == "running" and age > STALE_AFTER_S
    return record


def progress_line(record: dict[str, Any]) -> str:
    """One line: ``running  120/1000 images  35.2 img/s  2 errors  ETA 25 s`` (+ ``epoch 3/10`` for training)."""
    state = "stale (its writer stopped updating it)" if record.get("stale") else record.get("state", "?")
    parts = [str(state)]
    if record.get("epoch") is not None:
        parts.append(f"epoch {record['epoch']}/{record.get('epochs', '?')}")
    if record.get("done") is not None:
        total = record.get("total")
        parts.append(f"{record['done']}/{total if total is not None else '?'} {record.get('unit', 'images')}")
    if record.get("img_s") is not None:
        parts.append(f"{record['img_s']:.1f} img/s")
    if record.get("errors") is not None:
        parts.append(f"{record['errors']} errors")
    if record.get("eta_s") is not None and record.get("state") == "running":
        parts.append(f"ETA {record['eta_s']:.0f} s")
    parts.append(f"updated {record.get('age_s', 0):.0f} s ago on {record.get('host', '?')}")
    return "  ".join(parts)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def print_status(uri: str, store: Storage) -> None:
    """``raycv status``: the record's line.

    Raises:
        ConfigError: no job has written its progress at ``uri``.
    """
    from raycv.errors import ConfigError

    try:
        record = read_progress(uri, store)
    except FileNotFoundError:
        raise ConfigError(
            "OUTPUT|RUN_DIR",
            uri,
            "No job has written its progress there: give an annotation output or a run directory.",
        ) from None
    print(progress_line(record))


def console_echo(prefix: str) -> Callable[[dict[str, Any]], None]:
    """Print each running record as one progress line: rewritten in place on a terminal, a new line (every
    period) when the output goes to a file or a pipe."""
    import sys

    last: dict[str, Any] = {"done": None, "at": 0.0}

    def echo(record: dict[str, Any]) -> None:
        now = time.time()
        if record.get("done") is None or (record["done"] == last["done"] and now - last["at"] < 30):
            return  # a line when the count moves, else every 30 s
        last.update(done=record["done"], at=now)
        line = f"{prefix} " + progress_line({**record, "age_s": 0}).split("  updated ")[0].removeprefix(
            "running  "
        )
        if sys.stdout.isatty():
            print(f"\r{line}\033[K", end="", flush=True)
        else:
            print(line, flush=True)

    return echo
