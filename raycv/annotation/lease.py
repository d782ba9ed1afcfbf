"""One run per annotation output at a time (SPEC §6): the lease ``OUTPUT/_lease.json``.

A run takes the lease before it recovers or writes anything, renews it from a background thread while it
runs and deletes it when it ends. A second run on the same output finds it and stops with a
:class:`~raycv.errors.ConfigError` (exit 2) naming the holder. A lease not renewed for
:data:`STALE_AFTER_S` (its holder died: SIGKILL, lost node) is stale: the next run takes it over and then
recovers what the dead run left (:func:`raycv.annotation.commit.recover`).

How each store makes "only one run wins" hold:

- S3: conditional writes. The lease is created with ``If-None-Match: *`` (a second create answers 412),
  and renewed, taken over and deleted with ``If-Match: <ETag>`` of the version the run last saw, so a run
  never overwrites a lease that changed since it read it. AWS S3 and moto (the tests' server) support both;
  a store that answers that it does not (501 NotImplemented, or refuses the header) falls back to write,
  wait :data:`SETTLE_S`, read back: the run whose record is there after the wait holds the lease.
- Local folders: the lease is created with an exclusive ``link`` of a complete temporary file (fails when
  one exists), and every read-check-write (renew, take over, release) holds ``fcntl.flock`` on
  ``_lease.json.lock`` for its few milliseconds. Shared network filesystems without working locks are not
  supported for concurrent runs.

Staleness is judged on the reader's clock against the holder's ``renewed_at`` (UTC): hosts whose clocks
differ by more than the stale time can misjudge it. The reader's stale time decides, not the holder's
(``expires_after_s`` in the file is for people).
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
from types import TracebackType
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


def default_stale_after_s() -> float:
    """:data:`STALE_AFTER_S`, or ``RAYCV_LEASE_STALE_S`` when set."""
    value = os.environ.get(STALE_ENV)
    if not value:
        return STALE_AFTER_S
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(STALE_ENV, value, "Give the stale time of a lease in seconds, e.g. 120.") from None
    if seconds <= 0:
        raise ConfigError(STALE_ENV, value, "Give a positive number of seconds, e.g. 120.")
    return seconds


class Lease:
    """The lease of one run on ``output``, as a context manager: taken on enter, released on exit.

    Args:
        output: the annotation output (local folder or ``s3://`` prefix).
        store: the run's storage handle.
        run_id: the run taking the lease.
        stale_after_s: how old another run's ``renewed_at`` must be to take its lease over; default
            :func:`default_stale_after_s` (:data:`STALE_AFTER_S` or ``RAYCV_LEASE_STALE_S``).
        renew_every_s: period of the renewing thread; default ``min(RENEW_EVERY_S, stale_after_s / 4)``.

    Attributes:
        taken_over: the record of the stale lease this run took over, else None.
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

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()

    def acquire(self) -> None:
        """Take the lease: create it, or take over a stale one.

        Raises:
            ConfigError: (``output``) another run holds a fresh lease, naming it; or the output cannot be
                written.
        """
        for _ in range(5):  # each round loses only to another run that changed the lease meanwhile
            try:
                self._tag = self._file.create(self._encoded())
                return
            except FileExistsError:
                pass
            except Exception as exc:
                raise ConfigError(
                    "output",
                    self.output,
                    f"Cannot write {self.uri} ({type(exc).__name__}: {exc}). Check that the folder or bucket "
                    "exists and that this run may write there.",
                ) from exc
            found = self._file.read()
            if found is None:
                continue  # released between our create and our read: create again
            holder, tag = found
            if _age_s(holder) < self.stale_after_s:
                raise ConfigError("output", self.output, self._held_message(holder))
            with contextlib.suppress(_Conflict):
                self._tag = self._file.replace(self._encoded(), tag)
                self.taken_over = holder
                log.warning(
                    "Took over the stale lease of run %s (host %s, last renewed %s ago) on %s; recovering.",
                    holder.get("run_id"),
                    holder.get("host"),
                    _ago(_age_s(holder)),
                    self.output,
                )
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
        """Make sure this run still holds the lease (before committing).

        Raises:
            LeaseLostError: another run took it over (this run was too slow to renew it), or it is gone.
        """
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
                log.warning(
                    "Could not renew the lease %s (%s); retrying in %.0f s.",
                    self.uri,
                    exc,
                    self.renew_every_s,
                )

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
        found = self._file.read()
        who = (
            f"run {found[0].get('run_id')} on {found[0].get('host')}" if found else "nobody (it was deleted)"
        )
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
    if seconds == float("inf"):
        return "never"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _decode(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class _LocalLease:
    """The lease file in a local folder (see the module's docstring)."""

    def __init__(self, uri: str) -> None:
        self.path = storage.canonical_uri(uri)

    def read(self) -> tuple[dict[str, Any], str] | None:
        """(record, content hash), None when there is no lease."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
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
            found = self.read()
            if found is None or found[1] != tag:
                raise _Conflict
            os.replace(self._write_tmp(data), self.path)
        return hashlib.sha256(data).hexdigest()

    def delete(self, tag: str) -> None:
        with self._locked():
            found = self.read()
            if found is None or found[1] != tag:
                raise _Conflict
            os.unlink(self.path)

    def _write_tmp(self, data: bytes) -> str:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        return tmp

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock file's exclusive flock (released by the kernel if this process dies)."""
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class _S3Lease:
    """The lease object on S3 (see the module's docstring)."""

    def __init__(self, uri: str, store: Storage) -> None:
        fs, path = store.filesystem(uri)
        self.fs = fs
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
        if self.conditional:
            try:
                return self._put(data, IfNoneMatch="*")
            except _Conflict:
                raise FileExistsError(self.uri) from None
            except _Unsupported:
                self._fall_back("If-None-Match")
        if self.read() is not None:
            raise FileExistsError(self.uri)
        return self._put_and_check(data)

    def replace(self, data: bytes, tag: str | None) -> str:
        if tag is None:
            raise _Conflict
        if self.conditional:
            try:
                return self._put(data, IfMatch=tag)
            except _Unsupported:
                self._fall_back("If-Match")
        found = self.read()
        if found is None or found[1] != tag:
            raise _Conflict
        return self._put_and_check(data)

    def delete(self, tag: str) -> None:
        if self.conditional:
            try:
                self._call("delete_object", IfMatch=tag)
                return
            except _Unsupported:
                self._fall_back("If-Match on DeleteObject")
        found = self.read()
        if found is None or found[1] != tag:
            raise _Conflict
        self._call("delete_object")

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
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise _Conflict from None
            if code in ("NotImplemented", "501") or (code == "InvalidArgument" and "If-" in str(exc)):
                raise _Unsupported from exc
            raise

    def _fall_back(self, header: str) -> None:
        log.warning(
            "The store of %s does not support conditional writes (%s): the lease falls back to "
            "write-then-read, which waits %.0f s per write.",
            self.uri,
            header,
            SETTLE_S,
        )
        self.conditional = False


class _Unsupported(Exception):
    """The store refused a conditional request as not supported."""


def _s3_code(exc: BaseException) -> str:
    """The S3 error code of ``exc`` or its cause (s3fs wraps botocore's ClientError), else ""."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSYS:
        return "NotImplemented"
    return ""
