"""Bulk annotation with Ray Data: plan inputs -> read + decode (CPU tasks) -> model actors -> Parquet.

The plan (URIs and fingerprints) is listed page by page into Arrow chunks. Rows stream from the actors
to small write tasks, one Parquet file per block; the driver only handles references to the blocks and
each write's status counts, never the rows, so its memory does not grow with the archive, and it can stop
the run early when too many images fail (``max_error_fraction``). Every failure of one image (read,
decode, model, write) becomes an error row instead of failing the run. A multi-frame DICOM or a NIfTI
volume is expanded in the read stage into one row per frame or slice (``image_uri`` = ``<file>#frame=<k>``).
See :mod:`raycv.annotation.commit` for how a run is committed.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.data
from ray.util.annotations import RayDeprecationWarning

from raycv import storage
from raycv.annotation import commit as outputs_commit
from raycv.annotation.actor import ActorSpec, Annotator, check_precision
from raycv.annotation.lease import Lease
from raycv.annotation.placement import DECODE_CPUS, actor_placement
from raycv.annotation.plan import Plan, plan_inputs, skip_current
from raycv.annotation.read import read_bytes_batch, read_decode_batch, read_stage
from raycv.annotation.sizing import Sizing, size_actors
from raycv.annotation.source import ModelSource, resolve
from raycv.annotation.write import Tally, write_blocks
from raycv.config import AnnotateConfig
from raycv.errors import ConfigError, TooManyErrorsError
from raycv.outputs import schema as outputs
from raycv.outputs.progress import OUTPUT_RECORD, ProgressWriter, console_echo, rate_and_eta
from raycv.runtime import ensure_ray, save_logs
from raycv.storage import Storage
from raycv.tasks.registry import get_task

log = logging.getLogger(__name__)


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
    first_rows_s: float | None = None  # from the start of the run to its first rows written (staged)
    log: str | None = None  # Ray's output of this run (workers, Ray Data), when the session is local


def _stages(
    cfg: AnnotateConfig, model: ModelSource, run_id: str, store: Storage, sz: Sizing
) -> tuple[Any, dict[str, Any], type[Annotator], ActorSpec]:
    """(read function, its kwargs, the task's model actor class, the actors' spec) of the run."""
    task = get_task(model.task)
    if task.annotator is None:
        raise ConfigError("model", model.uri, f"This run's task '{task.name}' cannot be annotated yet.")
    module, _, name = task.annotator.partition(":")
    annotator: type[Annotator] = getattr(importlib.import_module(module), name)
    spec = ActorSpec(
        model=model,
        store=store,
        run_id=run_id,
        threads=sz.threads,
        use_gpu=sz.gpus_per_actor > 0,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        fuse_conv_bn=cfg.fuse_conv_bn,
        batch_size=cfg.batch_size,
        max_pixels=cfg.max_pixels,
        tile=cfg.tile.model_dump() if cfg.tile else None,
        geo=cfg.geo.model_dump(),
        output=cfg.output,
        topk=cfg.topk,
        explain=cfg.explain,
        score_threshold=cfg.score_threshold,
        iou_threshold=cfg.iou_threshold,
    )
    read_kw: dict[str, Any] = {"store": store, "max_pixels": cfg.max_pixels}
    # decode: actor ships the encoded files; the actor decodes them on its device (nvJPEG on a GPU)
    if annotator.reads == "pixels" and cfg.decode != "actor":
        prep = model.preprocess
        resize = prep["resize"]
        read_kw["size_hw"] = resize if resize is None or isinstance(resize, int) else tuple(resize)
        read_kw["crop"] = prep.get("crop")
        read_kw["bands"], read_kw["geo"] = _bands(model), cfg.geo.model_dump()
        return read_decode_batch, read_kw, annotator, spec
    return read_bytes_batch, {**read_kw, "skip_geotiff": annotator.skip_geotiff}, annotator, spec


def _run_pipeline(
    cfg: AnnotateConfig,
    todo: Plan,
    model: ModelSource,
    run_id: str,
    store: Storage,
    sz: Sizing,
    tally: Tally,
) -> Tally:
    """Run the pipeline over ``todo`` into the run's staging folder; stop early past ``max_error_fraction``.

    The driver iterates over references to the actors' output blocks (never their rows) and hands each to
    a write task; the tasks' status counts tell it how many images failed so far. Leaving the iteration
    shuts Ray Data's executor down (its actors included); the writes already started are awaited, so the
    staging folder holds only whole files.
    """
    read_fn, read_kw, annotator, spec = _stages(cfg, model, run_id, store, sz)
    with actor_placement(sz, f"raycv-annotate-{run_id}") as placement:
        # from_blocks, not from_arrow: no task runs before the group is placed. from_arrow runs a 1-CPU
        # task per block, and the cluster's view of free CPUs lags behind their end: a group placed right
        # after them could find a node busy and put all its bundles on another.
        ds: ray.data.Dataset = ray.data.from_blocks(todo.blocks(sz.actors))
        # Neither stage may merge the plan's blocks: a small archive (or a few large scenes) would reach the
        # model stage as one batch, and all of it would go to one actor while the others idle.
        rows = todo.rows_per_block(sz.actors)
        ds = ds.map_batches(
            read_stage,  # type: ignore[arg-type]  # a generator taking keyword arguments (fn_kwargs)
            batch_size=rows,
            num_cpus=DECODE_CPUS,
            batch_format="numpy",
            fn_kwargs={"read": read_fn, **read_kw},
        )
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for a placement group: `scheduling_strategy` goes through
            # the deprecated **ray_remote_args (removed in 2.64; named placement options are planned,
            # ray-project/ray#65227). Deliberate, and only this warning is silenced.
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
            ds = ds.map_batches(
                annotator,
                batch_size=min(cfg.batch_size, rows),
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=sz.actors),
                num_cpus=sz.cpus_per_actor,
                num_gpus=sz.gpus_per_actor or None,
                fn_constructor_kwargs={"spec": spec},
                scheduling_strategy=placement,
            )
        return _write_all(ds, cfg, sz, run_id, store, tally)


def _write_all(
    ds: ray.data.Dataset, cfg: AnnotateConfig, sz: Sizing, run_id: str, store: Storage, tally: Tally
) -> Tally:
    """Hand the blocks of ``ds`` to write tasks as they come (see :func:`_run_pipeline`)."""
    staging = outputs_commit.staging_dir(cfg.output, run_id)
    bundles = ds.iter_internal_ref_bundles()
    blocks = (
        (entry.ref, entry.metadata.num_rows, entry.metadata.size_bytes)
        for bundle in bundles
        for entry in bundle.blocks
    )
    try:
        in_flight = 2 * sz.actors + 2
        return write_blocks(
            blocks, staging, store, cfg.max_error_fraction, in_flight, cfg.rows_per_file, tally
        )
    finally:
        del blocks, bundles  # the last references: the executor shuts down, releasing its actors' CPUs/GPUs


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_annotation(cfg: AnnotateConfig, address: str | None = None) -> AnnotateSummary:
    """Annotate ``cfg.input`` with the model of ``cfg.model`` into ``cfg.output`` (SPEC §6).

    What a run wrote is committed even when it stops early: each input file's old rows are superseded by
    the rows this run wrote for it (all its frames), so ``OUTPUT/images`` never holds an image twice.

    The run holds the output's lease (:mod:`raycv.annotation.lease`) from before it recovers what a
    crashed run left until its summary is written.

    Raises:
        ConfigError: when another run holds the output's lease (naming it), or the output cannot be
            written; when the cluster cannot place the model actors (``actors`` x ``cpus_per_actor`` /
            ``gpus_per_actor``) within :data:`PLACEMENT_TIMEOUT_S`; this run writes nothing then.
        TooManyErrorsError: after committing, when more than ``max_error_fraction`` of at least
            :data:`MIN_IMAGES_FOR_ERROR_CHECK` images failed; a re-run resumes (``incremental``).
        LeaseLostError: when another run took the lease over meanwhile; this run commits nothing.
    """
    t0 = time.time()
    store = Storage(endpoint_url=cfg.storage.endpoint_url)
    model = resolve(cfg.model, store)
    _check_model_options(cfg, model)
    run_id = new_run_id()
    # The lease first: nothing of this output is read for planning, recovered or written before this run
    # is the only one on it.
    with Lease(cfg.output, store, run_id=run_id) as lease:
        return _annotate(cfg, address, store, model, run_id, lease, t0)


def _annotate(
    cfg: AnnotateConfig,
    address: str | None,
    store: Storage,
    model: ModelSource,
    run_id: str,
    lease: Lease,
    t0: float,
) -> AnnotateSummary:
    """The body of :func:`run_annotation`, run while this run holds the output's lease."""
    model_id = model.model_id
    recovered = outputs_commit.recover(cfg.output, store)
    todo = plan_inputs(cfg.input, store)
    files = len(todo)
    index = outputs.read_index(cfg.output, store)
    skipped = skip_current(todo, index.current(model_id)) if cfg.incremental else 0
    tally, reached = Tally(), 0

    def progress() -> dict[str, Any]:
        done = tally.ok + tally.error
        return {
            "run_id": run_id,
            "done": skipped + done,
            "total": skipped + len(todo),  # files; a volume's frames count as rows when written
            "errors": tally.error,
            **rate_and_eta(done, len(todo), t0),
        }

    echo = console_echo("[raycv] annotate:")
    with ProgressWriter(storage.join(cfg.output, OUTPUT_RECORD), store, progress, echo=echo):
        if len(todo):
            ensure_ray(address)
            tally = _run_pipeline(cfg, todo, model, run_id, store, _sized(cfg), tally)
            sources = outputs_commit.staged_sources(cfg.output, run_id, store)
            reached = len(sources)
            lease.check()  # a run that lost its lease leaves its staging to the new holder's recovery
            outputs_commit.commit(cfg.output, run_id, index.superseded(sources), store)
    log = save_logs(storage.join(cfg.output, "_logs", f"{run_id}.log"), store, t0) if len(todo) else None
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
        first_rows_s=round(tally.first_rows_at - t0, 3) if tally.first_rows_at else None,
        log=log,
    )
    store.write_json(storage.join(cfg.output, outputs.SUMMARY), asdict(summary))
    if tally.exceeds(cfg.max_error_fraction):
        raise TooManyErrorsError(_stop_message(cfg, tally, stopped))
    return summary


