"""One run per annotation output at a time (SPEC §6): the lease ``OUTPUT/_lease.json``.

A run takes the lease before it recovers or writes anything, renews it from a thread while it runs and
deletes it at the end. A second run finds it and stops with a ConfigError (exit 2) naming the holder. A
lease not renewed for :data:`STALE_AFTER_S` belongs to a dead run (SIGKILL, lost node): the next run takes
it over, then recovers what the dead run left (:func:`raycv.annotation.commit.recover`).

Only one run wins. On S3 the lease is created with ``If-None-Match: *`` and renewed, taken over and
deleted with ``If-Match: <ETag>`` of the version the run saw last (AWS S3 and moto support both); a store
that refuses them (501 NotImplemented) falls back to write, wait :data:`SETTLE_S`, read back. Locally it
is created by an exclusive ``link`` of a complete file, and each read-check-write holds ``fcntl.flock`` on
``_lease.json.lock`` (network filesystems without working locks are not supported for concurrent runs).
Staleness is the reader's clock minus the holder's ``renewed_at`` (UTC), against the reader's stale time
(clocks apart by more than that misjudge it; ``expires_after_s`` in the file is for people).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raycv import storage
from raycv.errors import ConfigError, LeaseLostError
from raycv.storage import Storage

log = logging.getLogger(__name__)

LEASE = "_lease.json"
# A lease not renewed for this long belongs to a dead run. RAYCV_LEASE_STALE_S overrides it (tests, and
# operators who know their runs are dead and do not want to wait).
STALE_AFTER_S = 120.0
STALE_ENV = "RAYCV_LEASE_STALE_S"
RENEW_EVERY_S = 20.0  # at most; a shorter stale time renews at a quarter of it
SETTLE_S = 1.0  # stores without conditional writes: how long a writer waits before reading its write back


class _Conflict(Exception):
    """The lease is not the version this run last saw (another run wrote it, or it is gone)."""


class _Unsupported(Exception):
    """The store refused a conditional request as not supported."""


def default_stale_after_s() -> float:
    """:data:`STALE_AFTER_S`, or ``RAYCV_LEASE_STALE_S`` when set."""
    value = os.environ.get(STALE_ENV) or str(STALE_AFTER_S)
    with contextlib.suppress(ValueError):
        if float(value) > 0:
            return float(value)
    raise ConfigError(STALE_ENV, value, "Give a lease's stale time in seconds, e.g. 120.")


class Lease:
    """The lease of one run on ``output``: taken on enter, renewed meanwhile, released on exit.

    Args:
        output, store, run_id: the annotation output (local folder or ``s3://`` prefix), the run's storage
            handle and the id of the run taking the lease.
        stale_after_s: how old another run's ``renewed_at`` must be to take its lease over; default
            :func:`default_stale_after_s` (:data:`STALE_AFTER_S` or ``RAYCV_LEASE_STALE_S``).
        renew_every_s: period of the renewing thread; default ``min(RENEW_EVERY_S, stale_after_s / 4)``.

    ``taken_over`` is the record of the stale lease this run took over, else None.
    """

    def __init__(
        self,
        output: str,
        store: Storage,
        *,
        run_id: str,
        stale_after_s: float | None = None,
        renew_every_s: float | None = None,
    ) -> None:
        self.uri = storage.join(output, LEASE)
        self.output = output
        self.run_id = run_id
        self.stale_after_s = stale_after_s if stale_after_s is not None else default_stale_after_s()
        self.renew_every_s = renew_every_s or min(RENEW_EVERY_S, self.stale_after_s / 4)
        self.taken_over: dict[str, Any] | None = None
        self._file = _S3Lease(self.uri, store) if storage.scheme(output) != "file" else _LocalLease(self.uri)
        self._record = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": _now(),
            "renewed_at": _now(),
            "expires_after_s": self.stale_after_s,
        }
        self._tag: str | None = None  # the version of the lease this run wrote last (ETag, content hash)
        self._lock = threading.Lock()  # one renew/check/release at a time: each reads and moves _tag
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="raycv-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()

    def acquire(self) -> None:
        """Take the lease: create it, or take over a stale one.

        Raises:
            ConfigError: (``output``) another run holds a fresh lease, naming it; or it cannot be written.
        """
        for _ in range(5):  # each round loses only to another run that changed the lease meanwhile
            try:
                self._tag = self._file.create(self._encoded())
                return
            except FileExistsError:
                pass
            except Exception as exc:
                fix = "Check that the folder or bucket exists and that this run may write there."
                raise ConfigError("output", self.output, f"Cannot write {self.uri} ({exc!r}). {fix}") from exc
            found = self._file.read()
            if found is None:
                continue  # released between our create and our read: create again
            holder, tag = found
            if _age_s(holder) < self.stale_after_s:
                raise ConfigError("output", self.output, self._held_message(holder))
            with contextlib.suppress(_Conflict):
                self._tag = self._file.replace(self._encoded(), tag)
                self.taken_over = holder
                h = holder.get
                who = f"run {h('run_id')} (host {h('host')}, last renewed {_ago(_age_s(holder))} ago)"
                log.warning("Took over the stale lease of %s on %s.", who, self.output)
                return
        raise ConfigError("output", self.output, "Other runs keep changing its lease; try again later.")

    def renew(self) -> None:
        """Write a fresh ``renewed_at``. Raises :class:`LeaseLostError` when another run took the lease."""
        with self._lock:
            if self._lost:
                raise LeaseLostError(self._lost)
            self._record["renewed_at"] = _now()
            try:
                self._tag = self._file.replace(self._encoded(), self._tag)
            except _Conflict:
                self._lost = self._lost_message()
                raise LeaseLostError(self._lost) from None

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this run still holds the lease (checked before committing)."""
        with self._lock:
            if not self._lost:
                found = self._file.read()
                if found is None or found[1] != self._tag:
                    self._lost = self._lost_message()
            if self._lost:
                raise LeaseLostError(self._lost)

    def release(self) -> None:
        """Delete the lease if it is still this run's (a lease taken over by another run is left alone)."""
        with self._lock:
            if self._tag is None or self._lost:
                return
            try:
                self._file.delete(self._tag)
            except _Conflict:
                log.warning("The lease on %s was no longer this run's; left as it is.", self.output)
            except Exception as exc:  # the next run finds it stale
                log.warning("Could not delete the lease %s: %s", self.uri, exc)
            self._tag = None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except LeaseLostError as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # a flaky store: the next renewal may succeed before it goes stale
                log.warning("Could not renew the lease %s (%s); trying again.", self.uri, exc)

    def _encoded(self) -> bytes:
        return (json.dumps(self._record, indent=2) + "\n").encode()

    def _held_message(self, holder: dict[str, Any]) -> str:
        return (
            f"Another run holds it: run_id={holder.get('run_id')}, host={holder.get('host')}, "
            f"pid={holder.get('pid')}, started {holder.get('started_at')}, last renewed "
            f"{_ago(_age_s(holder))} ago ({self.uri}); wait for it to finish, or if it died, it goes stale "
            f"after {_ago(self.stale_after_s)} and the next run takes over."
        )

    def _lost_message(self) -> str:
        now = self._file.read()
        who = f"run {now[0].get('run_id')} on {now[0].get('host')}" if now else "nobody (it was deleted)"
        return (
            f"Run {self.run_id} lost its lease on {self.output}: it now belongs to {who}, so this run stops "
            f"without committing. It could not renew the lease within {_ago(self.stale_after_s)}; "
            "check the store's reachability, or run again once the other run has finished."
        )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _age_s(record: dict[str, Any]) -> float:
    """Seconds since ``record`` was renewed; infinite for a record that cannot be read (never valid)."""
    try:
        renewed = dt.datetime.fromisoformat(str(record["renewed_at"]))
    except (KeyError, ValueError):
        return float("inf")
    return (dt.datetime.now(dt.timezone.utc) - renewed).total_seconds()


def _ago(seconds: float) -> str:
    """A duration for people: "0.4 s", "35 s", "2 minutes"; "never" for an unreadable record."""
    if seconds == float("inf"):
        return "never"
    return f"{seconds / 60:.0f} minutes" if seconds >= 120 else f"{seconds:.{0 if seconds >= 10 else 1}f} s"


def _decode(data: bytes) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        if isinstance(record := json.loads(data), dict):
            return record
    return {}


class _LeaseFile:
    """The lease as stored: ``read`` gives (record, version tag), None when there is none."""

    def read(self) -> tuple[dict[str, Any], str] | None:
        raise NotImplementedError

    def _expect(self, tag: str | None) -> None:
        """Raise :class:`_Conflict` unless the stored lease is the version ``tag``."""
        found = self.read()
        if found is None or found[1] != tag:
            raise _Conflict


class _LocalLease(_LeaseFile):
    """The lease file in a local folder (see the module's docstring)."""

    def __init__(self, uri: str) -> None:
        self.path = storage.canonical_uri(uri)

    def read(self) -> tuple[dict[str, Any], str] | None:
        """(record, content hash), None when there is no lease."""
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            return None
        return _decode(data), hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str:
        """Write ``data`` as the lease unless one exists (FileExistsError); returns its hash."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with self._locked():
            tmp = self._write_tmp(data)
            try:
                os.link(tmp, self.path)  # atomic and exclusive: fails when the lease exists
            finally:
                os.unlink(tmp)
        return hashlib.sha256(data).hexdigest()

    def replace(self, data: bytes, tag: str | None) -> str:
        """Overwrite the lease if its hash is still ``tag``, else :class:`_Conflict`."""
        with self._locked():
            self._expect(tag)
            os.replace(self._write_tmp(data), self.path)
        return hashlib.sha256(data).hexdigest()

    def delete(self, tag: str) -> None:
        with self._locked():
            self._expect(tag)
            os.unlink(self.path)

    def _write_tmp(self, data: bytes) -> str:
        (tmp := Path(f"{self.path}.tmp-{uuid.uuid4().hex[:8]}")).write_bytes(data)
        return str(tmp)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock file's exclusive flock (released by the kernel if this process dies)."""
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class _S3Lease(_LeaseFile):
    """The lease object on S3 (see the module's docstring)."""

    def __init__(self, uri: str, store: Storage) -> None:
        self.fs, path = store.filesystem(uri)
        self.uri = uri
        self.bucket, _, self.key = path.partition("/")
        self.conditional = True  # until the store says it does not support conditional writes

    def read(self) -> tuple[dict[str, Any], str] | None:
        """(record, ETag), None when there is no lease."""
        from fsspec.asyn import sync

        async def _get() -> tuple[bytes, str]:
            obj = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with obj["Body"] as body:
                return bytes(await body.read()), str(obj["ETag"])

        try:
            data, etag = sync(self.fs.loop, _get)
        except FileNotFoundError:
            return None
        return _decode(data), etag

    def create(self, data: bytes) -> str:
        try:
            tag: str | None = self._if_supported(self._put, data, IfNoneMatch="*")
        except _Conflict:
            raise FileExistsError(self.uri) from None
        if tag is None:
            if self.read() is not None:
                raise FileExistsError(self.uri)
            tag = self._put_and_check(data)
        return tag

    def replace(self, data: bytes, tag: str | None) -> str:
        new: str | None = self._if_supported(self._put, data, IfMatch=tag) if tag else None
        if new is None:
            self._expect(tag)
            new = self._put_and_check(data)
        return new

    def delete(self, tag: str) -> None:
        if self._if_supported(self._call, "delete_object", IfMatch=tag) is None:
            self._expect(tag)
            self._call("delete_object")

    def _if_supported(self, fn: Any, *args: Any, **condition: str) -> Any:
        """``fn(*args, **condition)`` while the store takes conditional requests; None once it refused one."""
        if self.conditional:
            try:
                return fn(*args, **condition)
            except _Unsupported:
                self.conditional = False
                log.warning("%s: the store refuses %s; falling back to write-then-read.", self.uri, condition)
        return None

    def _put(self, data: bytes, **condition: str) -> str:
        return str(self._call("put_object", Body=data, **condition)["ETag"])

    def _put_and_check(self, data: bytes) -> str:
        """Without conditional writes: write, wait for any racing writer, and see whose write stayed."""
        self._put(data)
        time.sleep(SETTLE_S)
        found = self.read()
        if found is None or _decode(data).get("run_id") != found[0].get("run_id"):
            raise _Conflict
        return found[1]

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except FileExistsError:
            raise _Conflict from None  # s3fs's reading of a 412 to If-None-Match
        except Exception as exc:
            code = _s3_code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise _Conflict from None
            if code == "NotImplemented" or (code == "InvalidArgument" and "If-" in str(exc)):
                raise _Unsupported from exc
            raise


def _s3_code(exc: BaseException) -> str:
    """The S3 error code of ``exc`` or its cause (s3fs wraps botocore's ClientError), else ""."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return "NotImplemented" if isinstance(exc, OSError) and exc.errno == errno.ENOSYS else ""
