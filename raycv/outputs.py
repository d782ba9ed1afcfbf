"""Annotation outputs (SPEC §6): the Parquet schemas, and committing a run so each image has one row.

A run writes its Parquet files to ``OUTPUT/_staging/<run_id>/`` (invisible to readers of
``OUTPUT/images``), then :func:`commit` records what it will do in ``OUTPUT/_journal/<run_id>.json``,
moves the new files into ``OUTPUT/images/`` and rewrites the older files that held rows of the
re-annotated images without those rows. A journal left by a crash is finished by the next run
(:func:`recover`), and every step is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycv import storage

IMAGES_DIR = "images"
STAGING_DIR = "_staging"
JOURNAL_DIR = "_journal"
SUMMARY = "_summary.json"

TOPK_TYPE = pa.list_(pa.struct([("label", pa.int32()), ("label_name", pa.string()), ("score", pa.float32())]))

COMMON_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=False),
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
CLASS_PIXELS_TYPE = pa.list_(
    pa.struct([("label", pa.int32()), ("label_name", pa.string()), ("pixels", pa.int64())])
)
TASK_FIELDS: dict[str, list[pa.Field]] = {
    "classification": [
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("topk", TOPK_TYPE),
    ],
    "semantic_segmentation": [
        pa.field("mask_png", pa.binary()),  # PNG of the uint8 label map at the original resolution
        pa.field("class_pixels", CLASS_PIXELS_TYPE),
    ],
}


OBJECT_FIELDS = [
    pa.field("label", pa.int32()),
    pa.field("label_name", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in original-image pixels
    pa.field("mask_rle_size", pa.list_(pa.int32())),  # [h, w]; null for plain detection
    pa.field("mask_rle_counts", pa.string()),  # COCO compressed RLE; null for plain detection
]
OBJECTS_TYPE = pa.list_(pa.struct(OBJECT_FIELDS))
TASK_FIELDS["detection"] = [pa.field("objects", OBJECTS_TYPE)]  # staged only: split into OUTPUT/objects
TASK_FIELDS["instance_segmentation"] = TASK_FIELDS["detection"]
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
    return pa.schema(COMMON_FIELDS + TASK_FIELDS.get(task, []))


def image_id_of(uri: str) -> str:
    """A stable id for an image: the same URI always gives the same id, on any machine."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32]


# ------------------------------------------------------------------------------------- reading outputs


@dataclass(frozen=True)
class IndexedRow:
    fingerprint: str | None
    model_id: str | None
    status: str
    file: str


def read_index(output: str, endpoint_url: str | None = None) -> dict[str, IndexedRow]:
    """``image_id -> IndexedRow`` of every committed row (a few small columns; no image data)."""
    index: dict[str, IndexedRow] = {}
    for f in committed_files(output, endpoint_url):
        table = _read_file(f, endpoint_url, columns=["image_id", "source_etag", "model_id", "status"])
        for iid, etag, mid, status in zip(*(table.column(i).to_pylist() for i in range(4)), strict=True):
            index[iid] = IndexedRow(etag, mid, status, f)
    return index


def committed_files(output: str, endpoint_url: str | None = None) -> list[str]:
    images = storage.join(output, IMAGES_DIR)
    try:
        return [
            e.uri for e in storage.iter_files(images, extensions=(".parquet",), endpoint_url=endpoint_url)
        ]
    except FileNotFoundError:
        return []


def _read_file(uri: str, endpoint_url: str | None, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.get_filesystem(uri, endpoint_url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _write_file(uri: str, table: pa.Table, endpoint_url: str | None) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), endpoint_url)


def count_status(files: list[str], endpoint_url: str | None = None) -> dict[str, int]:
    """Rows per ``status`` over ``files`` (reads only that column)."""
    counts: dict[str, int] = {}
    for f in files:
        for item in pc.value_counts(_read_file(f, endpoint_url, ["status"]).column("status")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


# ------------------------------------------------------------------------------------------- committing


def staging_dir(output: str, run_id: str) -> str:
    return storage.join(output, STAGING_DIR, run_id)


def commit(
    output: str,
    run_id: str,
    supersede: dict[str, list[str]],
    endpoint_url: str | None = None,
) -> list[str]:
    """Make the staged files of ``run_id`` visible and drop the rows they replace.

    Args:
        supersede: committed file -> image_ids in it that this run re-annotated.

    Returns:
        The committed URIs of this run's files.
    """
    staged = [
        e.uri
        for e in storage.iter_files(
            staging_dir(output, run_id), extensions=(".parquet",), endpoint_url=endpoint_url
        )
    ]
    moves = [(s, storage.join(output, IMAGES_DIR, f"{run_id}-{i:05d}.parquet")) for i, s in enumerate(staged)]
    journal = {"run_id": run_id, "moves": moves, "supersede": supersede}
    storage.write_bytes(_journal_uri(output, run_id), json.dumps(journal).encode(), endpoint_url)
    _apply(output, journal, endpoint_url)
    return [dst for _, dst in moves]


def recover(output: str, endpoint_url: str | None = None) -> list[str]:
    """Finish the commits a crashed run left half-done; returns their run ids."""
    try:
        journals = list(
            storage.iter_files(
                storage.join(output, JOURNAL_DIR), extensions=(".json",), endpoint_url=endpoint_url
            )
        )
    except FileNotFoundError:
        return []
    done = []
    for entry in journals:
        journal = json.loads(storage.read_bytes(entry.uri, endpoint_url))
        _apply(output, journal, endpoint_url)
        done.append(journal["run_id"])
    return done


def _commit_file(output: str, src: str, dst: str, endpoint_url: str | None) -> None:
    """Move one staged file into ``images/``; a detection file is split into ``images/`` + ``objects/``.

    The objects twin is written first and has the same name: a crash between the two writes is redone
    from the staged file, which is removed last.
    """
    fs, path = storage.get_filesystem(src, endpoint_url)
    with fs.open(path, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if "objects" not in names:
        storage.move(src, dst, endpoint_url)
        return
    images, objects = split_objects(_read_file(src, endpoint_url))
    _write_file(storage.join(output, OBJECTS_DIR, posixpath.basename(dst)), objects, endpoint_url)
    _write_file(dst, images, endpoint_url)
    storage.remove(src, endpoint_url)


def _journal_uri(output: str, run_id: str) -> str:
    return storage.join(output, JOURNAL_DIR, f"{run_id}.json")


def _apply(output: str, journal: dict[str, Any], endpoint_url: str | None) -> None:
    run_id = journal["run_id"]
    for src, dst in journal["moves"]:
        if storage.exists(src, endpoint_url):
            _commit_file(output, src, dst, endpoint_url)
    for old, ids in journal["supersede"].items():
        for directory in (IMAGES_DIR, OBJECTS_DIR):  # an images file and its objects twin go together
            path = storage.join(output, directory, posixpath.basename(old))
            if not storage.exists(path, endpoint_url):
                continue  # rewritten already (or removed by a later run), or no objects twin
            table = _read_file(path, endpoint_url)
            keep = table.filter(pc.invert(pc.is_in(table.column("image_id"), pa.array(ids, pa.string()))))
            if keep.num_rows:
                stem = posixpath.splitext(posixpath.basename(old))[0].split("~")[0]
                _write_file(storage.join(output, directory, f"{stem}~{run_id}.parquet"), keep, endpoint_url)
            storage.remove(path, endpoint_url)
    storage.remove(staging_dir(output, run_id), endpoint_url, recursive=True)
    storage.remove(_journal_uri(output, run_id), endpoint_url)
