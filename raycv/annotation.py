"""Bulk annotation with Ray Data: plan inputs -> read + decode (CPU tasks) -> model actors -> Parquet.

The plan (URIs and fingerprints) is listed page by page into Arrow chunks. Rows stream from the actors
to small write tasks, one Parquet file per block; the driver only handles references to the blocks and
each write's status counts, never the rows, so its memory does not grow with the archive, and it can stop
the run early when too many images fail (``max_error_fraction``). Every failure of one image (read,
decode, model, write) becomes an error row instead of failing the run. A multi-frame DICOM or a NIfTI
volume is expanded in the read stage into one row per frame or slice (``image_uri`` = ``<file>#frame=<k>``).
See :mod:`raycv.outputs` for how a run is committed.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch

from raycv import outputs, runs, storage
from raycv.annotators import Classifier, Detector, Segmenter, error_fields
from raycv.config import AnnotateConfig
from raycv.data import geotiff, medical
from raycv.data.formats import IMAGE_EXTENSIONS
from raycv.data.images import decode_image, encode_png
from raycv.data.transforms import to_tensor_resized
from raycv.errors import ConfigError, DecodeError, TooManyErrorsError

log = logging.getLogger(__name__)
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
INPUT_EXTENSIONS = tuple(
    dict.fromkeys(IMAGE_EXTENSIONS + medical.DICOM_EXTENSIONS + medical.NIFTI_EXTENSIONS)
)
ROWS_PER_BLOCK = 64
PLAN_CHUNK_ROWS = 8192  # listed files per Arrow chunk of the plan
FILES_PER_READ = 8  # files fetched and decoded together: bounds a read task's memory when files are volumes
DECODE_CPUS = 0.5
WRITE_CPUS = 0.25
MIN_IMAGES_FOR_ERROR_CHECK = 32  # max_error_fraction is only judged after this many images
PLAN_SCHEMA = pa.schema([("image_id", pa.string()), ("image_uri", pa.string()), ("source_etag", pa.string())])


@dataclass
class AnnotateSummary:
    """``OUTPUT/_summary.json``. Counts are of images (rows: a multi-frame file counts once per frame).

    ``total`` = ``ok`` + ``error`` (written by this run) + ``skipped`` (committed rows of unchanged files,
    ``incremental``), plus, for a run stopped by ``max_error_fraction``, one per input file not reached.
    ``files`` counts the input files, ``stopped`` says whether the run stopped early.
    """

    total: int
    ok: int
    error: int
    skipped: int
    images_per_s: float
    duration_s: float
    run_id: str
    model_id: str
    output: str
    recovered: list[str]
    files: int = 0
    stopped: bool = False


# ------------------------------------------------------------------------------------------ planning


def _manifest_uris(uri: str, endpoint_url: str | None) -> list[str]:
    data = storage.read_bytes(uri, endpoint_url)
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


def _fingerprints(uris: list[str], endpoint_url: str | None) -> Iterator[tuple[str, str | None]]:
    def one(uri: str) -> tuple[str, str | None]:
        try:
            return uri, next(storage.iter_files(uri, endpoint_url=endpoint_url)).fingerprint
        except (FileNotFoundError, StopIteration, OSError):
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

    def blocks(self, actors: int) -> list[pa.Table]:
        """Zero-copy slices for Ray Data: up to ROWS_PER_BLOCK rows each, and at least two per actor."""
        rows = max(1, min(ROWS_PER_BLOCK, -(-len(self) // (2 * actors))))
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


def plan_inputs(
    source: str | list[str], endpoint_url: str | None = None, *, chunk_rows: int = PLAN_CHUNK_ROWS
) -> Plan:
    """Every input file with its fingerprint, in a stable order, de-duplicated, as a :class:`Plan`.

    ``source`` is a prefix (all image, DICOM and NIfTI files below it), a glob, a manifest (``.txt`` one
    URI per line, ``.csv``/``.parquet`` with an ``image_uri`` column) or a list of URIs. A prefix is
    streamed from the listing into Arrow chunks of ``chunk_rows``, so the driver never holds the listing
    as Python objects; a listing has no duplicates, lists and manifests are de-duplicated in Arrow.
    """
    if isinstance(source, list) or (source.lower().endswith(MANIFEST_EXTENSIONS) and "*" not in source):
        uris = source if isinstance(source, list) else _manifest_uris(source, endpoint_url)
        unique = pc.unique(pa.array(uris, pa.string())).to_pylist()  # keeps the order of first appearance
        return Plan(list(_chunked(_fingerprints(unique, endpoint_url), chunk_rows)))
    listing = storage.iter_files(source, extensions=INPUT_EXTENSIONS, endpoint_url=endpoint_url)
    try:
        return Plan(list(_chunked(((e.uri, e.fingerprint) for e in listing), chunk_rows)))
    except FileNotFoundError:
        raise ConfigError(
            "input", source, "Nothing there: give an existing prefix, glob, list or manifest."
        ) from None


def _skip_current(plan: Plan, current: pa.Table) -> int:
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


# ------------------------------------------------------------------------------------------ pipeline


def _fetch_all(uris: list[str], endpoint_url: str | None, fetch: Any) -> list[Any]:
    with ThreadPoolExecutor(max_workers=FILES_PER_READ) as pool:  # object storage is latency-bound
        return list(pool.map(fetch, uris))


_OK: tuple[str, str, str] = ("", "", "")


def decode_file(data: bytes, uri: str, *, max_pixels: int) -> list[np.ndarray]:
    """Every image a file holds: the frames of a DICOM, the slices of a NIfTI volume, else its one image.

    DICOM is recognised by its extension or its ``DICM`` marker, NIfTI by ``.nii``/``.nii.gz``.

    Returns:
        [H, W, 3] uint8 RGB arrays as displayed (:mod:`raycv.data.medical`, :func:`decode_image`).

    Raises:
        DecodeError: unreadable, a compressed syntax without a decoder, or a frame over ``max_pixels``.
    """
    if medical.is_dicom(uri) or medical.looks_like_dicom(data):
        info = medical.dicom_info(data, uri)  # the header only: refuse a pixel bomb before decoding it
        _check_pixels(uri, info["rows"] or 0, info["columns"] or 0, max_pixels)
        return medical.dicom_frames(data, uri)
    if medical.is_nifti(uri):
        slices = medical.nifti_slices(data, uri)
        if slices:
            _check_pixels(uri, slices[0].shape[0], slices[0].shape[1], max_pixels)
        return slices
    return [decode_image(data, uri, max_pixels=max_pixels)]


def _check_pixels(uri: str, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise DecodeError(
            uri,
            f"each frame is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
            "raise max_pixels",
        )


def _expanded(
    batch: dict[str, np.ndarray], results: list[list[Any]], errors: list[list[tuple[str, str, str]]]
) -> dict[str, np.ndarray]:
    """The plan columns with one row per image of each file, ``frame``/``frame_count`` (-1 for single
    images) and the error columns; a file giving several images gets ``<uri>#frame=<k>`` rows."""
    cols: dict[str, list[Any]] = {
        k: [] for k in ("image_id", "image_uri", "source_etag", "frame", "frame_count")
    }
    for i, images in enumerate(results):
        uri = str(batch["image_uri"][i])
        etag = str(batch["source_etag"][i]) if "source_etag" in batch else ""
        many = len(images) > 1
        for k in range(len(images)):
            image_uri = outputs.frame_uri(uri, k) if many else uri
            cols["image_id"].append(outputs.image_id_of(image_uri) if many else str(batch["image_id"][i]))
            cols["image_uri"].append(image_uri)
            cols["source_etag"].append(etag)
            cols["frame"].append(k if many else -1)
            cols["frame_count"].append(len(images) if many else -1)
    out: dict[str, np.ndarray] = {k: np.array(v, dtype=object) for k, v in cols.items() if k[:5] != "frame"}
    out["frame"] = np.array(cols["frame"], np.int32)
    out["frame_count"] = np.array(cols["frame_count"], np.int32)
    flat = [e for per_file in errors for e in per_file]
    for j, col in enumerate(("error_stage", "error_type", "error_message")):
        out[col] = np.array([e[j] for e in flat], dtype=object)
    return out


