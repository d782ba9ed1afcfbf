"""Shared pieces of the benchmarks in ``jobs/bench/``: arguments, machine info, tables, JSON, inputs.

Every benchmark reports ratios against a baseline measured in the same run (same process, same machine,
same minutes), because absolute img/s on a shared machine move with whatever else runs there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# The registry names the benchmarks accept for --arch (any registered name works; these are the usual ones).
GPU_ARCHS = ("resnet50", "deeplabv3_resnet50", "maskrcnn_resnet50_fpn", "yolo_s")


# ------------------------------------------------------------------------------------------------ arguments


def base_parser(
    description: str, *, n: int, arch: str, image_size: int, src_size: int
) -> argparse.ArgumentParser:
    """The arguments every benchmark takes; each script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores)")
    p.add_argument("--n", type=int, default=n, help="images in the generated archive")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    p.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temporary folder)")
    p.add_argument("--input", default=None, help="an existing archive (prefix, glob, manifest) instead")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// inputs/outputs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", default=arch, help=f"registry name, e.g. {', '.join(GPU_ARCHS)}")
    p.add_argument("--image-size", type=int, default=image_size, help="the model's input side")
    p.add_argument("--src-size", type=int, default=src_size, help="side of the generated images")
    p.add_argument("--format", choices=["png", "jpg"], default="jpg", help="of the generated images")
    p.add_argument("--batch-size", type=int, default=32)
    return p


# ------------------------------------------------------------------------------------------------ reporting


def machine_info() -> dict[str, Any]:
    """CPU count, library versions, GPU name (if any), date and the command line of this run."""
    import ray
    import torch
    import torchvision

    import raycv

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "raycv_commit": _git_commit(),
        "raycv_path": os.path.dirname(raycv.__file__),
    }


