"""The plan of an annotation run: every input file and its fingerprint, streamed into Arrow chunks.

Inputs are a prefix (listed page by page), a glob, a manifest (``.txt``/``.csv``/``.parquet``) or a list
of URIs; the driver holds the plan as Arrow, never as a list of Python objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from raycv import storage
from raycv.data import medical
from raycv.data.formats import IMAGE_EXTENSIONS
from raycv.errors import ConfigError
from raycv.outputs import schema as outputs
from raycv.storage import Storage

MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
INPUT_EXTENSIONS = tuple(
    dict.fromkeys(IMAGE_EXTENSIONS + medical.DICOM_EXTENSIONS + medical.NIFTI_EXTENSIONS)
)
ROWS_PER_BLOCK = 64
PLAN_CHUNK_ROWS = 8192  # listed files per Arrow chunk of the plan
PLAN_SCHEMA = pa.schema([("image_id", pa.string()), ("image_uri", pa.string()), ("source_etag", pa.string())])


def _manifest_uris(uri: str, store: Storage) -> list[str]:
    data = store.read_bytes(uri)
    if uri.lower().endswith(".txt"):
        return [ln.strip() for ln in data.decode().splitlines() if ln.strip() and not ln.startswith("#")]
    import io

    if uri.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(io.BytesIO(data))
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
    if "image_uri" not in table.column_names:
        raise ConfigError(
            "input", uri, f"A manifest needs an 'image_uri' column; found {table.column_names}."
        )
    return [u for u in table.column("image_uri").to_pylist() if u]


def _fingerprints(uris: list[str], store: Storage) -> Iterator[tuple[str, str | None]]:
    """``(uri, fingerprint)`` of each named file, looked up as named: ``img[1].png`` is never a glob."""

    def one(uri: str) -> tuple[str, str | None]:
        try:
            return uri, store.file_entry(uri).fingerprint
        except OSError:  # FileNotFoundError (missing, or a folder) and StorageError
            return uri, None  # the read stage reports it as an error row

    with ThreadPoolExecutor(max_workers=16) as pool:
        yield from pool.map(one, uris)


@dataclass
class Plan:
    """The input files of a run as Arrow chunks of :data:`PLAN_SCHEMA`, in listing (or manifest) order.

    ``source_etag`` is the listing's fingerprint, ``""`` when unknown (the read stage reports why).
    Iterating gives ``(image_uri, fingerprint or None)``.
    """

    chunks: list[pa.Table] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(c.num_rows for c in self.chunks)

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        for c in self.chunks:
            for uri, etag in zip(c["image_uri"].to_pylist(), c["source_etag"].to_pylist(), strict=True):
                yield uri, etag or None

    def rows_per_block(self, actors: int) -> int:
        """Up to ROWS_PER_BLOCK, and few enough that every one of ``actors`` gets at least two blocks."""
        return max(1, min(ROWS_PER_BLOCK, -(-len(self) // (2 * actors))))

    def blocks(self, actors: int) -> list[pa.Table]:
        """Zero-copy slices of :meth:`rows_per_block` rows for Ray Data."""
        rows = self.rows_per_block(actors)
        return [c.slice(i, rows) for c in self.chunks for i in range(0, c.num_rows, rows)]


def _chunked(entries: Iterable[tuple[str, str | None]], rows: int) -> Iterator[pa.Table]:
    """Arrow chunks of ``rows`` plan rows from a stream of ``(uri, fingerprint)``; only one chunk in lists."""
    uris: list[str] = []
    etags: list[str] = []

    def flush() -> pa.Table:
        ids = [outputs.image_id_of(u) for u in uris]
        table = pa.table({"image_id": ids, "image_uri": uris, "source_etag": etags}, schema=PLAN_SCHEMA)
        uris.clear(), etags.clear()  # type: ignore[func-returns-value]
        return table

    for uri, etag in entries:
        uris.append(uri)
        etags.append(etag or "")
        if len(uris) >= rows:
            yield flush()
    if uris:
        yield flush()


def plan_inputs(source: str | list[str], store: Storage, *, chunk_rows: int = PLAN_CHUNK_ROWS) -> Plan:
    """Every input file with its fingerprint, in a stable order, de-duplicated, as a :class:`Plan`.

    ``source`` is a prefix (all image, DICOM and NIfTI files below it), a glob, a manifest (``.txt`` one
    URI per line, ``.csv``/``.parquet`` with an ``image_uri`` column) or a list of URIs. A prefix is
    streamed from the listing into Arrow chunks of ``chunk_rows``, so the driver never holds the listing
    as Python objects; a listing has no duplicates, lists and manifests are de-duplicated in Arrow.

    Every URI is planned in its canonical spelling (:func:`raycv.storage.canonical_uri`: a local file as
    its absolute path, a relative manifest entry resolved against the current folder), so one file named
    two ways is one row with one ``image_id``. Only a ``source`` string that names nothing and holds
    ``*``, ``?`` or ``[`` is a glob; list items and manifest entries are always files as named.
    """
    if isinstance(source, list) or (source.lower().endswith(MANIFEST_EXTENSIONS) and "*" not in source):
        uris = source if isinstance(source, list) else _manifest_uris(source, store)
        canonical = [storage.canonical_uri(u) for u in uris]
        # pc.unique keeps the order of first appearance
        unique = pc.unique(pa.array(canonical, pa.string())).to_pylist()
        return Plan(list(_chunked(_fingerprints(unique, store), chunk_rows)))
    listing = store.iter_files(source, extensions=INPUT_EXTENSIONS)
    try:
        return Plan(list(_chunked(((e.uri, e.fingerprint) for e in listing), chunk_rows)))
    except FileNotFoundError:
        raise ConfigError(
            "input", source, "Nothing there: give an existing prefix, glob, list or manifest."
        ) from None


def skip_current(plan: Plan, current: pa.Table) -> int:
    """Drop from ``plan`` (in place) the files ``current`` holds; returns their committed rows (images)."""
    skipped = 0
    for i, chunk in enumerate(plan.chunks):
        pos = pc.index_in(
            outputs.plan_keys(chunk["image_uri"], chunk["source_etag"]), value_set=current["key"]
        )
        hit = pc.is_valid(pos)
        skipped += int(pc.sum(current["rows"].take(pos.filter(hit))).as_py() or 0)
        plan.chunks[i] = chunk.filter(pc.invert(hit))
    return skipped
