"""Where the model actors of a run go: one bundle per actor in a "SPREAD" placement group, reserved before any
task of the run exists, and the checks that a run never waits on resources it holds itself."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raycv.annotation.sizing import Sizing
from raycv.errors import ConfigError

log = logging.getLogger(__name__)
DECODE_CPUS = 0.5  # one read task
# How long a run waits for the cluster to place its model actors. Generous: an autoscaling cluster may
# first start GPU nodes from zero (cluster/README.md), which takes minutes; the wait is logged meanwhile.
PLACEMENT_TIMEOUT_S = 900.0
PLACEMENT_LOG_EVERY_S = 30.0


@contextlib.contextmanager
def actor_placement(sz: Sizing, name: str) -> Iterator[PlacementGroupSchedulingStrategy]:
    """Reserve one bundle per model actor in a "SPREAD" placement group for the run; remove it after.

    Ray Data starts its actors with the best-effort "SPREAD" strategy at the same time as the read tasks,
    which can fill one node before the second actor is placed: both then share a node. The group is
    placed before any task of the run exists (:func:`_run_pipeline`), so its bundles spread over the
    nodes. An actor takes exactly one bundle's resources, so each actor (and each restart of a killed
    one) fills a bundle of its own.

    The run holds the output's lease (:mod:`raycv.annotation.lease`) from before it recovers what a
    crashed run left until its summary is written.

    Raises:
        ConfigError: when another run holds the output's lease (naming it), or the output cannot be
            written; when the cluster cannot place the bundles within :data:`PLACEMENT_TIMEOUT_S`.
    """
    bundle = {"CPU": sz.cpus_per_actor, **({"GPU": sz.gpus_per_actor} if sz.gpus_per_actor > 0 else {})}
    _check_read_room(sz)  # before anything is reserved: nothing started on the cluster
    pg = placement_group([bundle] * sz.actors, strategy="SPREAD", name=name)
    try:
        if not _wait_placed(pg, sz.actors, bundle):
            raise ConfigError("actors", sz.actors, _no_room_message(sz, bundle))
        _check_read_room(sz)  # again: an autoscaling cluster may have grown while the group waited
        yield PlacementGroupSchedulingStrategy(pg)
    finally:
        remove_placement_group(pg)


def _check_read_room(sz: Sizing) -> None:
    """Refuse model actors that fit the cluster but leave its read stage no CPU.

    Ray Data starts a read task only where :data:`DECODE_CPUS` is free outside the actors' group: with
    every CPU reserved for the actors, the reads stay "backpressured" and the run waits forever. Actors
    that do not fit yet are left to :func:`_wait_placed` (an autoscaling cluster adds nodes for them).

    Raises:
        ConfigError: naming ``actors``/``cpus_per_actor``, the cluster's CPUs and a setting that fits.
    """
    total = ray.cluster_resources().get("CPU", 0.0)
    asked = sz.actors * sz.cpus_per_actor
    if not asked <= total < asked + DECODE_CPUS:
        return
    room = total - DECODE_CPUS
    fits = [f"cpus_per_actor: {math.floor(room / sz.actors * 4) / 4:g}"] if room / sz.actors >= 0.25 else []
    if room >= sz.cpus_per_actor:
        fits.append(f"actors: {math.floor(room / sz.cpus_per_actor)}")
    raise ConfigError(
        "actors",
        sz.actors,
        f"{sz.actors} model actors x cpus_per_actor {sz.cpus_per_actor:g} reserve {asked:g} of the "
        f"cluster's {total:g} CPUs and leave less than the {DECODE_CPUS:g} CPU a read task needs, so no "
        f"image would ever be read. Set {' or '.join(fits) or 'fewer actors'} (or add nodes).",
    )


def _wait_placed(pg: PlacementGroup, actors: int, bundle: dict[str, float]) -> bool:
    """Whether ``pg`` is placed within :data:`PLACEMENT_TIMEOUT_S`; logs what it waits for meanwhile."""
    deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
    # Whole seconds, at least one: Ray truncates the timeout to an integer, and 0 returns at once.
    while not pg.wait(max(1, math.ceil(min(deadline - time.monotonic(), PLACEMENT_LOG_EVERY_S)))):
        if time.monotonic() >= deadline:
            return False
        log.warning(
            "Waiting for the cluster to place %d model actors of %s each; it has %s (%s free). "
            "An autoscaling cluster adds nodes meanwhile; giving up after %.0f s.",
            actors,
            bundle,
            *_cpu_gpu(),
            PLACEMENT_TIMEOUT_S,
        )
    return True


def _cpu_gpu() -> tuple[str, str]:
    """The cluster's CPUs and GPUs, in all and free now: ("2 CPU, 0 GPU", "0.5 CPU, 0 GPU")."""
    return _text(ray.cluster_resources()), _text(ray.available_resources())


def _text(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0.0):g} CPU, {resources.get('GPU', 0.0):g} GPU"


def _no_room_message(sz: Sizing, bundle: dict[str, float]) -> str:
    total, free = _cpu_gpu()
    asked = _text({k: sz.actors * v for k, v in bundle.items()})
    knobs = "cpus_per_actor" + ("/gpus_per_actor" if sz.gpus_per_actor > 0 else "")
    return (
        f"The cluster could not place {sz.actors} model actors of {bundle} each ({asked} in all) within "
        f"{PLACEMENT_TIMEOUT_S:.0f} s: it has {total} in all ({free} free now). Lower actors or {knobs} "
        "to fit, add nodes, or wait for other jobs to release theirs."
    )