def read_decode_batch(
    batch: dict[str, np.ndarray], *, size_hw: tuple[int, int], endpoint_url: str | None, max_pixels: int
) -> dict[str, np.ndarray]:
    """Fetch and decode a batch of files into fixed-size uint8 pixels, catching each file's failure.

    Returns one row per image (a multi-frame DICOM or NIfTI volume gives one per frame or slice, see
    :func:`_expanded`) with ``pixels`` [N, h, w, 3] uint8 (zeros for failed files), ``width`` and
    ``height`` (original, -1 when unknown) and ``error_stage/error_type/error_message`` ("" when fine).
    """
    blank = np.zeros((*size_hw, 3), np.uint8)

    def one(uri: str) -> list[tuple[np.ndarray, int, int, tuple[str, str, str]]]:
        try:
            data = storage.read_bytes(uri, endpoint_url)
        except Exception as exc:
            return [(blank, -1, -1, error_fields("read", exc))]
        try:
            images = decode_file(data, uri, max_pixels=max_pixels)
        except Exception as exc:
            return [(blank, -1, -1, error_fields("decode", exc))]
        out = []
        for image in images:
            resized = to_tensor_resized(image, size_hw).mul_(255.0).round_().to(torch.uint8)
            out.append((resized.permute(1, 2, 0).numpy(), image.shape[1], image.shape[0], _OK))
        return out

    results = _fetch_all([str(u) for u in batch["image_uri"]], endpoint_url, one)
    out = _expanded(batch, results, [[r[3] for r in per_file] for per_file in results])
    flat = [r for per_file in results for r in per_file]
    out["pixels"] = np.stack([r[0] for r in flat]) if flat else np.zeros((0, *size_hw, 3), np.uint8)
    out["width"] = np.array([r[1] for r in flat], np.int32)
    out["height"] = np.array([r[2] for r in flat], np.int32)
    return out


