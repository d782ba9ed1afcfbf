"""``actors: auto``: the model actors sized from the cluster's resources, so a config without speed keys uses
the whole machine.

GPUs first: a cluster with GPUs gets one model actor per GPU (``gpus_per_actor: 1``), each with one CPU to
feed it, and every other CPU reads and decodes. On CPUs only, the read stage keeps what decoding needs and
the model stage gets the rest, as few actors as make good use of it: torch's intra-op threads scale well up
to about :data:`THREADS_PER_ACTOR` cores (beyond, more replicas do better), and each actor runs
``ceil(cpus_per_actor)`` torch threads.

Measured on the 2-core machine (resnet18 @ 224 from 512 px JPEGs): decoding and resizing takes ~1/8 of
the model's CPU time per image (reduced-DCT JPEG decode, ~3 ms vs ~25 ms a core), so the read stage gets
:data:`READ_SHARE` of the CPUs, at least one read task's :data:`~raycv.annotation.placement.DECODE_CPUS`.
Explicit ``actors``, ``cpus_per_actor`` and ``gpus_per_actor`` are kept as given; ``auto`` fills the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

READ_SHARE = 0.125  # of the cluster's CPUs, for the read tasks (decode + resize)
MIN_READ_CPUS = 0.5  # one read task
THREADS_PER_ACTOR = 8  # torch intra-op threads an actor uses well on CPU
GPU_FEED_CPUS = 1.0  # CPUs of a GPU actor (batch assembly, host-to-device copies, post-processing)


@dataclass(frozen=True)
class Sizing:
    """The model stage of a run: ``actors`` x (``cpus_per_actor``, ``gpus_per_actor``), ``threads`` torch
    threads each; ``read_cpus`` left to the read stage; ``auto`` says which values were chosen here."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    read_cpus: float
    auto: tuple[str, ...]

    @property
    def _how(self) -> str:
        return f" (auto: {', '.join(self.auto)})" if self.auto else ""

    def describe(self, cpus: float, gpus: float) -> str:
        """One line for the run's header."""
        device = f" + {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        return (
            f"{self.actors} model actor(s) x {self.cpus_per_actor:g} CPU{device}, {self.threads} torch "
            f"thread(s) each; {self.read_cpus:g} CPU for reading{self._how}; cluster: {cpus:g} CPUs, {gpus:g} GPUs"
        )

    def describe_short(self) -> str:
        """The model stage in a few words (benchmark tables)."""
        return (
            f"{self.actors} actor(s) x {self.cpus_per_actor:g} CPU, {self.threads} thread(s) each{self._how}"
        )


def size_actors(
    actors: int | str, cpus_per_actor: float | str, gpus_per_actor: float | str, resources: dict[str, Any]
) -> Sizing:
    """The model stage for the config's values (``"auto"`` or a number) on a cluster of ``resources``
    (``ray.cluster_resources()``)."""
    cpus = float(resources.get("CPU", 0.0))
    gpus = float(resources.get("GPU", 0.0))
    chosen = []
    if gpus_per_actor == "auto":
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
        chosen.append("gpus_per_actor")
    gpu_each = float(gpus_per_actor)
    read = max(MIN_READ_CPUS, _quarter(READ_SHARE * cpus))
    if actors == "auto":
        if gpu_each > 0:
            actors = max(1, int(gpus // gpu_each))
        else:
            model_cpus = cpus - read
            each = float(cpus_per_actor) if cpus_per_actor != "auto" else THREADS_PER_ACTOR
            actors = max(1, round(model_cpus / each)) if model_cpus > 0 else 1
        chosen.append("actors")
    n = int(actors)
    if cpus_per_actor == "auto":
        if gpu_each > 0:
            cpus_per_actor = min(GPU_FEED_CPUS, max(0.25, _quarter((cpus - read) / n)))
        else:
            cpus_per_actor = max(0.25, _quarter((cpus - read) / n))
        chosen.append("cpus_per_actor")
        threads = max(1, math.ceil(float(cpus_per_actor)))
    else:
        threads = max(1, int(float(cpus_per_actor)))  # as before for explicit values
    per = float(cpus_per_actor)
    return Sizing(
        actors=n,
        cpus_per_actor=per,
        gpus_per_actor=gpu_each,
        threads=threads,
        read_cpus=round(max(cpus - n * per, 0.0), 3),
        auto=tuple(chosen),
    )


def _quarter(value: float) -> float:
    """Rounded down to a quarter CPU (Ray's fractional resources; placement stays readable)."""
    return math.floor(value * 4) / 4
