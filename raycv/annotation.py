"""Bulk annotation with Ray Data: plan inputs -> read + decode (CPU tasks) -> model actors -> Parquet.

Rows stream from the actors straight into Parquet files written by Ray's write tasks; the driver only
ever holds the plan (URIs and fingerprints) and a few small index columns, never the results, so its
memory does not grow with the archive. Every failure of one image (read, decode, model) becomes an
error row instead of failing the run. See :mod:`raycv.outputs` for how a run is committed.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from raycv import outputs, runs, storage
from raycv.annotators import Classifier, Detector, Segmenter, error_fields
from raycv.config import AnnotateConfig
from raycv.data import geotiff
from raycv.data.formats import IMAGE_EXTENSIONS
from raycv.data.images import decode_image
from raycv.data.transforms import to_tensor_resized
from raycv.errors import ConfigError

log = logging.getLogger(__name__)
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
ROWS_PER_BLOCK = 64
DECODE_CPUS = 0.5


@dataclass
class AnnotateSummary:
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


def _fingerprints(uris: list[str], endpoint_url: str | None) -> list[tuple[str, str | None]]:
    def one(uri: str) -> tuple[str, str | None]:
        try:
            return uri, next(storage.iter_files(uri, endpoint_url=endpoint_url)).fingerprint
        except (FileNotFoundError, StopIteration, OSError):
            return uri, None  # the read stage reports it as an error row

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, uris))


def plan_inputs(source: str | list[str], endpoint_url: str | None = None) -> list[tuple[str, str | None]]:
    """``(image_uri, fingerprint)`` for every input image, in a stable order, de-duplicated.

    ``source`` is a prefix (all image files below it), a glob, a manifest (``.txt`` one URI per line,
    ``.csv``/``.parquet`` with an ``image_uri`` column) or a list of URIs.
    """
    if isinstance(source, list):
        planned = _fingerprints(source, endpoint_url)
    elif source.lower().endswith(MANIFEST_EXTENSIONS) and "*" not in source:
        planned = _fingerprints(_manifest_uris(source, endpoint_url), endpoint_url)
    else:
        try:
            planned = [
                (e.uri, e.fingerprint)
                for e in storage.iter_files(source, extensions=IMAGE_EXTENSIONS, endpoint_url=endpoint_url)
            ]
        except FileNotFoundError:
            raise ConfigError(
                "input", source, "Nothing there: give an existing prefix, glob, list or manifest."
            ) from None
    seen: set[str] = set()
    return [(u, f) for u, f in planned if not (u in seen or seen.add(u))]  # type: ignore[func-returns-value]


# ------------------------------------------------------------------------------------------ pipeline


def _fetch_all(uris: list[str], endpoint_url: str | None, fetch: Any) -> list[Any]:
    with ThreadPoolExecutor(max_workers=8) as pool:  # object storage is latency-bound: overlap requests
        return list(pool.map(fetch, uris))


def _with_errors(batch: dict[str, np.ndarray], errors: list[tuple[str, str, str]]) -> dict[str, np.ndarray]:
    out = dict(batch)
    for i, col in enumerate(("error_stage", "error_type", "error_message")):
        out[col] = np.array([e[i] for e in errors], dtype=object)
    return out


def read_decode_batch(
    batch: dict[str, np.ndarray], *, size_hw: tuple[int, int], endpoint_url: str | None, max_pixels: int
) -> dict[str, np.ndarray]:
    """Fetch and decode a batch of images into fixed-size uint8 pixels, catching each image's failure.

    Returns the plan columns plus ``pixels`` [B, h, w, 3] uint8 (zeros for failed images), ``width`` and
    ``height`` (original, -1 when unknown) and ``error_stage/error_type/error_message`` ("" when fine).
    """
    ok: tuple[str, str, str] = ("", "", "")

    def one(uri: str) -> tuple[np.ndarray, int, int, tuple[str, str, str]]:
        blank = np.zeros((*size_hw, 3), np.uint8)
        try:
            data = storage.read_bytes(uri, endpoint_url)
        except Exception as exc:
            return blank, -1, -1, error_fields("read", exc)
        try:
            image = decode_image(data, uri, max_pixels=max_pixels)
        except Exception as exc:
            return blank, -1, -1, error_fields("decode", exc)
        h, w = image.shape[:2]
        resized = to_tensor_resized(image, size_hw).mul_(255.0).round_().to(torch.uint8)
        return resized.permute(1, 2, 0).numpy(), w, h, ok

    results = _fetch_all([str(u) for u in batch["image_uri"]], endpoint_url, one)
    out = _with_errors(batch, [r[3] for r in results])
    out["pixels"] = np.stack([r[0] for r in results])
    out["width"] = np.array([r[1] for r in results], np.int32)
    out["height"] = np.array([r[2] for r in results], np.int32)
    return out


def read_bytes_batch(
    batch: dict[str, np.ndarray], *, endpoint_url: str | None, skip_geotiff: bool = False
) -> dict[str, np.ndarray]:
    """Fetch the encoded bytes of a batch (GeoTIFFs are left to the actor's windowed reads).

    Shipping encoded bytes rather than decoded pixels keeps object-store traffic ~10x smaller; the model
    actor decodes at the original resolution, which segmentation needs anyway.
    """

    def one(uri: str) -> tuple[bytes, tuple[str, str, str]]:
        if skip_geotiff and geotiff.is_geotiff(uri):
            return b"", ("", "", "")
        try:
            return storage.read_bytes(uri, endpoint_url), ("", "", "")
        except Exception as exc:
            return b"", error_fields("read", exc)

    results = _fetch_all([str(u) for u in batch["image_uri"]], endpoint_url, one)
    out = _with_errors(batch, [r[1] for r in results])
    out["data"] = np.array([r[0] for r in results], dtype=object)
    return out


def _plan_table(todo: list[tuple[str, str | None]], actors: int) -> list[pa.Table]:
    """The plan as Arrow blocks: up to ROWS_PER_BLOCK rows each, and at least two blocks per actor."""
    table = pa.table(
        {
            "image_id": [outputs.image_id_of(u) for u, _ in todo],
            "image_uri": [u for u, _ in todo],
            "source_etag": [f or "" for _, f in todo],
        }
    )
    rows = max(1, min(ROWS_PER_BLOCK, -(-table.num_rows // (2 * actors))))
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


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
        return read_decode_batch, read_kw, Classifier, {**common, "topk": cfg.topk}
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
        return read_bytes_batch, {"endpoint_url": ep, "skip_geotiff": True}, Segmenter, seg_kw
    if card["task"] in ("detection", "instance_segmentation"):
        det_kw = {
            **common,
            "score_threshold": cfg.score_threshold,
            "iou_threshold": cfg.iou_threshold,
            "batch_size": cfg.batch_size,
            "max_pixels": cfg.max_pixels,
        }
        return read_bytes_batch, {"endpoint_url": ep}, Detector, det_kw
    raise ConfigError("model", cfg.model, f"This run's task '{card['task']}' cannot be annotated yet.")


def _run_pipeline(
    cfg: AnnotateConfig, todo: list[tuple[str, str | None]], card: dict[str, Any], run_id: str
) -> None:
    read_fn, read_kw, annotator, annotator_kw = _stages(cfg, card, run_id)
    ds: ray.data.Dataset = ray.data.from_arrow(_plan_table(todo, cfg.actors))
    ds = ds.map_batches(
        read_fn, batch_size=ROWS_PER_BLOCK, num_cpus=DECODE_CPUS, batch_format="numpy", fn_kwargs=read_kw
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
    fs, path = storage.pyarrow_filesystem(outputs.staging_dir(cfg.output, run_id), cfg.storage.endpoint_url)
    ds.write_parquet(path, filesystem=fs, ray_remote_args={"num_cpus": 0.25}, compression="zstd")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_annotation(cfg: AnnotateConfig, address: str | None = None) -> AnnotateSummary:
    """Annotate ``cfg.input`` with the model of ``cfg.model`` into ``cfg.output`` (SPEC §6)."""
    from raycv.training import ensure_ray

    t0 = time.time()
    ep = cfg.storage.endpoint_url
    card = runs.read_card(cfg.model, ep)
    model_id = runs.model_id_of(storage.read_bytes(storage.join(cfg.model, runs.WEIGHTS), ep))
    recovered = outputs.recover(cfg.output, ep)
    planned = plan_inputs(cfg.input, ep)
    index = outputs.read_index(cfg.output, ep)
    todo = [
        (u, f)
        for u, f in planned
        if not (cfg.incremental and _is_current(index.get(outputs.image_id_of(u)), f, model_id))
    ]
    run_id = new_run_id()
    counts: dict[str, int] = {}
    if todo:
        ensure_ray(address)
        _run_pipeline(cfg, todo, card, run_id)
        supersede: dict[str, list[str]] = {}
        for u, _ in todo:
            row = index.get(outputs.image_id_of(u))
            if row is not None:
                supersede.setdefault(row.file, []).append(outputs.image_id_of(u))
        files = outputs.commit(cfg.output, run_id, supersede, ep)
        counts = outputs.count_status(files, ep)
    duration = time.time() - t0
    summary = AnnotateSummary(
        total=len(planned),
        ok=counts.get("ok", 0),
        error=counts.get("error", 0),
        skipped=len(planned) - len(todo),
        images_per_s=round(len(todo) / duration, 3) if duration else 0.0,
        duration_s=round(duration, 3),
        run_id=run_id,
        model_id=model_id,
        output=cfg.output,
        recovered=recovered,
    )
    runs.write_json(storage.join(cfg.output, outputs.SUMMARY), asdict(summary), ep)
    return summary


def _is_current(row: outputs.IndexedRow | None, fingerprint: str | None, model_id: str) -> bool:
    """Whether a committed row already annotates this content with this model (and succeeded)."""
    return (
        row is not None and row.status == "ok" and row.model_id == model_id and row.fingerprint == fingerprint
    )