def read_bytes_batch(
    batch: dict[str, np.ndarray], *, endpoint_url: str | None, skip_geotiff: bool = False, max_pixels: int
) -> dict[str, np.ndarray]:
    """Fetch the encoded bytes of a batch (GeoTIFFs are left to the actor's windowed reads).

    Shipping encoded bytes rather than decoded pixels keeps object-store traffic ~10x smaller; the model
    actor decodes at the original resolution, which segmentation needs anyway. DICOM and NIfTI files are
    decoded here instead, and each frame or slice ships as a lossless PNG of its displayed pixels (one row
    each, see :func:`_expanded`), so the actors only ever decode ordinary images.
    """

    def one(uri: str) -> list[tuple[bytes, tuple[str, str, str]]]:
        if skip_geotiff and geotiff.is_geotiff(uri):
            return [(b"", _OK)]
        try:
            data = storage.read_bytes(uri, endpoint_url)
        except Exception as exc:
            return [(b"", error_fields("read", exc))]
        if not (medical.is_dicom(uri) or medical.is_nifti(uri) or medical.looks_like_dicom(data)):
            return [(data, _OK)]
        try:
            return [(encode_png(image), _OK) for image in decode_file(data, uri, max_pixels=max_pixels)]
        except Exception as exc:
            return [(b"", error_fields("decode", exc))]

    results = _fetch_all([str(u) for u in batch["image_uri"]], endpoint_url, one)
    out = _expanded(batch, results, [[r[1] for r in per_file] for per_file in results])
    out["data"] = np.array([r[0] for per_file in results for r in per_file], dtype=object)
    return out