def _sized(cfg: AnnotateConfig) -> Sizing:
    """The run's model stage, sized from the cluster (``auto`` values filled, numbers kept); printed."""
    resources = ray.cluster_resources()
    sizing = size_actors(cfg.actors, cfg.cpus_per_actor, cfg.gpus_per_actor, resources)
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    check_sized_precision(cfg, sizing)
    print(f"[raycv] annotate: {sizing.describe(cpus, gpus)}", flush=True)
    return sizing


def check_sized_precision(cfg: AnnotateConfig, sizing: Sizing) -> None:
    """fp16 on actors that got no GPU (``gpus_per_actor: auto`` on a CPU-only cluster): exit 2 now."""
    if cfg.precision == "fp16" and sizing.gpus_per_actor == 0:
        check_precision("fp16", "cpu")


def _check_model_options(cfg: AnnotateConfig, model: ModelSource) -> None:
    """Options the model cannot take exit 2 before anything starts."""
    task = get_task(model.task)
    if cfg.explain and (not task.image_labels or model.kind == "file"):
        raise ConfigError(
            "explain",
            cfg.explain,
            f"Grad-CAM explains torch classifiers only, this model is a {model.kind} {task.name} model: "
            "remove it.",
        )
    bands = _bands(model)
    if bands != 3 and task.objects:
        raise ConfigError(
            "model.in_channels",
            bands,
            "Detectors take 3-band (RGB) images (geo.bands picks a GeoTIFF's three): use a 3-band model.",
        )
    if bands != 3 and cfg.decode == "actor":
        raise ConfigError(
            "decode",
            cfg.decode,
            f"decode: actor decodes RGB JPEGs and this model takes {bands} bands: use decode: tasks.",
        )
    if cfg.geo.bands is not None and len(cfg.geo.bands) != bands:
        raise ConfigError(
            "geo.bands",
            cfg.geo.bands,
            f"The model takes {bands} band(s): list {bands} band numbers, e.g. {list(range(1, bands + 1))}, "
            f"or remove geo.bands to read each GeoTIFF's first {bands}.",
        )
    if cfg.decode == "actor" and model.fixed_size is None and task.image_labels:
        raise ConfigError(
            "decode",
            cfg.decode,
            "decode: actor needs one input size for every image: set model.preprocess.crop (or an exact "
            "[h, w] resize), or use decode: tasks.",
        )


def _bands(model: ModelSource) -> int:
    """The input bands of the model (its card's ``in_channels``, 3 for RGB)."""
    return int(model.card.get("in_channels", 3))


def _stop_message(cfg: AnnotateConfig, tally: Tally, stopped: bool) -> str:
    n = tally.ok + tally.error
    return (
        f"{tally.error} of {n} images failed ({tally.error / n:.0%} > max_error_fraction "
        f"{cfg.max_error_fraction}){'; the run stopped early' if stopped else ''}. First errors: "
        + " | ".join(tally.first_errors)
        + f". The {n} rows written are committed to {cfg.output}/images; fix the cause (credentials, "
        "paths, missing decoders) and re-run: images already annotated are skipped (incremental: true)."
    )
