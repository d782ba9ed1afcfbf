"""URIs to filesystems: local paths, ``file://`` and ``s3://`` (AWS or any S3-compatible endpoint).

A run builds one :class:`Storage` handle (the endpoint, bound once) and passes it down to every function,
Ray task and actor that reads, writes or lists. Nothing here holds credentials: they come from the
standard AWS chain (environment, profile, instance/IRSA role) of whichever process opens the filesystem,
so the same calls work on the driver and inside Ray workers. URI helpers (:func:`join`) need no handle.
Every S3 operation is retried on transient errors (throttling, 5xx, timeouts, resets): see :mod:`.retry`.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from raycv.errors import StorageError
from raycv.storage import retry
from raycv.storage.retry import retrying

_GLOB_CHARS = set("*?[")
# This process's filesystems, keyed by (protocol, endpoint): shared by every handle, never pickled.
_FILESYSTEMS: dict[tuple[str, str | None], fsspec.AbstractFileSystem] = {}


@dataclass(frozen=True)
class FileEntry:
    """One listed file: its full URI, its size in bytes and a content fingerprint (ETag or size-mtime)."""

    uri: str
    size: int
    fingerprint: str


def scheme(uri: str) -> str:
    """``"s3"`` for ``s3://...``, ``"file"`` for local paths and ``file://`` URIs."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return "file"


def canonical_uri(uri: str) -> str:
    """The one spelling of ``uri`` that raycv lists, stores and hashes (``image_id``).

    A local path or ``file://`` URI becomes a plain absolute POSIX path: ``~`` expanded, a relative path
    resolved against the current folder, ``.``, ``..`` and repeated slashes collapsed, no trailing slash;
    symbolic links are kept as named. Other URIs keep everything but the case of their scheme: an S3 key
    is case- and slash-sensitive (``s3://b/a//k`` and ``s3://b/a/k`` are two objects).

    Args:
        uri: a local path (absolute, relative, ``~/...``), a ``file://`` URI or an ``s3://`` URI.

    Returns:
        ``/abs/path`` for a local file or folder, else ``uri`` with a lower-case scheme.
    """
    kind = scheme(uri)
    if kind != "file":
        return f"{kind}://{uri.split('://', 1)[1]}"
    path = uri.split("://", 1)[1] if "://" in uri else uri
    if path.startswith("localhost/"):  # file://localhost/abs is file:///abs (RFC 8089)
        path = path[len("localhost") :]
    path = os.path.abspath(os.path.expanduser(path))
    return "/" + path.lstrip("/")  # POSIX keeps a leading "//" as is; it names the same folder as "/"