def _read_stage(
    batch: dict[str, np.ndarray], *, read: Callable[..., dict[str, np.ndarray]], **kwargs: Any
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``read`` on FILES_PER_READ files at a time and yield each result, so that a batch of volumes
    (hundreds of frames each) never sits decoded in one task's memory; Ray Data rebuilds the blocks."""
    for start in range(0, len(batch["image_uri"]), FILES_PER_READ):
        yield read({k: v[start : start + FILES_PER_READ] for k, v in batch.items()}, **kwargs)


def _stages(
    cfg: AnnotateConfig, card: dict[str, Any], run_id: str
) -> tuple[Any, dict[str, Any], type, dict[str, Any]]:
    """(read function, its kwargs, annotator class, its constructor kwargs) for the run's task."""
    ep = cfg.storage.endpoint_url
    common = {
        "run_dir": cfg.model,
        "endpoint_url": ep,
        "run_id": run_id,
        "threads": int(cfg.cpus_per_actor),
        "use_gpu": cfg.gpus_per_actor > 0,
    }
    if card["task"] == "classification":
        size = card["image_size"]
        size_hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        read_kw = {"size_hw": size_hw, "endpoint_url": ep, "max_pixels": cfg.max_pixels}
        return read_decode_batch, read_kw, Classifier, {**common, "topk": cfg.topk, "explain": cfg.explain}
    if card["task"] == "semantic_segmentation":
        tile = cfg.tile.model_dump() if cfg.tile else None
        seg_kw = {
            **common,
            "output": cfg.output,
            "tile": tile,
            "geo": cfg.geo.model_dump(),
            "batch_size": cfg.batch_size,
            "max_pixels": cfg.max_pixels,
        }
        read_kw = {"endpoint_url": ep, "skip_geotiff": True, "max_pixels": cfg.max_pixels}
        return read_bytes_batch, read_kw, Segmenter, seg_kw
    if card["task"] in ("detection", "instance_segmentation"):
        det_kw = {
            **common,
            "score_threshold": cfg.score_threshold,
            "iou_threshold": cfg.iou_threshold,
            "batch_size": cfg.batch_size,
            "max_pixels": cfg.max_pixels,
            "tile": cfg.tile.model_dump() if cfg.tile else None,
        }
        return read_bytes_batch, {"endpoint_url": ep, "max_pixels": cfg.max_pixels}, Detector, det_kw
    raise ConfigError("model", cfg.model, f"This run's task '{card['task']}' cannot be annotated yet.")


@dataclass
class _Tally:
    """Status counts of the rows written so far, and the first few errors (for the stop message)."""

    ok: int = 0
    error: int = 0
    first_errors: list[str] = field(default_factory=list)

    def add(self, written: dict[str, Any]) -> None:
        self.ok += written["ok"]
        self.error += written["error"]
        self.first_errors.extend(written["errors"][: 3 - len(self.first_errors)])

    def exceeds(self, max_error_fraction: float) -> bool:
        n = self.ok + self.error
        return n >= MIN_IMAGES_FOR_ERROR_CHECK and self.error / n > max_error_fraction


@ray.remote(num_cpus=WRITE_CPUS)
def _write_block(block: Any, uri: str, endpoint_url: str | None) -> dict[str, Any]:
    """Write one block of result rows as one Parquet file (atomically); return its status counts."""
    from ray.data.block import BlockAccessor

    table = BlockAccessor.for_block(block).to_arrow()
    if table.num_rows:
        outputs.write_table(uri, table, endpoint_url)
    failed = table.filter(pc.equal(table["status"], "error")) if table.num_rows else table
    errors = [
        f"{r['image_uri']}: {r['error_stage']} {r['error_type']}: {(r['error_message'] or '')[:300]}"
        for r in failed.slice(0, 3)
        .select(["image_uri", "error_stage", "error_type", "error_message"])
        .to_pylist()
    ]
    return {"ok": table.num_rows - failed.num_rows, "error": failed.num_rows, "errors": errors}


def _drain(pending: list[Any], tally: _Tally, keep: int) -> list[Any]:
    """Add the finished writes to ``tally``, waiting until at most ``keep`` are still running."""
    while len(pending) > keep:
        done, pending = ray.wait(pending, num_returns=1)
        tally.add(ray.get(done[0]))
    if pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        for ref in done:
            tally.add(ray.get(ref))
    return pending


def _run_pipeline(cfg: AnnotateConfig, todo: Plan, card: dict[str, Any], run_id: str) -> _Tally:
    """Run the pipeline over ``todo`` into the run's staging folder; stop early past ``max_error_fraction``.

    The driver iterates over references to the actors' output blocks (never their rows) and hands each to
    a write task; the tasks' status counts tell it how many images failed so far. Leaving the iteration
    shuts Ray Data's executor down (its actors included); the writes already started are awaited, so the
    staging folder holds only whole files.
    """
    read_fn, read_kw, annotator, annotator_kw = _stages(cfg, card, run_id)
    ds: ray.data.Dataset = ray.data.from_arrow(todo.blocks(cfg.actors))
    ds = ds.map_batches(
        _read_stage,  # type: ignore[arg-type]  # a generator taking keyword arguments (fn_kwargs)
        batch_size=ROWS_PER_BLOCK,
        num_cpus=DECODE_CPUS,
        batch_format="numpy",
        fn_kwargs={"read": read_fn, **read_kw},
    )
    ds = ds.map_batches(
        annotator,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
        fn_constructor_kwargs=annotator_kw,
    )
    staging = outputs.staging_dir(cfg.output, run_id)
    bundles = ds.iter_internal_ref_bundles()
    refs = (ref for bundle in bundles for ref in bundle.block_refs)
    try:
        in_flight = 2 * cfg.actors + 2
        return _write_blocks(refs, staging, cfg.storage.endpoint_url, cfg.max_error_fraction, in_flight)
    finally:
        del refs, bundles  # the last references: the executor shuts down, releasing its actors' CPUs/GPUs


def _write_blocks(
    refs: Iterator[Any], staging: str, endpoint_url: str | None, max_error_fraction: float, in_flight: int
) -> _Tally:
    """Write each block of ``refs`` to ``staging`` as ``part-<n>.parquet``; stop taking blocks once the
    finished writes exceed ``max_error_fraction`` (the writes started are awaited: only whole files).

    At most ``in_flight`` writes run at once, which also holds the pipeline back when storage is slow.
    """
    tally, pending = _Tally(), []
    for n, ref in enumerate(refs):
        uri = storage.join(staging, f"part-{n:06d}.parquet")
        pending.append(_write_block.remote(ref, uri, endpoint_url))
        pending = _drain(pending, tally, keep=in_flight)
        if tally.exceeds(max_error_fraction):
            log.warning("stopping: %d of %d images failed", tally.error, tally.ok + tally.error)
            break
    _drain(pending, tally, keep=0)
    return tally


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_annotation(cfg: AnnotateConfig, address: str | None = None) -> AnnotateSummary:
    """Annotate ``cfg.input`` with the model of ``cfg.model`` into ``cfg.output`` (SPEC §6).

    What a run wrote is committed even when it stops early: each input file's old rows are superseded by
    the rows this run wrote for it (all its frames), so ``OUTPUT/images`` never holds an image twice.

    Raises:
        TooManyErrorsError: after committing, when more than ``max_error_fraction`` of at least
            :data:`MIN_IMAGES_FOR_ERROR_CHECK` images failed; a re-run resumes (``incremental``).
    """
    from raycv.training import ensure_ray

    t0 = time.time()
    ep = cfg.storage.endpoint_url
    card = runs.read_card(cfg.model, ep)
    if cfg.explain and card["task"] != "classification":  # checked before anything starts (exit 2)
        raise ConfigError(
            "explain",
            cfg.explain,
            f"Grad-CAM explains classifiers only, this run is {card['task']}: remove it.",
        )
    model_id = runs.model_id_of(storage.read_bytes(storage.join(cfg.model, runs.WEIGHTS), ep))
    recovered = outputs.recover(cfg.output, ep)
    todo = plan_inputs(cfg.input, ep)
    files = len(todo)
    index = outputs.read_index(cfg.output, ep)
    skipped = _skip_current(todo, index.current(model_id)) if cfg.incremental else 0
    run_id = new_run_id()
    tally, reached = _Tally(), 0
    if len(todo):
        ensure_ray(address)
        tally = _run_pipeline(cfg, todo, card, run_id)
        sources = outputs.staged_sources(cfg.output, run_id, ep)
        reached = len(sources)
        outputs.commit(cfg.output, run_id, index.superseded(sources), ep)
    stopped = reached < len(todo)
    duration = time.time() - t0
    summary = AnnotateSummary(
        total=tally.ok + tally.error + skipped + len(todo) - reached,
        ok=tally.ok,
        error=tally.error,
        skipped=skipped,
        images_per_s=round((tally.ok + tally.error) / duration, 3) if duration else 0.0,
        duration_s=round(duration, 3),
        run_id=run_id,
        model_id=model_id,
        output=cfg.output,
        recovered=recovered,
        files=files,
        stopped=stopped,
    )
    runs.write_json(storage.join(cfg.output, outputs.SUMMARY), asdict(summary), ep)
    if tally.exceeds(cfg.max_error_fraction):
        raise TooManyErrorsError(_stop_message(cfg, tally, stopped))
    return summary


def _stop_message(cfg: AnnotateConfig, tally: _Tally, stopped: bool) -> str:
    n = tally.ok + tally.error
    return (
        f"{tally.error} of {n} images failed ({tally.error / n:.0%} > max_error_fraction "
        f"{cfg.max_error_fraction}){'; the run stopped early' if stopped else ''}. First errors: "
        + " | ".join(tally.first_errors)
        + f". The {n} rows written are committed to {cfg.output}/images; fix the cause (credentials, "
        "paths, missing decoders) and re-run: images already annotated are skipped (incremental: true)."
    )
