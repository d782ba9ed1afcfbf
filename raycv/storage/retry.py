"""Retries for a flaky object store: which errors are worth another try, and how often to try.

Object stores fail now and then (503 SlowDown when throttled, 500s, timeouts, reset connections), so every
S3 request is retried in three layers, each bounded: botocore (standard mode, :data:`S3_REQUEST_ATTEMPTS`
tries of one HTTP request, jittered exponential backoff), s3fs (:data:`S3FS_RETRIES` tries of one call,
which also covers a body cut off mid-read) and raycv (:func:`retrying`: :data:`OPERATION_ATTEMPTS` tries
of a whole operation, none started later than :data:`OPERATION_DEADLINE_S` after the first). Only
transient errors are retried (:func:`is_transient`); a missing object or a denied one fails at once.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow.fs as pafs

from raycv.errors import StorageError

_T = TypeVar("_T")
logger = logging.getLogger(__name__)


# Read when a filesystem is opened or an operation starts, so that a test can shorten them in-process.
S3_REQUEST_ATTEMPTS = 4  # botocore's tries of one HTTP request: backoff rand(0..1 s) x 2^n, at most 20 s
# s3fs's tries of one call, 0.1 x 1.7^n s apart: a GET whose body is cut off (botocore cannot retry that),
# and SlowDown once more after botocore. s3fs nests them (cat_file around _call_s3): 2 is up to 4 tries.
S3FS_RETRIES = 2
OPERATION_ATTEMPTS = 3  # raycv's tries of one operation, around the two above
OPERATION_DEADLINE_S = 120.0  # no new try of an operation starts later than this after its first
_BACKOFF_S = 0.5  # raycv's backoff: rand(0, 0.5 x 2^n) s, full jitter (spreads the retries of many workers)
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60  # per socket read, not per object: a stalled connection is dropped and retried
# S3 error codes worth another try: throttling, server faults, a request the server timed out.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "500",
        "502",
        "503",
        "504",
    }
)
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# What s3fs turns exhausted throttling and server errors into (s3fs.errors): OSError(EBUSY / EREMOTEIO).
_TRANSIENT_ERRNOS = frozenset(
    {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET, errno.EPIPE}
)


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types of a dropped connection or a timeout, from whichever HTTP stack is installed."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]  # resets, broken pipes, timeouts
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, ResponseParserError

        # HTTPClientError: ConnectionClosedError, ReadTimeoutError, ResponseStreamingError; ConnectionError:
        # EndpointConnectionError (aiohttp's ClientOSError, a reset), ConnectTimeoutError. A throttling
        # response may be invalid XML (s3fs issue 484), hence the parser error.
        types += [BotoConnectionError, HTTPClientError, ResponseParserError]
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    from http.client import IncompleteRead

    from fsspec.exceptions import FSTimeoutError

    return (*types, IncompleteRead, FSTimeoutError)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: ``__cause__``/``__context__`` and botocore's ``kwargs["error"]``."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or len(seen) > 20:
            continue
        seen.add(id(e))
        yield e
        inner = getattr(e, "kwargs", None)
        todo += [e.__cause__, e.__context__, inner.get("error") if isinstance(inner, dict) else None]


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: throttling, a server error, a timeout or a dropped connection.

    Never a missing or denied object (404, 403, NoSuchKey, AccessDenied), nor a bad request: those fail
    the same way every time, so they are reported at once.
    """
    chain = list(_causes(exc))
    if any(
        isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, StorageError)) for e in chain
    ):
        return False
    for e in chain:  # the server's answer, where there was one, decides
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:  # a botocore ClientError
            code = str(response["Error"].get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    transient = _transient_types()
    return any(
        isinstance(e, transient) or (isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS) for e in chain
    )


def retrying(op: Callable[[], _T], what: str) -> _T:
    """``op()``, tried again after a transient error (:func:`is_transient`) with exponential backoff.

    At most :data:`OPERATION_ATTEMPTS` tries, none starting later than :data:`OPERATION_DEADLINE_S` after
    the first; the waits are drawn from ``[0, 0.5 x 2^n]`` s (full jitter), so that many workers throttled
    at once do not come back at once. Any other error, or the last one, is raised as it came.

    Args:
        op: the whole operation, safe to repeat (a PUT, a GET, a listing page, one step of a move).
        what: what it does, for the debug log (``"read s3://b/k"``).
    """
    start = time.monotonic()
    attempt = 1
    while True:
        try:
            return op()
        except Exception as exc:
            delay = random.uniform(0, _BACKOFF_S * 2**attempt)
            late = time.monotonic() + delay - start > OPERATION_DEADLINE_S
            if attempt >= OPERATION_ATTEMPTS or late or not is_transient(exc):
                raise
            logger.debug("%s: %s: %s; try %d in %.1f s", what, type(exc).__name__, exc, attempt + 1, delay)
        time.sleep(delay)
        attempt += 1


class RetryingHandler(pafs.FSSpecHandler):
    """pyarrow's view of an fsspec filesystem (Ray Train's checkpoints, Ray Data) with :func:`retrying`.

    Every call pyarrow makes (stat, list, open, delete, move) is retried whole; reads and writes on an
    opened file are s3fs's own, retried by s3fs and botocore.
    """

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name not in _HANDLER_CALLS:
            return attr

        def call(*args: Any) -> Any:
            return retrying(lambda: attr(*args), f"{name} {args[0] if args else ''}")

        return call


_HANDLER_CALLS = frozenset(
    {
        "get_file_info",
        "get_file_info_selector",
        "create_dir",
        "delete_dir",
        "delete_dir_contents",
        "delete_root_dir_contents",
        "delete_file",
        "move",
        "copy_file",
        "open_input_stream",
        "open_input_file",
        "open_output_stream",
        "open_append_stream",
    }
)
