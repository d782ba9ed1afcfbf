"""Annotation outputs (SPEC §6): the Parquet schemas, the layout of ``OUTPUT`` and its committed rows.

``OUTPUT/images/`` holds one row per image (:func:`images_schema`), ``OUTPUT/objects/`` one row per
detected object (:func:`objects_schema`), and :func:`read_index` lists what is committed. How a run's
staged files are committed exactly once (``_staging``, ``_journal``, ``commit``, ``recover``) is
:mod:`raycv.annotation.commit`.

Rows are superseded by input file, not by ``image_id``: a multi-frame DICOM or NIfTI volume has one row
per frame (``image_uri`` = ``<file>#frame=<k>``, ``frame`` = k, ``frame_count`` = frames), and a re-run
replaces all rows of the file, whatever number of frames it had before (:class:`Index`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycv import storage
from raycv.storage import Storage
from raycv.tasks.registry import OBJECT_FIELDS

IMAGES_DIR = "images"
STAGING_DIR = "_staging"
JOURNAL_DIR = "_journal"
SUMMARY = "_summary.json"

COMMON_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=False),  # a frame of a multi-frame file: "<uri>#frame=<k>"
    pa.field("frame", pa.int32()),  # 0-based frame (DICOM) or slice (NIfTI); null for single images
    pa.field("frame_count", pa.int32()),  # rows the source file gives (frames x volumes); null when one
    pa.field("source_etag", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("task", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("annotated_at", pa.timestamp("us", tz="UTC")),
    pa.field("crs", pa.string()),  # geo-referenced inputs: "EPSG:32633" or WKT
    pa.field("transform", pa.list_(pa.float64())),  # geo-referenced inputs: 6 floats, GDAL order
]
OBJECTS_DIR = "objects"


def objects_schema() -> pa.Schema:
    """``OUTPUT/objects`` rows: one per detected object."""
    return pa.schema([pa.field("image_id", pa.string()), pa.field("image_uri", pa.string()), *OBJECT_FIELDS])


def split_objects(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A staged detection table -> (its ``images`` rows without the nested objects, one row per object)."""
    nested = table.column("objects").combine_chunks()
    flat = pc.list_flatten(nested)
    parents = pc.list_parent_indices(nested)
    objects = pa.table(
        {
            "image_id": table.column("image_id").take(parents),
            "image_uri": table.column("image_uri").take(parents),
            **{f.name: flat.field(f.name) for f in OBJECT_FIELDS},
        },
        schema=objects_schema(),
    )
    return table.drop_columns(["objects"]), objects


def images_schema(task: str) -> pa.Schema:
    """The schema of ``OUTPUT/images`` rows for ``task``: the common columns, then the task's own."""
    from raycv.tasks.registry import get_task  # here: importing the tasks loads torch

    return pa.schema(COMMON_FIELDS + list(get_task(task).image_fields))


def image_id_of(uri: str) -> str:
    """A stable id for an image: the hash of its canonical URI (:func:`raycv.storage.canonical_uri`).

    The same file gives the same id on any machine and in any spelling: ``/abs/x.png``,
    ``file:///abs/x.png`` and a relative ``x.png`` (run from ``/abs``) are one image.
    """
    return hashlib.sha256(storage.canonical_uri(uri).encode("utf-8")).hexdigest()[:32]


# ------------------------------------------------------------------------------------- reading outputs


FRAME_SUFFIX = "#frame="
_INDEX_COLUMNS = ["image_id", "image_uri", "frame", "frame_count", "source_etag", "model_id", "status"]
_INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("frame", pa.int32()),
        ("frame_count", pa.int32()),
        ("source_etag", pa.string()),
        ("model_id", pa.string()),
        ("status", pa.string()),
        ("file", pa.int32()),
    ]
)


def frame_uri(uri: str, frame: int) -> str:
    """The ``image_uri`` of frame ``frame`` (0-based) of a multi-frame file: ``<uri>#frame=<frame>``."""
    return f"{uri}{FRAME_SUFFIX}{frame}"


def source_uris(image_uri: pa.Array | pa.ChunkedArray, frame: pa.Array | pa.ChunkedArray) -> Any:
    """The file each row came from: ``image_uri`` without its ``#frame=<k>`` suffix where ``frame`` is set.

    Only rows with a ``frame`` lose the suffix, so a file literally named ``x#frame=1`` stays itself.
    """
    stripped = pc.replace_substring_regex(image_uri, pattern=FRAME_SUFFIX + "[0-9]+$", replacement="")
    return pc.if_else(pc.is_valid(frame), stripped, image_uri)


