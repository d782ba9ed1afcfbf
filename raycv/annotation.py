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
from raycv.config import AnnotateConfig
from raycv.data.formats import IMAGE_EXTENSIONS
from raycv.data.images import decode_image
from raycv.data.transforms import normalize, to_tensor_resized
from raycv.errors import ConfigError
from raycv.tasks.classification import topk_rows

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


def _error(stage: str, exc: BaseException) -> tuple[str, str, str]:
    return stage, type(exc).__name__, str(exc)[:2000]


def read_decode_batch(
    batch: dict[str, np.ndarray], *, size_hw: tuple[int, int], endpoint_url: str | None, max_pixels: int
) -> dict[str, np.ndarray]:
    """Fetch and decode a batch of images into fixed-size uint8 pixels, catching each image's failure.

    Returns the plan columns plus ``pixels`` [B, h, w, 3] uint8 (zeros for failed images), ``width`` and
    ``height`` (original, -1 when unknown) and ``error_stage/error_type/error_message`` ("" when fine).
    """
    uris = [str(u) for u in batch["image_uri"]]

    def one(uri: str) -> tuple[np.ndarray, int, int, tuple[str, str, str]]:
        blank = np.zeros((*size_hw, 3), np.uint8)
        try:
            data = storage.read_bytes(uri, endpoint_url)
        except Exception as exc:
            return blank, -1, -1, _error("read", exc)
        try:
            image = decode_image(data, uri, max_pixels=max_pixels)
        except Exception as exc:
            return blank, -1, -1, _error("decode", exc)
        h, w = image.shape[:2]
        resized = to_tensor_resized(image, size_hw).mul_(255.0).round_().to(torch.uint8)
        return resized.permute(1, 2, 0).numpy(), w, h, ("", "", "")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, uris))
    out = dict(batch)
    out["pixels"] = np.stack([r[0] for r in results])
    out["width"] = np.array([r[1] for r in results], np.int32)
    out["height"] = np.array([r[2] for r in results], np.int32)
    for i, col in enumerate(("error_stage", "error_type", "error_message")):
        out[col] = np.array([r[3][i] for r in results], dtype=object)
    return out


class Classifier:
    """A model replica (one per actor): loads the run's weights in ``__init__``, labels batches."""

    def __init__(
        self, run_dir: str, endpoint_url: str | None, run_id: str, topk: int, threads: int, use_gpu: bool
    ) -> None:
        torch.set_num_threads(
            max(1, threads)
        )  # Ray sets OMP threads, but a reused worker keeps its old count
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.run = runs.load_run(run_dir, endpoint_url, self.device)
        norm = self.run.card.get("normalization", {})
        self.mean, self.std = tuple(norm.get("mean", (0.0,) * 3)), tuple(norm.get("std", (1.0,) * 3))
        self.run_id, self.topk = run_id, topk
        self.schema = outputs.images_schema(self.run.card["task"])

    def _predict(self, pixels: np.ndarray) -> np.ndarray:
        x = (
            torch.from_numpy(np.ascontiguousarray(pixels))
            .to(self.device)
            .permute(0, 3, 1, 2)
            .float()
            .div_(255.0)
        )
        with torch.inference_mode():
            logits = self.run.model(normalize(x, self.mean, self.std))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_uri"])
        stage = [str(s) or None for s in batch["error_stage"]]
        etype = [str(s) or None for s in batch["error_type"]]
        emsg = [str(s) or None for s in batch["error_message"]]
        good = [i for i in range(n) if stage[i] is None]
        label: list[int | None] = [None] * n
        name: list[str | None] = [None] * n
        score: list[float | None] = [None] * n
        topk: list[Any] = [None] * n
        if good:
            try:
                probs = self._predict(batch["pixels"][good])
                rows = topk_rows(probs, self.run.class_names, self.topk)
                for j, i in enumerate(good):
                    label[i], name[i], score[i], topk[i] = (
                        rows[j][0]["label"],
                        rows[j][0]["label_name"],
                        rows[j][0]["score"],
                        rows[j],
                    )
            except Exception as exc:  # a model failure marks this batch's images, the run goes on
                for i in good:
                    stage[i], etype[i], emsg[i] = _error("model", exc)
        now = dt.datetime.now(dt.timezone.utc)
        columns = {
            "image_id": [str(v) for v in batch["image_id"]],
            "image_uri": [str(v) for v in batch["image_uri"]],
            "source_etag": [str(v) or None for v in batch["source_etag"]],
            "status": ["error" if s else "ok" for s in stage],
            "error_stage": stage,
            "error_type": etype,
            "error_message": emsg,
            "width": [int(w) if w >= 0 else None for w in batch["width"]],
            "height": [int(h) if h >= 0 else None for h in batch["height"]],
            "task": [self.run.card["task"]] * n,
            "model_id": [self.run.model_id] * n,
            "run_id": [self.run_id] * n,
            "annotated_at": [now] * n,
            "label": label,
            "label_name": name,
            "score": score,
            "topk": topk,
        }
        return pa.table(columns, schema=self.schema)


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


def _run_pipeline(
    cfg: AnnotateConfig, todo: list[tuple[str, str | None]], card: dict[str, Any], run_id: str
) -> None:
    ep = cfg.storage.endpoint_url
    size = card["image_size"]
    size_hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    ds: ray.data.Dataset = ray.data.from_arrow(_plan_table(todo, cfg.actors))
    ds = ds.map_batches(
        read_decode_batch,  # type: ignore[arg-type]
        batch_size=ROWS_PER_BLOCK,
        num_cpus=DECODE_CPUS,
        batch_format="numpy",
        fn_kwargs={"size_hw": size_hw, "endpoint_url": ep, "max_pixels": cfg.max_pixels},
    )
    ds = ds.map_batches(
        Classifier,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
        fn_constructor_kwargs={
            "run_dir": cfg.model,
            "endpoint_url": ep,
            "run_id": run_id,
            "topk": cfg.topk,
            "threads": int(cfg.cpus_per_actor),
            "use_gpu": cfg.gpus_per_actor > 0,
        },
    )
    fs, path = storage.pyarrow_filesystem(outputs.staging_dir(cfg.output, run_id), ep)
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