def resolve_endpoint(endpoint_url: str | None) -> str | None:
    """The S3 endpoint to use: the config's, else ``AWS_ENDPOINT_URL(_S3)``, else AWS itself (None)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` whatever the scheme."""
    if scheme(uri) == "file" and "://" not in uri:
        return os.path.join(uri, *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def _with_scheme(uri: str, path: str) -> str:
    """The URI of ``path`` (a scheme-less path of ``uri``'s filesystem): a local one stays a plain path."""
    kind = scheme(uri)
    return path if kind == "file" else f"{kind}://{path}"


def _wrap(uri: str, exc: Exception) -> StorageError:
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")


def _filesystem(protocol: str, endpoint: str | None) -> fsspec.AbstractFileSystem:
    """This process's filesystem for ``(protocol, endpoint)``, opened at its first use."""
    fs = _FILESYSTEMS.get((protocol, endpoint))
    if fs is None:
        if protocol == "file":
            fs = fsspec.filesystem("file")
        else:
            import s3fs

            client_kwargs: dict[str, Any] = {"endpoint_url": endpoint} if endpoint else {}
            config_kwargs = {
                # Standard mode retries throttling, 5xx, timeouts and dropped connections (the legacy
                # default misses some throttling codes) with jittered backoff and a retry quota.
                "retries": {"total_max_attempts": retry.S3_REQUEST_ATTEMPTS, "mode": "standard"},
                "connect_timeout": retry.CONNECT_TIMEOUT_S,
                "read_timeout": retry.READ_TIMEOUT_S,
            }
            # Listings are not cached: an archive grows between runs of the same process (tests, daemons).
            fs = s3fs.S3FileSystem(
                client_kwargs=client_kwargs, config_kwargs=config_kwargs, use_listings_cache=False
            )
            fs.retries = retry.S3FS_RETRIES  # a class attribute of s3fs, no constructor argument
        fs = _FILESYSTEMS.setdefault((protocol, endpoint), fs)  # two threads may race: all keep the first
    return fs


# A forked child opens its own: the parent's clients (sockets, event loop) are not safe to share.
os.register_at_fork(after_in_child=_FILESYSTEMS.clear)


@dataclass(frozen=True, kw_only=True)
class Storage:
    """One run's handle on storage: every read, write, listing and move, with the endpoint bound once.

    Built once by an entry point (``Storage(endpoint_url=cfg.storage.endpoint_url)``) and passed down to
    every function, Ray task and actor that touches storage. It holds only the endpoint: it pickles to a
    few bytes, and each process opens its filesystems at their first use and keeps them (shared by all
    handles with the same endpoint). Credentials come from the standard AWS chain of that process.

    Args:
        endpoint_url: an S3-compatible endpoint for ``s3://`` URIs (``http://minio:9000``); None uses
            ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` as set in the process that opens the filesystem,
            else AWS itself (see :func:`resolve_endpoint`).
    """

    endpoint_url: str | None = None

    def filesystem(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``uri`` and the path inside it (no scheme, no trailing slash on S3).

        Raises:
            StorageError: for a scheme raycv does not support.
        """
        kind = scheme(uri)
        if kind == "file":
            return _filesystem("file", None), canonical_uri(uri)
        if kind in ("s3", "s3a"):
            return _filesystem("s3", resolve_endpoint(self.endpoint_url)), uri.split("://", 1)[1].rstrip("/")
        raise StorageError(
            f"Unsupported URI scheme '{kind}://' in {uri!r}: use a local path, file:// or s3://."
        )

    def pyarrow_filesystem(self, uri: str) -> tuple[Any, str]:
        """A ``pyarrow.fs.FileSystem`` and scheme-less path for ``uri`` (Ray Data, Ray Train's storage)."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(uri)
        if scheme(uri) == "file":
            return pafs.LocalFileSystem(), path
        return pafs.PyFileSystem(retry.RetryingHandler(fs)), path

    def read_bytes(self, uri: str) -> bytes:
        """The whole content of ``uri``.

        Raises:
            FileNotFoundError: when nothing is stored at ``uri``.
            StorageError: for any other failure, with the URI.
        """
        fs, path = self.filesystem(uri)
        try:
            return retrying(lambda: fs.cat_file(path), f"read {uri}")  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise FileNotFoundError(f"No such file: {uri}") from None
        except Exception as exc:
            raise _wrap(uri, exc) from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` to ``uri`` atomically: readers see the old content or the new, never a part.

        Local files are written to a temporary name and renamed; an S3 PUT is atomic by itself.
        """
        fs, path = self.filesystem(uri)
        try:
            if scheme(uri) == "file":
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                retrying(lambda: fs.pipe_file(path, data), f"write {uri}")
        except Exception as exc:
            raise _wrap(uri, exc) from exc

    def write_json(self, uri: str, obj: Any) -> None:
        """Write ``obj`` as indented JSON (a card, a summary)."""
        self.write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def exists(self, uri: str) -> bool:
        """Whether a file or folder/prefix is stored at ``uri``."""
        fs, path = self.filesystem(uri)
        try:
            return bool(retrying(lambda: fs.exists(path), f"check {uri}"))
        except Exception as exc:
            raise _wrap(uri, exc) from exc

    def remove(self, uri: str, *, recursive: bool = False) -> None:
        """Delete ``uri`` (a folder too with ``recursive``); a missing path is not an error."""
        fs, path = self.filesystem(uri)
        try:
            if retrying(lambda: fs.exists(path), f"check {uri}"):
                retrying(lambda: fs.rm(path, recursive=recursive), f"remove {uri}")
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise _wrap(uri, exc) from exc

    def move(self, src: str, dst: str) -> None:
        """Move one file (a rename locally, copy then delete on S3, each step retried by itself)."""
        fs, src_path = self.filesystem(src)
        _, dst_path = self.filesystem(dst)
        try:
            if scheme(src) == "file":
                os.makedirs(os.path.dirname(dst_path), exist_ok=True)
                os.replace(src_path, dst_path)
            else:
                retrying(lambda: fs.copy(src_path, dst_path), f"copy {src} to {dst}")
                retrying(lambda: fs.rm(src_path), f"remove {src}")
        except Exception as exc:
            raise _wrap(src, exc) from exc

    def file_entry(self, uri: str) -> FileEntry:
        """The :class:`FileEntry` of the one file named by ``uri``, never read as a glob (``img[1].png``).

        Raises:
            FileNotFoundError: nothing is stored at ``uri``, or it is a folder/prefix.
            StorageError: any other failure, with the URI.
        """
        uri = canonical_uri(uri)
        fs, path = self.filesystem(uri)
        info = _info(fs, uri, path)
        if info is None or info.get("type") == "directory":
            raise FileNotFoundError(f"No such file: {uri}")
        return FileEntry(uri, int(info.get("size") or 0), _fingerprint(info))

    def iter_files(self, uri: str, *, extensions: tuple[str, ...] | None = None) -> Iterator[FileEntry]:
        """Files under a prefix (recursive) or matching a glob, in sorted order, as :class:`FileEntry`.

        Args:
            uri: a folder/prefix (``s3://bucket/archive/``), one file, or a glob (``s3://bucket/**/*.jpg``);
                local ones in any spelling (see :func:`canonical_uri`, which every listed URI follows).
            extensions: keep only names ending in one of these (lower-case, with the dot); None keeps all.

        A file or prefix that exists is listed as named, even with ``*``, ``?`` or ``[`` in its name; only
        a URI that names nothing is read as a glob. A prefix is listed as it is read, page by page on S3
        (1000 keys, already in key order) and folder by folder locally, so listing millions of objects
        holds one page, not the whole listing. Globs are resolved whole (fsspec's ``glob``). Hidden and
        underscore-prefixed names (``.DS_Store``, ``_SUCCESS``) are skipped.

        Raises:
            FileNotFoundError: nothing exists at ``uri``.
            StorageError: any other failure while listing, with the URI.
        """
        uri = canonical_uri(uri)
        fs, path = self.filesystem(uri)
        listing = _listing(fs, uri, path)
        while True:
            try:
                p, info = next(listing)
            except StopIteration:
                return
            except FileNotFoundError:
                raise FileNotFoundError(f"No such file or prefix: {uri}") from None
            except StorageError:
                raise
            except Exception as exc:
                raise _wrap(uri, exc) from exc
            name = posixpath.basename(p)
            if not name or name.startswith((".", "_")):
                continue
            if extensions and not name.lower().endswith(extensions):
                continue
            yield FileEntry(_with_scheme(uri, p), int(info.get("size") or 0), _fingerprint(info))

    def list_dirs(self, uri: str) -> list[str]:
        """Immediate sub-folders of ``uri`` (names only, sorted, hidden ones skipped)."""
        fs, path = self.filesystem(uri)
        try:
            entries = retrying(lambda: fs.ls(path, detail=True), f"list {uri}")
        except FileNotFoundError:
            raise FileNotFoundError(f"No such folder: {uri}") from None
        except Exception as exc:
            raise _wrap(uri, exc) from exc
        names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]
        return sorted(n for n in names if not n.startswith((".", "_")))


def _fingerprint(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return "etag:" + str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"size:{info.get('size', 0)}-mtime:{mtime}"


def _info(fs: Any, uri: str, path: str) -> dict[str, Any] | None:
    """``fs.info`` of ``path`` itself (no glob), None when nothing is there."""
    try:
        return retrying(lambda: fs.info(path), f"stat {uri}")  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _wrap(uri, exc) from exc


def _listing(fs: Any, uri: str, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, info)`` of every file at ``path``, streamed for a prefix (see :func:`iter_files`)."""
    info = _info(fs, uri, path)
    if info is None:
        if not _GLOB_CHARS & set(path):
            raise FileNotFoundError(path)
        found = retrying(lambda: fs.glob(path, detail=True), f"glob {uri}")
        yield from ((p, found[p]) for p in sorted(found) if found[p].get("type") != "directory")
    elif info.get("type") != "directory":
        yield path, info
    elif scheme(uri) == "file":
        yield from _walk_local(path)
    else:
        yield from _s3_objects(fs, path)


def _walk_local(folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Files below ``folder`` in sorted order of their full paths, one folder's entries in memory at a time."""
    with os.scandir(folder) as it:
        # A folder sorts as "name/", which is where its files' full paths sort: "a-b" < "a.png" < "a/x".
        entries = sorted(it, key=lambda e: e.name + ("/" if e.is_dir() else ""))
    for entry in entries:
        if entry.is_dir():
            yield from _walk_local(entry.path)
        elif entry.is_file():
            st = entry.stat()
            yield entry.path, {"size": st.st_size, "mtime": st.st_mtime, "type": "file"}


def _s3_objects(fs: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object below the prefix ``path`` (``bucket/key``), one ListObjectsV2 page at a time.

    S3 returns keys in UTF-8 binary order, which is the sorted order of the Python strings.
    """
    bucket, _, key = path.partition("/")
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/" if key else ""}
    while True:
        page = retrying(lambda: fs.call_s3("list_objects_v2", **kwargs), f"list s3://{path}")
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # folder placeholders made by consoles and some tools
                yield f"{bucket}/{obj['Key']}", {"size": obj["Size"], "ETag": obj.get("ETag"), "type": "file"}
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