def _git_commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when raycv/ has uncommitted changes."""
    import subprocess

    import raycv

    root = os.path.dirname(os.path.dirname(os.path.abspath(raycv.__file__)))
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "raycv"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def print_table(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    """Two columns, figure and value, floats to 3 significant digits."""
    shown = [(k, f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in rows]
    width = max(len(k) for k, _ in shown)
    print(f"\n{title}\n{'-' * (width + 16)}")
    for k, v in shown:
        print(f"{k:<{width}}  {v}")
    sys.stdout.flush()


def report(name: str, args: argparse.Namespace, results: dict[str, Any], *, target: str) -> dict[str, Any]:
    """The JSON document of one run: what ran, where, and the figures; written to ``args.json`` if set."""
    doc = {
        "benchmark": name,
        "target": target,
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items()},
        "results": results,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return doc


@contextlib.contextmanager
def workdir(path: str | None) -> Iterator[str]:
    """``path`` (created), or a temporary folder removed afterwards."""
    if path:
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="raycv-bench-") as tmp:
        yield tmp


# ------------------------------------------------------------------------------------------------ inputs


def make_archive(
    root: str, *, n: int, size: int, fmt: str = "jpg", seed: int = 0, endpoint_url: str | None = None
) -> list[str]:
    """``n`` generated shape images (``size`` px square) under ``root``; returns their URIs in order.

    Files already there (same name) are kept, so a larger ``n`` reuses a smaller run's files.
    """
    from PIL import Image

    from raycv import storage
    from raycv.data import synthetic

    def one(i: int) -> str:
        uri = storage.join(root, f"{i:06d}.{fmt}")
        if storage.scheme(uri) == "file" and os.path.exists(uri):
            return uri
        rng = np.random.default_rng([seed, i])
        label = i % len(synthetic.CLASSES)
        pixels = synthetic.render_classification_sample(rng, label, size=size)
        import io

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG" if fmt == "jpg" else "PNG", quality=90)
        storage.write_bytes(uri, buf.getvalue(), endpoint_url)
        return uri

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(n)))


def inputs(args: argparse.Namespace, wd: str) -> tuple[list[str], str]:
    """(the image URIs, the source the pipeline plans from): ``--input``, else a generated archive."""
    from raycv.annotation import plan_inputs

    if args.input:
        return [u for u, _ in plan_inputs(args.input, args.endpoint_url)], args.input
    root = os.path.join(wd, f"archive-{args.n}x{args.src_size}.{args.format}")
    return make_archive(root, n=args.n, size=args.src_size, fmt=args.format), root


def make_run(
    run_dir: str,
    *,
    arch: str,
    image_size: int,
    num_classes: int = 3,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    endpoint_url: str | None = None,
) -> str:
    """A raycv run directory (``model.json`` + ``model.pt``) holding ``arch`` with random weights.

    This is what ``raycv train`` leaves behind, minus the training: annotation loads it the same way.
    Returns the model_id.
    """
    import torch

    from raycv import runs, storage
    from raycv.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from raycv.models import create_model, get_model_info

    task = get_model_info(arch).task
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=num_classes, image_size=image_size, **(options or {}))
    model_id = runs.save_weights(storage.join(run_dir, runs.WEIGHTS), model.state_dict(), endpoint_url)
    detection = task in ("detection", "instance_segmentation")
    names = [f"class_{i}" for i in range(num_classes)]
    card = {
        "task": task,
        "arch": arch,
        "options": options or {},
        "num_classes": num_classes,
        "class_names": names,
        "image_size": image_size,
        "in_channels": 3,
        "normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}
        if detection
        else {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "note": "random weights written by jobs/bench (a benchmark model, not a trained one)",
    }
    runs.write_json(storage.join(run_dir, runs.MODEL_CARD), card, endpoint_url)
    return model_id


FIXED_COST_ARCH = "bench_fixed_cost"


def register_bench_models() -> None:
    """Register ``bench_fixed_cost``: a classifier whose forward sleeps ``seconds_per_image`` per image.

    Its throughput is bounded by the number of replicas, not by the cores, which is what a scaling
    benchmark on one machine needs. Ray workers run this as their ``worker_process_setup_hook``.
    """
    import torch
    from torch import nn

    from raycv.models import list_models, register_model

    if FIXED_COST_ARCH in list_models():
        return

    class FixedCost(nn.Module):
        def __init__(self, num_classes: int, seconds_per_image: float) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(num_classes))
            self.seconds_per_image = seconds_per_image

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(self.seconds_per_image * x.shape[0])
            return x.mean(dim=(1, 2, 3))[:, None] * 0 + self.bias

    @register_model(FIXED_COST_ARCH, task="classification", min_input_size=1)
    def bench_fixed_cost(*, num_classes: int, seconds_per_image: float = 0.05) -> nn.Module:
        """Benchmarks only: sleeps seconds_per_image per image, returns constant logits."""
        return FixedCost(num_classes, seconds_per_image)


def decoded_pixels(uris: Sequence[str], size: int, endpoint_url: str | None = None) -> np.ndarray:
    """[N, size, size, 3] uint8: exactly what the annotation pipeline's read stage hands the model actors."""
    from raycv import outputs
    from raycv.annotation import read_decode_batch

    out = []
    for i in range(0, len(uris), 64):
        chunk = list(uris[i : i + 64])
        plan = {  # the columns of the pipeline's plan blocks
            "image_id": np.array([outputs.image_id_of(u) for u in chunk], dtype=object),
            "image_uri": np.array(chunk, dtype=object),
            "source_etag": np.array([""] * len(chunk), dtype=object),
        }
        batch = read_decode_batch(plan, size_hw=(size, size), endpoint_url=endpoint_url, max_pixels=1 << 30)
        out.append(batch["pixels"])
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ Ray


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
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float = 0.0,
    endpoint_url: str | None = None,
    address: str | None = None,
    speed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the real ``raycv annotate`` pipeline (:func:`raycv.annotation.run_annotation`) once.

    ``speed``: the config's ``precision``, ``channels_last`` and ``compile``, if given.
    Returns its summary plus ``steady_images_per_s`` (see :func:`steady_rate`).
    """
    from dataclasses import asdict

    from raycv.annotation import run_annotation
    from raycv.config import AnnotateConfig

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
    summary["steady_images_per_s"] = steady_rate(output, endpoint_url)
    summary["mid_run_images_per_s"] = mid_run_rate(output, endpoint_url)
    return summary


def _batch_stamps(output: str, endpoint_url: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(distinct ``annotated_at`` in seconds, rows finished at each), in time order."""
    import pyarrow.parquet as pq

    from raycv import storage

    fs, path = storage.pyarrow_filesystem(storage.join(output, "images"), endpoint_url)
    ts = pq.read_table(path, filesystem=fs, columns=["annotated_at"]).column("annotated_at")
    stamps, counts = np.unique(ts.cast("int64").to_numpy(), return_counts=True)
    return stamps / 1e6, counts


