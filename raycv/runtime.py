"""Where raycv's work runs: joining a Ray cluster, or starting a local one, once per command; and a quiet
console: Ray's own output (worker logs, Ray Data's operator logs, Ray Train's messages) goes to Ray's log
files, and raycv copies this run's part of them next to its results (:func:`save_logs`).

``RAYCV_VERBOSE=1`` (the commands' ``--verbose``) shows Ray's output on the console as well.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray

VERBOSE_ENV = "RAYCV_VERBOSE"
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray, unless already connected.

    Unless verbose, the workers' output is not streamed to this console (it stays in their log files) and
    Ray's loggers print errors only.
    """
    if ray.is_initialized():
        return
    loud = verbose()
    if not loud:
        quiet_ray_console()  # ray.init itself logs (e.g. its token authentication notice)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:  # a local Ray started here: its processes inherit this environment
        # Ray Train's controller polls its workers every 2 s and a worker's report() waits for the poll of the
        # previous one: every epoch and the end of a run waited up to 2 s more (a 1-epoch run: 16.2 -> 13.4 s).
        os.environ.setdefault(TRAIN_POLL_ENV, "0.5")
    ray.init(
        address=address,
        log_to_driver=loud,
        logging_level=logging.INFO if loud else logging.WARNING,
        **init_kwargs,
    )
    if not loud:
        quiet_ray_console()


def quiet_ray_console() -> None:
    """Ray's console handlers show warnings and errors only; its log files keep everything."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in _RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if (
                not isinstance(handler, logging.FileHandler)
                and type(handler).__name__ != "SessionFileHandler"
            ):
                handler.setLevel(logging.WARNING)


def session_logs() -> str | None:
    """The local Ray session's log folder (None when this process joined a remote cluster's head)."""
    try:
        node: Any = ray._private.worker._global_node
        folder = os.path.join(node.get_session_dir_path(), "logs")
    except Exception:
        return None
    return folder if os.path.isdir(folder) else None


def save_logs(dest: str, store: Any, since: float) -> str | None:
    """Write this run's part of Ray's logs (worker output, Ray Data's log; files written since ``since``) as
    one text file at ``dest``; returns where, or None when no local session log exists (a remote cluster:
    its dashboard keeps them). Best effort: never fails the run."""
    folder = session_logs()
    if folder is None:
        return None
    parts = []
    patterns = ("worker-*.out", "worker-*.err", "ray-data.log", "python-core-driver-*.log")
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(folder, pattern))):
            try:
                if os.path.getmtime(path) < since or os.path.getsize(path) == 0:
                    continue
                with open(path, errors="replace") as f:
                    parts.append(f"===== {os.path.basename(path)} =====\n{f.read()[-2_000_000:]}")
            except OSError:
                continue
    if HIDDEN_CORE_LINES:
        parts.append(
            "===== the driver's Ray core lines =====\n"
            + b"\n".join(HIDDEN_CORE_LINES).decode(errors="replace")
        )
    try:
        store.write_bytes(dest, "\n".join(parts).encode())
    except Exception:
        return None
    return dest


def stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


# A line Ray's C++ core writes to the driver's stderr: "[2026-12-07 05:42:20,687 E 20307 20307] core_worker.cc:...",
# or an INFO/WARNING line of Ray's Python loggers: "2026-12-07 05:43:41,928\tWARNING some_module.py:85 -- ..."
_CORE_LINE = re.compile(
    rb"^(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] "
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(DEBUG|INFO|WARNING) \S+\.py:\d+ -- )"
)
HIDDEN_CORE_LINES: list[bytes] = []


def raycv_logging() -> None:
    """raycv's own log records on the console as ``[raycv] WARNING: ...`` lines (INFO too when verbose), not
    in Ray's format: :func:`core_lines_to_log` keeps lines in Ray's format off the console."""
    logger = logging.getLogger("raycv")
    if any(getattr(h, "_raycv", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[raycv] %(levelname)s: %(message)s"))
    handler._raycv = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose() else logging.WARNING)
    logger.propagate = False


@contextlib.contextmanager
def core_lines_to_log() -> Iterator[None]:
    """Keep Ray's own lines (its C++ core's, and its Python loggers' INFO and WARNING lines) that reach this
    process's stderr off the console (unless verbose): they
    are kept in :data:`HIDDEN_CORE_LINES` and go into the run's log (:func:`save_logs`). Everything else
    written to stderr passes through, in order. For the ``raycv`` command only (it redirects file
    descriptor 2 of the whole process)."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    console = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if _CORE_LINE.match(line):
                    HIDDEN_CORE_LINES.append(line)
                else:
                    os.write(console, line + b"\n")
        if pending:
            os.write(console, pending)

    thread = threading.Thread(target=pump, name="raycv-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # the pipe's last writer here: the pump reads to its end, then stops
        thread.join(timeout=2)