@dataclass(frozen=True)
class Index:
    """Every committed row in a few small Arrow columns (no image data), and the files that hold them.

    ``table`` columns: ``image_id``, ``source_uri`` (the input file), ``frame``, ``frame_count``,
    ``source_etag``, ``model_id``, ``status`` and ``file`` (position in ``files``).
    """

    table: pa.Table
    files: list[str]

    def current(self, model_id: str) -> pa.Table:
        """The input files already annotated in full by ``model_id``, every row ``ok``, from one content.

        Returns:
            ``key`` (the file's URI and ``source_etag``, see :func:`plan_keys`) and ``rows`` (how many
            committed rows the file has: 1, or its ``frame_count``) for each such file. A multi-frame file
            counts only when all ``frame_count`` of its frames are committed (a stopped run may leave some).
        """
        t = self.table
        good = pc.and_(pc.equal(t["status"], "ok"), pc.equal(t["model_id"], model_id))
        t = t.append_column("good", pc.fill_null(pc.cast(good, pa.int64()), 0))
        g = t.group_by("source_uri").aggregate(
            [
                ("good", "sum"),
                ("good", "count"),
                ("source_etag", "count_distinct"),
                ("source_etag", "min"),
                ("frame_count", "min"),
                ("frame_count", "max"),
                ("frame", "count"),
            ]
        )
        n, fc_min, fc_max = g["good_count"], g["frame_count_min"], g["frame_count_max"]
        single = pc.and_(pc.is_null(fc_max), pc.equal(n, 1))
        every_frame = pc.and_(
            pc.and_(pc.equal(fc_min, fc_max), pc.equal(pc.cast(fc_max, pa.int64()), n)),
            pc.equal(g["frame_count"], n),
        )
        keep = pc.and_(
            pc.and_(pc.equal(g["good_sum"], n), pc.equal(g["source_etag_count_distinct"], 1)),
            pc.or_(single, pc.fill_null(every_frame, False)),
        )
        g = g.filter(keep)
        return pa.table({"key": plan_keys(g["source_uri"], g["source_etag_min"]), "rows": g["good_count"]})

    def superseded(self, sources: pa.Array) -> dict[str, list[str]]:
        """Committed file -> the ``image_id`` of its rows that came from one of ``sources`` (input files)."""
        rows = self.table.filter(pc.is_in(self.table["source_uri"], value_set=sources))
        out: dict[str, list[str]] = {}
        for file, iid in zip(rows["file"].to_pylist(), rows["image_id"].to_pylist(), strict=True):
            out.setdefault(self.files[file], []).append(iid)
        return out


def plan_keys(uris: Any, etags: Any) -> Any:
    """``uri``, a NUL and ``etag`` per row: one string to compare a listed file with a committed one."""
    return pc.binary_join_element_wise(uris, pc.fill_null(etags, ""), "\0")


def read_index(output: str, store: Storage) -> Index:
    """The :class:`Index` of every committed row of ``output`` (files written before ``frame`` existed too)."""
    files = committed_files(output, store)
    tables = [_INDEX_SCHEMA.empty_table()]
    for i, f in enumerate(files):
        t = read_table(f, store, wanted=_INDEX_COLUMNS)
        n = t.num_rows
        frame = t["frame"] if "frame" in t.column_names else pa.nulls(n, pa.int32())
        count = t["frame_count"] if "frame_count" in t.column_names else pa.nulls(n, pa.int32())
        columns = {
            "image_id": t["image_id"],
            "source_uri": source_uris(t["image_uri"], frame),
            "frame": frame,
            "frame_count": count,
            "source_etag": t["source_etag"],
            "model_id": t["model_id"],
            "status": t["status"],
            "file": pa.array(np.full(n, i, np.int32)),
        }
        tables.append(pa.table(columns, schema=_INDEX_SCHEMA))
    return Index(pa.concat_tables(tables).combine_chunks(), files)


def committed_files(output: str, store: Storage) -> list[str]:
    images = storage.join(output, IMAGES_DIR)
    try:
        return [e.uri for e in store.iter_files(images, extensions=(".parquet",))]
    except FileNotFoundError:
        return []


def read_table(
    uri: str, store: Storage, columns: list[str] | None = None, *, wanted: list[str] | None = None
) -> pa.Table:
    """The Parquet file at ``uri``: ``columns`` (all by default), or those of ``wanted`` that it has."""
    fs, path = store.filesystem(uri)
    with fs.open(path, "rb") as f:
        if wanted is not None:
            names = pq.ParquetFile(f).schema_arrow.names
            columns = [c for c in wanted if c in names]
            f.seek(0)
        return pq.read_table(f, columns=columns)


ROW_GROUP_BYTES = 64 << 20  # in-memory bytes of a row group: readers fetch and decode one at a time


def write_table(uri: str, table: pa.Table, store: Storage) -> None:
    """Write ``table`` as one zstd Parquet file at ``uri``, atomically (readers never see a part of it).

    Row groups of about :data:`ROW_GROUP_BYTES`: a file of label rows is one group; a file of masks is cut
    into several, so a reader of one column or a few rows never decodes the whole file at once."""
    sink = pa.BufferOutputStream()
    per_row = table.nbytes / max(table.num_rows, 1)
    pq.write_table(
        table, sink, compression="zstd", row_group_size=max(1, int(ROW_GROUP_BYTES / max(per_row, 1)))
    )
    store.write_bytes(uri, sink.getvalue().to_pybytes())


def count_status(files: list[str], store: Storage) -> dict[str, int]:
    """Rows per ``status`` over ``files`` (reads only that column)."""
    counts: dict[str, int] = {}
    for f in files:
        for item in pc.value_counts(read_table(f, store, ["status"]).column("status")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts
