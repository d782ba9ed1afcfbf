"""``raycv similar OUTPUT``: the images nearest to one image by cosine similarity of their ``embedding``.

An output of the ``embedding`` task holds one L2-normalised vector per ``ok`` row in
``OUTPUT/images`` (``embedding``: fixed_size_list<float32, D>, null on error rows). :func:`nearest`
finds the query's vector, then streams the committed files in record batches of three columns and keeps a
running top k: memory is bounded by the batch size, time is linear in the rows. For larger archives or many
queries, an approximate index over the same column (FAISS, LanceDB) answers in sub-linear time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from raycv import storage
from raycv.errors import ConfigError
from raycv.outputs import schema as outputs
from raycv.outputs.read import images_files
from raycv.storage import Storage

EMBEDDING = "embedding"
BATCH_ROWS = 8192  # rows per record batch: 8192 x D=2048 float32 is 64 MiB


@dataclass(frozen=True)
class Neighbour:
    """One image near the query: its id, its URI, and the cosine similarity in [-1, 1]."""

    image_id: str
    image_uri: str
    score: float


def nearest(
    output: str,
    store: Storage,
    *,
    image_id: str | None = None,
    image_uri: str | None = None,
    k: int = 10,
    batch_rows: int = BATCH_ROWS,
) -> list[Neighbour]:
    """The ``k`` images of ``output`` whose embeddings are nearest to the query's, most similar first.

    The query is the row with ``image_id``, or with ``image_uri`` (a local path or ``file://`` URI in any
    spelling, canonicalised as the annotate pipeline stores it). It is never its own neighbour; rows
    without an embedding (errors) are skipped. Memory holds one record batch (``batch_rows`` x D float32,
    plus the Parquet row group being decoded) and the running top k, whatever the number of rows.

    Args:
        output: the annotation output (local folder, ``file://`` or ``s3://`` URI).
        store: the storage handle.
        image_id: the query's ``image_id``; or
        image_uri: the query's ``image_uri``.
        k: how many neighbours (fewer when the output holds fewer other embeddings).
        batch_rows: rows per record batch read at a time.

    Raises:
        ConfigError: ``k`` < 1, not exactly one of ``image_id``/``image_uri``, an output without an
            ``embedding`` column, or a query that is not in the output or has no embedding.
        FileNotFoundError: ``output`` holds no committed rows.
    """
    if k < 1:
        raise ConfigError("k", k, "Ask for at least one neighbour (k >= 1).")
    if (image_id is None) == (image_uri is None):
        raise ConfigError("image_id/image_uri", (image_id, image_uri), "Give exactly one of them.")
    dataset = _embeddings(output, store)
    column, value = ("image_id", image_id) if image_id is not None else ("image_uri", image_uri)
    if column == "image_uri":
        value = storage.canonical_uri(str(value))
    try:
        qid, query = _query(dataset, output, column, str(value))
        return _top_k(_batches(dataset, batch_rows, exclude=qid), query, k)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ConfigError(
            "OUTPUT",
            output,
            f"Its files disagree on the `embedding` column ({exc}); every file must hold "
            f"{dataset.schema.field(EMBEDDING).type} (one model): re-annotate into a new output.",
        ) from exc


def _embeddings(output: str, store: Storage) -> ds.Dataset:
    """The committed ``images`` files as one dataset of ``image_id``, ``image_uri`` and ``embedding``
    (null in a file without the column), the type taken from the first file that has it."""
    files = images_files(output, store)
    fs, _ = store.pyarrow_filesystem(files[0])
    paths = [store.pyarrow_filesystem(f)[1] for f in files]
    kind = None
    for path in paths:  # normally the first: an embedding output has the column in every file
        with fs.open_input_file(path) as f:
            found = pq.ParquetFile(f).schema_arrow
        if EMBEDDING in found.names:
            kind = found.field(EMBEDDING).type
            break
    if kind is None:
        raise ConfigError(
            "OUTPUT",
            output,
            "It has no `embedding` column: annotate the images with `task: embedding` first "
            "(any classifier's pooled features), then ask for similar images in that output.",
        )
    if not (pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)):
        raise ConfigError(
            "OUTPUT", output, f"Its `embedding` column is {kind}; expected fixed_size_list<float32, D>."
        )
    schema = pa.schema([("image_id", pa.string()), ("image_uri", pa.string()), (EMBEDDING, kind)])
    return ds.dataset(paths, schema=schema, format="parquet", filesystem=fs)


def _query(dataset: ds.Dataset, output: str, column: str, value: str) -> tuple[str, np.ndarray]:
    """(image_id, unit vector [D]) of the row whose ``column`` is ``value``."""
    rows = dataset.to_table(filter=pc.field(column) == value)  # pushed down: reads only matching rows
    if rows.num_rows == 0:
        where = storage.join(output, outputs.IMAGES_DIR)
        raise ConfigError(
            column, value, f"No row of {where} has this {column}; `raycv inspect {output}` shows the output."
        )
    valid = rows.filter(pc.is_valid(rows[EMBEDDING]))
    if valid.num_rows == 0:
        raise ConfigError(
            column,
            value,
            "This image has no embedding (its annotation failed, or came from another task); pick another.",
        )
    vectors = _unit(_matrix(valid[EMBEDDING].combine_chunks()))
    return str(valid["image_id"][0].as_py()), vectors[0]


def _batches(dataset: ds.Dataset, batch_rows: int, *, exclude: str) -> Iterator[pa.RecordBatch]:
    """The rows with an embedding, other than ``exclude``, ``batch_rows`` at a time."""
    keep = pc.is_valid(pc.field(EMBEDDING)) & (pc.field("image_id") != exclude)
    # Little read-ahead: memory stays a few batches and row groups, not a whole file set in flight.
    yield from dataset.to_batches(filter=keep, batch_size=batch_rows, batch_readahead=1, fragment_readahead=1)


def _matrix(embedding: Any) -> np.ndarray:
    """A fixed_size_list array without nulls -> [N, D] float32."""
    d = embedding.type.list_size
    return np.asarray(embedding.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, d)


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (the output should hold them so; this guards against drift); zero rows
    stay zero and score 0."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _top_k(batches: Iterator[pa.RecordBatch], query: np.ndarray, k: int) -> list[Neighbour]:
    """The ``k`` best rows of ``batches`` by dot product with ``query``, merged batch by batch."""
    scores = np.empty(0, np.float32)
    ids: np.ndarray = np.empty(0, object)
    uris: np.ndarray = np.empty(0, object)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        s = _unit(_matrix(batch.column(EMBEDDING))) @ query
        s = np.where(np.isfinite(s), s, -np.inf)  # a NaN inside a vector ranks last
        best = np.argpartition(-s, k - 1)[:k] if len(s) > k else np.arange(len(s))
        scores = np.concatenate([scores, s[best]])
        ids = np.concatenate([ids, np.asarray(batch.column("image_id").take(best).to_pylist(), object)])
        uris = np.concatenate([uris, np.asarray(batch.column("image_uri").take(best).to_pylist(), object)])
        if len(scores) > k:
            keep = np.argpartition(-scores, k - 1)[:k]
            scores, ids, uris = scores[keep], ids[keep], uris[keep]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], ids[i]))  # ties by id: a stable answer
    return [Neighbour(str(ids[i]), str(uris[i]), float(scores[i])) for i in order]


def print_neighbours(neighbours: list[Neighbour], *, as_json: bool = False) -> None:
    """Print ``neighbours`` as a table (rank, score, image_id, image_uri), or as a JSON list."""
    if as_json:
        print(json.dumps([asdict(n) for n in neighbours], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("image_id", no_wrap=True, min_width=32)  # whole, to copy into `--id`
    table.add_column("image_uri", overflow="fold")  # a narrow terminal wraps it; --json never does
    for rank, n in enumerate(neighbours, 1):
        table.add_row(str(rank), f"{n.score:.4f}", n.image_id, n.image_uri)
    Console().print(table)
