"""Committing an annotation run (SPEC §6): staged files become visible so each image has one row.

A run writes its Parquet files to ``OUTPUT/_staging/<run_id>/`` (invisible to readers of
``OUTPUT/images``), then :func:`commit` records what it will do in ``OUTPUT/_journal/<run_id>.json``,
moves the new files into ``OUTPUT/images/`` and rewrites the older files that held rows of the
re-annotated input files without those rows. A journal left by a crash is finished by the next run
(:func:`recover`), and every step is idempotent. The schemas, the layout of ``OUTPUT`` and the index of
committed rows are in :mod:`raycv.outputs.schema`.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycv import storage
from raycv.outputs.schema import (
    IMAGES_DIR,
    JOURNAL_DIR,
    OBJECTS_DIR,
    STAGING_DIR,
    read_table,
    source_uris,
    split_objects,
    write_table,
)


def staging_dir(output: str, run_id: str) -> str:
    return storage.join(output, STAGING_DIR, run_id)


def staged_sources(output: str, run_id: str, endpoint_url: str | None = None) -> pa.Array:
    """The distinct input files that the staged rows of ``run_id`` came from."""
    parts = []
    for e in storage.iter_files(
        staging_dir(output, run_id), extensions=(".parquet",), endpoint_url=endpoint_url
    ):
        t = read_table(e.uri, endpoint_url, columns=["image_uri", "frame"])
        parts.append(source_uris(t["image_uri"], t["frame"]))
    if not parts:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array([c for p in parts for c in pa.chunked_array(p).chunks], pa.string()))


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
    try:
        staged = [
            e.uri
            for e in storage.iter_files(
                staging_dir(output, run_id), extensions=(".parquet",), endpoint_url=endpoint_url
            )
        ]
    except FileNotFoundError:  # the run wrote nothing
        staged = []
    moves = [(s, storage.join(output, IMAGES_DIR, f"{run_id}-{i:05d}.parquet")) for i, s in enumerate(staged)]
    journal = {"run_id": run_id, "moves": moves, "supersede": supersede}
    storage.write_bytes(_journal_uri(output, run_id), json.dumps(journal).encode(), endpoint_url)
    _apply(output, journal, endpoint_url)
    return [dst for _, dst in moves]


def recover(output: str, endpoint_url: str | None = None) -> list[str]:
    """Finish the commits a crashed run left half-done, and drop what runs killed before committing staged.

    Runs on one output are sequential, so a staging folder without a journal belongs to a run that died
    before its commit: its rows were never visible and are annotated again. Returns the finished run ids.
    """
    try:
        journals = list(
            storage.iter_files(
                storage.join(output, JOURNAL_DIR), extensions=(".json",), endpoint_url=endpoint_url
            )
        )
    except FileNotFoundError:
        journals = []
    done = []
    for entry in journals:
        journal = json.loads(storage.read_bytes(entry.uri, endpoint_url))
        _apply(output, journal, endpoint_url)
        done.append(journal["run_id"])
    try:
        abandoned = storage.list_dirs(storage.join(output, STAGING_DIR), endpoint_url)
    except FileNotFoundError:
        abandoned = []
    for run_id in abandoned:
        storage.remove(staging_dir(output, run_id), endpoint_url, recursive=True)
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
    images, objects = split_objects(read_table(src, endpoint_url))
    write_table(storage.join(output, OBJECTS_DIR, posixpath.basename(dst)), objects, endpoint_url)
    write_table(dst, images, endpoint_url)
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
            table = read_table(path, endpoint_url)
            keep = table.filter(pc.invert(pc.is_in(table.column("image_id"), pa.array(ids, pa.string()))))
            if keep.num_rows:
                stem = posixpath.splitext(posixpath.basename(old))[0].split("~")[0]
                write_table(storage.join(output, directory, f"{stem}~{run_id}.parquet"), keep, endpoint_url)
            storage.remove(path, endpoint_url)
    storage.remove(staging_dir(output, run_id), endpoint_url, recursive=True)
    storage.remove(_journal_uri(output, run_id), endpoint_url)