def steady_rate(output: str, endpoint_url: str | None = None) -> float | None:
    """img/s between the first and the last batch the actors finished, from the rows' ``annotated_at``.

    This leaves out the fixed costs of a run (planning, actor start-up and model load, the commit),
    which the summary's ``images_per_s`` includes; None when fewer than three batches were written.
    """
    stamps, counts = _batch_stamps(output, endpoint_url)
    if len(stamps) < 3 or stamps[-1] == stamps[0]:
        return None
    return float((counts.sum() - counts[0]) / (stamps[-1] - stamps[0]))


def mid_run_rate(
    output: str, endpoint_url: str | None = None, lo: float = 0.2, hi: float = 0.9
) -> float | None:
    """img/s between the batches that completed ``lo`` and ``hi`` of the rows.

    Unlike :func:`steady_rate` this also leaves out replicas that start late (a second node's actors
    import torch while the first node's already work) and the tail where fewer replicas have work left.
    """
    stamps, counts = _batch_stamps(output, endpoint_url)
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


def set_niceness(target: int) -> int:
    """Raise this process's niceness to ``target`` (without privileges it can only go up); returns it."""
    current = os.nice(0)
    if target > current:
        os.nice(target - current)
    return os.nice(0)


def _call_script(path: str, func: str, args: tuple, kwargs: dict[str, Any]) -> Any:
    import importlib.util

    name = "_bench_child_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return os.nice(0), getattr(module, func)(*args, **kwargs)


def call_niced(
    niceness: int, path: str, func: str, *args: Any, omp_threads: int | None = None, **kwargs: Any
) -> tuple[int, Any]:
    """(the process's niceness, ``func(*args, **kwargs)``) of the script at ``path``, called in a fresh
    process raised to ``niceness`` (and with ``OMP_NUM_THREADS=omp_threads``, as Ray gives its workers).

    A baseline runs there, not in the driver: a process cannot lower its niceness again, and Ray's own
    processes (started by the driver) inherit the driver's.
    """
    return call_niced_concurrently(niceness, path, func, [(args, kwargs)], omp_threads=omp_threads)[0]


def call_niced_concurrently(
    niceness: int,
    path: str,
    func: str,
    calls: Sequence[tuple[tuple, dict[str, Any]]],
    *,
    omp_threads: int | None = None,
) -> list[tuple[int, Any]]:
    """:func:`call_niced` for each ``(args, kwargs)`` of ``calls``, all at once, one process each."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    with (
        omp_env(omp_threads),
        ProcessPoolExecutor(
            len(calls), mp_context=ctx, initializer=set_niceness, initargs=(niceness,)
        ) as pool,
    ):
        futures = [pool.submit(_call_script, os.path.abspath(path), func, a, kw) for a, kw in calls]
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

    ``speed`` holds the actors' ``precision`` and ``channels_last`` (:class:`raycv.annotators.base._Annotator`).
    """
    import torch

    from raycv.annotators.base import autocast
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

    from raycv import runs
    from raycv.annotators.base import to_channels_last

    set_niceness(niceness)
    torch.set_num_threads(max(1, threads))
    run = runs.load_run(run_dir, device=device)
    model: Any = to_channels_last(run.model) if speed.get("channels_last") else run.model
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


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b
