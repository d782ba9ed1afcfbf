"""The baselines of the benchmarks in ``jobs/bench/``, measured outside Ray: a script's function in a fresh
process at the Ray workers' niceness, and the bare model on pre-decoded pixels.

Both run in processes started with ``spawn``: the child imports this module, and :func:`call_niced` the
script's module, by name (``jobs.bench.NAME``: the scripts run as ``python -m jobs.bench.NAME`` from the
repository root, and a spawned child starts in the parent's working directory with its import path).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------------ niced processes


def set_niceness(target: int) -> int:
    """Raise this process's niceness to ``target`` (without privileges it can only go up); returns it."""
    current = os.nice(0)
    if target > current:
        os.nice(target - current)
    return os.nice(0)


def _call_function(module: str, func: str, args: tuple, kwargs: dict[str, Any]) -> Any:
    import importlib

    return os.nice(0), getattr(importlib.import_module(module), func)(*args, **kwargs)


def _import_name(func: Callable[..., Any]) -> tuple[str, str]:
    """(module, name) that import ``func`` in another process, also from a script run as ``__main__``
    (``python -m jobs.bench.NAME``: its ``__spec__`` names the module)."""
    spec = getattr(sys.modules.get(func.__module__), "__spec__", None)
    if spec is None or "<" in func.__qualname__ or "." in func.__qualname__:
        raise ValueError(
            f"{func.__module__}.{func.__qualname__} cannot be imported by name in a child process: "
            "use a module-level function of a module run with `python -m` or imported"
        )
    return spec.name, func.__qualname__


def call_niced(
    niceness: int, func: Callable[..., Any], *args: Any, omp_threads: int | None = None, **kwargs: Any
) -> tuple[int, Any]:
    """(the process's niceness, ``func(*args, **kwargs)``), called in a fresh process raised to
    ``niceness`` (and with ``OMP_NUM_THREADS=omp_threads``, as Ray gives its workers).

    ``func`` is a module-level function; the child imports its module by name. A baseline runs there, not
    in the driver: a process cannot lower its niceness again, and Ray's own processes (started by the
    driver) inherit the driver's.
    """
    return call_niced_concurrently(niceness, func, [(args, kwargs)], omp_threads=omp_threads)[0]


def call_niced_concurrently(
    niceness: int,
    func: Callable[..., Any],
    calls: Sequence[tuple[tuple, dict[str, Any]]],
    *,
    omp_threads: int | None = None,
) -> list[tuple[int, Any]]:
    """:func:`call_niced` for each ``(args, kwargs)`` of ``calls``, all at once, one process each."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    module, name = _import_name(func)
    ctx = mp.get_context("spawn")
    with (
        omp_env(omp_threads),
        ProcessPoolExecutor(
            len(calls), mp_context=ctx, initializer=set_niceness, initargs=(niceness,)
        ) as pool,
    ):
        futures = [pool.submit(_call_function, module, name, a, kw) for a, kw in calls]
        return [f.result() for f in futures]


@contextlib.contextmanager
def omp_env(threads: int | None) -> Iterator[None]:
    """``OMP_NUM_THREADS=threads`` for the processes started inside (Ray sets it to a worker's CPUs)."""
    old = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


# ------------------------------------------------------------------------------------------------ bare model


def _forward_batch(
    model: Any, pixels: np.ndarray, mean: Any, std: Any, device: str, speed: dict[str, Any] | None = None
) -> None:
    """The model actor's inference on one batch: uint8 -> normalised float -> model -> softmax on the CPU.

    ``speed`` holds the actors' ``precision`` and ``channels_last`` (:class:`raycv.annotation.actor.Annotator`).
    """
    import torch

    from raycv.annotation.actor import autocast
    from raycv.data.transforms import normalize

    speed = speed or {}
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    x = normalize(x, mean, std)
    if speed.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, speed.get("precision", "fp32")):
        out = model(x)
        if isinstance(out, torch.Tensor):
            torch.softmax(out.float(), dim=1).cpu()
        elif device == "cuda":
            torch.cuda.synchronize()


def _bare_worker(
    run_dir: str,
    shard_path: str,
    batch_size: int,
    threads: int,
    device: str,
    niceness: int,
    speed: dict[str, Any],
    barrier: Any,
    queue: Any,
) -> None:
    import torch

    from raycv.annotation.actor import fuse_conv_bn, to_channels_last
    from raycv.models import saved
    from raycv.storage import Storage

    set_niceness(niceness)
    torch.set_num_threads(max(1, threads))
    run = saved.load_run(run_dir, Storage(), device=device)
    model: Any = fuse_conv_bn(run.model) if speed.get("fuse_conv_bn") else run.model  # as the actors do
    model = to_channels_last(model) if speed.get("channels_last") else model
    model = torch.compile(model) if speed.get("compile") else model
    norm = run.card.get("normalization", {})
    mean, std = tuple(norm.get("mean", (0.0,) * 3)), tuple(norm.get("std", (1.0,) * 3))
    pixels = np.load(shard_path, mmap_mode="r")
    # warm-up: allocations, kernels (and the compilation, with compile; the last batch may recompile)
    _forward_batch(model, np.array(pixels[:batch_size]), mean, std, device, speed)
    barrier.wait()
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch_size):  # a copy per batch, as the actor's ``pixels[good]`` makes
        _forward_batch(model, np.array(pixels[i : i + batch_size]), mean, std, device, speed)
    queue.put((len(pixels), t0, time.perf_counter()))


def bare_model_rate(
    run_dir: str,
    pixels: np.ndarray,
    *,
    batch_size: int,
    processes: int,
    threads: int,
    device: str = "cpu",
    niceness: int = 0,
    speed: dict[str, Any] | None = None,
) -> float:
    """img/s of the run's model alone on pre-decoded ``pixels``, in ``processes`` x ``threads`` torch threads.

    The same layout as the annotation actors (one process per actor, its ``cpus_per_actor`` threads each,
    at the actors' ``niceness``, with their ``speed`` options), started together behind a barrier after one
    warm-up batch; no Ray, no I/O, no decoding.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="raycv-bare-") as tmp:
        procs = []
        for k, shard in enumerate(np.array_split(pixels, processes)):
            path = os.path.join(tmp, f"shard{k}.npy")
            np.save(path, shard)
            procs.append(
                ctx.Process(
                    target=_bare_worker,
                    args=(run_dir, path, batch_size, threads, device, niceness, speed or {}, barrier, queue),
                )
            )
        with omp_env(threads):  # what Ray gives the actors
            for p in procs:
                p.start()
        results = [_next_result(queue, procs) for _ in procs]
        for p in procs:
            p.join()
    n = sum(r[0] for r in results)
    return n / (max(r[2] for r in results) - min(r[1] for r in results))


def _next_result(queue: Any, procs: list[Any]) -> tuple[int, float, float]:
    """The next worker's result; raises if a worker died without one (instead of waiting forever)."""
    import queue as queue_mod

    while True:
        try:
            return queue.get(timeout=2.0)  # type: ignore[no-any-return]
        except queue_mod.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(
                    f"a bare-model process failed (exit codes {failed}); see its traceback above"
                ) from None
