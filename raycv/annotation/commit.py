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
from raycv.storage import Storage


def staging_dir(output: str, run_id: str) -> str:
    return storage.join(output, STAGING_DIR, run_id)


def staged_sources(output: str, run_id: str, store: Storage) -> pa.Array:
    """The distinct input files that the staged rows of ``run_id`` came from."""
    parts = []
    for e in store.iter_files(staging_dir(output, run_id), extensions=(".parquet",)):
        t = read_table(e.uri, store, columns=["image_uri", "frame"])
        parts.append(source_uris(t["image_uri"], t["frame"]))
    if not parts:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array([c for p in parts for c in pa.chunked_array(p).chunks], pa.string()))


def commit(
    output: str,
    run_id: str,
    supersede: dict[str, list[str]],
    store: Storage,
) -> list[str]:
    """Make the staged files of ``run_id`` visible and drop the rows they replace.

    Args:
        supersede: committed file -> image_ids in it that this run re-annotated.

    Returns:
        The committed URIs of this run's files.
    """
    try:
        staged = [e.uri for e in store.iter_files(staging_dir(output, run_id), extensions=(".parquet",))]
    except FileNotFoundError:  # the run wrote nothing
        staged = []
    moves = [(s, storage.join(output, IMAGES_DIR, f"{run_id}-{i:05d}.parquet")) for i, s in enumerate(staged)]
    journal = {"run_id": run_id, "moves": moves, "supersede": supersede}
    store.write_bytes(_journal_uri(output, run_id), json.dumps(journal).encode())
    _apply(output, journal, store)
    return [dst for _, dst in moves]


def recover(output: str, store: Storage) -> list[str]:
    """Finish the commits a crashed run left half-done, and drop what runs killed before committing staged.

    Runs on one output are sequential (the lease, :mod:`raycv.annotation.lease`, is taken before this
    runs), so a staging folder without a journal belongs to a run that died
    before its commit: its rows were never visible and are annotated again. Returns the finished run ids.
    """
    try:
        journals = list(store.iter_files(storage.join(output, JOURNAL_DIR), extensions=(".json",)))
    except FileNotFoundError:
        journals = []
    done = []
    for entry in journals:
        journal = json.loads(store.read_bytes(entry.uri))
        _apply(output, journal, store)
        done.append(journal["run_id"])
    try:
        abandoned = store.list_dirs(storage.join(output, STAGING_DIR))
    except FileNotFoundError:
        abandoned = []
    for run_id in abandoned:
        store.remove(staging_dir(output, run_id), recursive=True)
    return done


def _commit_file(output: str, src: str, dst: str, store: Storage) -> None:
    """Move one staged file into ``images/``; a detection file is split into ``images/`` + ``objects/``.

    The objects twin is written first and has the same name: a crash between the two writes is redone
    from the staged file, which is removed last.
    """
    fs, path = store.filesystem(src)
    with fs.open(path, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if "objects" not in names:
        store.move(src, dst)
        return
    images, objects = split_objects(read_table(src, store))
    write_table(storage.join(output, OBJECTS_DIR, posixpath.basename(dst)), objects, store)
    write_table(dst, images, store)
    store.remove(src)


def _journal_uri(output: str, run_id: str) -> str:
    return storage.join(output, JOURNAL_DIR, f"{run_id}.json")


def _apply(output: str, journal: dict[str, Any], store: Storage) -> None:
    run_id = journal["run_id"]
    for src, dst in journal["moves"]:
        if store.exists(src):
            _commit_file(output, src, dst, store)
    for old, ids in journal["supersede"].items():
        for directory in (IMAGES_DIR, OBJECTS_DIR):  # an images file and its objects twin go together
            path = storage.join(output, directory, posixpath.basename(old))
            if not store.exists(path):
                continue  # rewritten already (or removed by a later run), or no objects twin
            table = read_table(path, store)
            keep = table.filter(pc.invert(pc.is_in(table.column("image_id"), pa.array(ids, pa.string()))))
            if keep.num_rows:
                stem = posixpath.splitext(posixpath.basename(old))[0].split("~")[0]
                write_table(storage.join(output, directory, f"{stem}~{run_id}.parquet"), keep, store)
            store.remove(path)
    store.remove(staging_dir(output, run_id), recursive=True)
    store.remove(_journal_uri(output, run_id))
