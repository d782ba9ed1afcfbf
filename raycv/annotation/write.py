"""The write side of an annotation run: one small Ray task per result block, and the tally of their statuses.

Kept apart from :mod:`raycv.annotation.pipeline` (which imports the model code) so that the write tasks' Ray
workers import pyarrow and raycv's storage only, not torch: a worker importing torch and torchvision costs
~4 CPU-seconds to start and ~300 MB more resident memory, for every write worker alive at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from raycv import storage
from raycv.outputs import schema as outputs
from raycv.storage import Storage

log = logging.getLogger(__name__)
WRITE_CPUS = 0.25
ROWS_PER_FILE = 8192  # annotate rows_per_file: rows of one output Parquet file
MAX_FILE_BYTES = 128 << 20  # in-memory bytes of one file's blocks (rows with masks fill a file sooner)
MIN_IMAGES_FOR_ERROR_CHECK = 32  # max_error_fraction is only judged after this many images


@dataclass
class Tally:
    """Status counts of the rows written so far, and the first few errors (for the stop message)."""

    ok: int = 0
    error: int = 0
    first_errors: list[str] = field(default_factory=list)
    first_rows_at: float | None = None  # time.time() when the first rows were written

    def add(self, written: dict[str, Any]) -> None:
        if self.first_rows_at is None and written["ok"] + written["error"]:
            self.first_rows_at = time.time()
        self.ok += written["ok"]
        self.error += written["error"]
        self.first_errors.extend(written["errors"][: 3 - len(self.first_errors)])

    def exceeds(self, max_error_fraction: float) -> bool:
        n = self.ok + self.error
        return n >= MIN_IMAGES_FOR_ERROR_CHECK and self.error / n > max_error_fraction


@ray.remote(num_cpus=WRITE_CPUS)
def write_block(uri: str, store: Storage, *blocks: Any) -> dict[str, Any]:
    """Write result blocks as one Parquet file (atomically); return its status counts and first errors."""
    tables = [_arrow(b) for b in blocks]
    table = pa.concat_tables([t for t in tables if t.num_rows] or tables[:1])
    if table.num_rows:
        outputs.write_table(uri, table, store)
    failed = table.filter(pc.equal(table["status"], "error")) if table.num_rows else table
    errors = [
        f"{r['image_uri']}: {r['error_stage']} {r['error_type']}: {(r['error_message'] or '')[:300]}"
        for r in failed.slice(0, 3)
        .select(["image_uri", "error_stage", "error_type", "error_message"])
        .to_pylist()
    ]
    return {"ok": table.num_rows - failed.num_rows, "error": failed.num_rows, "errors": errors}


def _arrow(block: Any) -> pa.Table:
    """A result block as an Arrow table. The annotators return Arrow tables, which Ray Data stores as they are;
    ``ray.data`` (~0.4 s to import in a fresh write worker) is only imported for another block type."""
    if isinstance(block, pa.Table):
        return block
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_arrow()


def drain(pending: list[Any], tally: Tally, keep: int) -> list[Any]:
    """Add the finished writes to ``tally``, waiting until at most ``keep`` are still running."""
    while len(pending) > keep:
        done, pending = ray.wait(pending, num_returns=1)
        tally.add(ray.get(done[0]))
    if pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        for ref in done:
            tally.add(ray.get(ref))
    return pending


def write_blocks(
    blocks: Iterable[tuple[Any, int | None, int | None]],
    staging: str,
    store: Storage,
    max_error_fraction: float,
    in_flight: int,
    rows_per_file: int = ROWS_PER_FILE,
    tally: Tally | None = None,
) -> Tally:
    """Write ``blocks`` (``(ref, rows, bytes)`` of each result block) to ``staging`` as ``part-<n>.parquet``
    files of about ``rows_per_file`` rows (fewer when the blocks pass :data:`MAX_FILE_BYTES`, e.g. masks);
    stop taking blocks once the finished writes exceed ``max_error_fraction`` (the blocks taken are
    written, the writes started awaited: only whole files).

    One file per actor batch would leave an archive of a million images in ~30,000 files of 32 rows: as
    many requests to list, read and move at every commit and incremental run. The first files are small
    and double in size up to ``rows_per_file`` (32, 64, 128, ... rows), so that ``max_error_fraction`` is
    judged after the first few dozen images, not after the first full file. At most ``in_flight`` writes
    run at once, which also holds the pipeline back when storage is slow.
    """
    tally = Tally() if tally is None else tally  # the caller's: its progress record reads it live
    pending: list[Any] = []
    group: list[Any] = []
    rows = size = files = 0

    def flush() -> None:
        nonlocal group, rows, size, files, pending
        uri = storage.join(staging, f"part-{files:06d}.parquet")
        pending.append(write_block.remote(uri, store, *group))
        group, rows, size, files = [], 0, 0, files + 1
        pending = drain(pending, tally, keep=in_flight)

    for ref, num_rows, size_bytes in blocks:
        group.append(ref)
        rows, size = rows + (num_rows or 0), size + (size_bytes or 0)
        if rows >= min(rows_per_file, MIN_IMAGES_FOR_ERROR_CHECK << min(files, 30)) or size >= MAX_FILE_BYTES:
            flush()
        else:
            pending = drain(pending, tally, keep=in_flight)
        if tally.exceeds(max_error_fraction):
            log.warning("stopping: %d of %d images failed", tally.error, tally.ok + tally.error)
            break
    if group:
        flush()
    drain(pending, tally, keep=0)
    return tally
