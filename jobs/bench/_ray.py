"""Ray helpers of the benchmarks in ``jobs/bench/``: the session, one run of the real annotation pipeline
with its steady and mid-run rates, and the niceness of Ray's workers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from raycv.storage import Storage

# ------------------------------------------------------------------------------------------------ Ray


def auto_or(value: str) -> int | float | str:
    """argparse type of ``--actors`` / ``--cpus-per-actor``: ``auto`` (the config's default) or a number."""
    if value == "auto":
        return value
    number = float(value)
    return int(number) if number.is_integer() and "." not in value else number


def sizing(actors: Any, cpus_per_actor: Any, gpus_per_actor: float) -> Any:
    """What ``raycv annotate`` will run on the connected cluster for these values (``auto`` or numbers):
    :class:`raycv.annotation.sizing.Sizing`, the same function the pipeline calls."""
    import ray

    from raycv.annotation.sizing import size_actors

    return size_actors(actors, cpus_per_actor, gpus_per_actor, ray.cluster_resources())


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None, **init_kw: Any) -> Iterator[None]:
    """Use the Ray this process is already connected to, else connect to ``address``, else start one.

    Only a Ray this function started or connected is shut down at the end.
    """
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=False, **init_kw)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=False, **init_kw)
    try:
        yield
    finally:
        ray.shutdown()


def annotate(
    run_dir: str,
    source: str | list[str],
    output: str,
    *,
    batch_size: int,
    actors: int | Literal["auto"],
    cpus_per_actor: float | Literal["auto"],
    gpus_per_actor: float = 0.0,
    endpoint_url: str | None = None,
    address: str | None = None,
    speed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the real ``raycv annotate`` pipeline (:func:`raycv.annotation.pipeline.run_annotation`) once.

    ``speed``: the config's ``precision``, ``channels_last`` and ``compile``, if given.
    Returns its summary plus ``steady_images_per_s`` (see :func:`steady_rate`).
    """
    from dataclasses import asdict

    from raycv.annotation.pipeline import run_annotation
    from raycv.config import AnnotateConfig
    from raycv.storage import Storage

    cfg = AnnotateConfig(
        model=run_dir,
        input=source,
        output=output,
        batch_size=batch_size,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        incremental=False,
        storage={"endpoint_url": endpoint_url},  # type: ignore[arg-type]
        **(speed or {}),
    )
    summary = asdict(run_annotation(cfg, address))
    store = Storage(endpoint_url=endpoint_url)
    summary["steady_images_per_s"] = steady_rate(output, store)
    summary["mid_run_images_per_s"] = mid_run_rate(output, store)
    return summary


def _batch_stamps(output: str, store: Storage) -> tuple[np.ndarray, np.ndarray]:
    """(distinct ``annotated_at`` in seconds, rows finished at each), in time order."""
    import pyarrow.parquet as pq

    from raycv import storage

    fs, path = store.pyarrow_filesystem(storage.join(output, "images"))
    ts = pq.read_table(path, filesystem=fs, columns=["annotated_at"]).column("annotated_at")
    stamps, counts = np.unique(ts.cast("int64").to_numpy(), return_counts=True)
    return stamps / 1e6, counts


def steady_rate(output: str, store: Storage | None = None) -> float | None:
    """img/s between the first and the last batch the actors finished, from the rows' ``annotated_at``.

    This leaves out the fixed costs of a run (planning, actor start-up and model load, the commit),
    which the summary's ``images_per_s`` includes; None when fewer than three batches were written.
    """
    from raycv.storage import Storage

    stamps, counts = _batch_stamps(output, store or Storage())
    if len(stamps) < 3 or stamps[-1] == stamps[0]:
        return None
    return float((counts.sum() - counts[0]) / (stamps[-1] - stamps[0]))


def mid_run_rate(output: str, store: Storage | None = None, lo: float = 0.2, hi: float = 0.9) -> float | None:
    """img/s between the batches that completed ``lo`` and ``hi`` of the rows.

    Unlike :func:`steady_rate` this also leaves out replicas that start late (a second node's actors
    import torch while the first node's already work) and the tail where fewer replicas have work left.
    """
    from raycv.storage import Storage

    stamps, counts = _batch_stamps(output, store or Storage())
    done = np.cumsum(counts)
    a, b = np.searchsorted(done, lo * done[-1]), np.searchsorted(done, hi * done[-1])
    if b <= a or stamps[b] == stamps[a]:
        return None
    return float((done[b] - done[a]) / (stamps[b] - stamps[a]))


# ------------------------------------------------------------------------------------------------ niceness


def ray_worker_niceness() -> int:
    """The niceness of a Ray worker process of the connected cluster, read with psutil inside one.

    The raylet starts workers ``RAY_worker_niceness`` (15 by default) above its own niceness, so on a
    machine shared with other work a nice-0 baseline would get a larger share of the CPU than the actors
    or Ray Train workers it is compared with.
    """
    import psutil
    import ray

    probe = ray.remote(num_cpus=0)(lambda: psutil.Process().nice())
    return int(ray.get(probe.remote()))
