"""ONNX Runtime vs torch img/s for the same model, in one process, on the same random batches.

A registry model (random weights, eval mode) is exported once with ``torch.onnx.export(..., dynamo=True)``
(batch dimension dynamic) and the same batches of random ``[N, 3, H, W]`` float32 pixels are run through:

- ``torch_eager``: torch eager fp32 under ``torch.inference_mode``, NCHW (the reference of the ratios and
  of the output check);
- ``torch_channels_last``: the same with NHWC weights and inputs, as raycv's model actors run by default
  (``annotate.channels_last``; the input conversion is timed, as the actor converts each batch);
- ``onnxruntime_cpu``: onnxruntime's ``CPUExecutionProvider``, ``intra_op_num_threads`` = ``--threads``
  (torch gets the same via ``torch.set_num_threads``), graph optimisation ``ORT_ENABLE_ALL``;
- with a CUDA device (unless ``--no-cuda``): ``torch_cuda`` (NCHW and channels_last) and onnxruntime's
  ``CUDAExecutionProvider`` when the installed onnxruntime has it (``onnxruntime-gpu``; skipped with a
  note otherwise). Each batch is copied from host memory and its logits back, on both sides. torch's
  convolutions on CUDA default to TF32 (``torch.backends.cudnn.allow_tf32``): expect differences ~1e-3
  there, not ~1e-6.

Each backend runs ``--warmup`` batches first (not timed: allocations, kernel selection, onnxruntime's
first-run planning), then every batch, timed end to end. ``--rounds`` repeats all backends in turn (so a
burst of load on a shared machine hits every backend in one round, not one backend); a backend's figure is
its best round. Ratios are against torch on the same device in the same run. Agreement: the max absolute
difference of each backend's logits from ``torch_eager``'s over all images. Target: none, this is a
comparison; on the CPU the outputs agree within 1e-4.

    python -m jobs.bench.onnx_vs_torch --json onnx_cpu.json
    python -m jobs.bench.onnx_vs_torch --arch resnet50 --batch-size 128 --images 4096 --threads 8 --json onnx_gpu.json
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _common as C

TARGET = "none (a comparison); CPU outputs agree within 1e-4"
CPU_TOLERANCE = 1e-4

Forward = Callable[[np.ndarray], np.ndarray]


def parse_args(argv: list[str] | None = None) -> C.argparse.Namespace:
    p = C.argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", "--model", dest="arch", default="resnet18", help="registry name")
    p.add_argument("--image-size", "--size", dest="image_size", type=int, default=224, help="input side")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n", "--images", dest="n", type=int, default=256, help="timed images per backend")
    p.add_argument("--threads", type=int, default=2, help="torch threads = onnxruntime intra-op threads")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per backend and round")
    p.add_argument("--rounds", type=int, default=2, help="all backends in turn, this many times; best kept")
    p.add_argument("--no-cuda", action="store_true", help="CPU backends only, even with a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    p.add_argument("--workdir", default=None, help="where the ONNX file goes (default: a temporary folder)")
    args = p.parse_args(argv)
    for name in ("image_size", "num_classes", "batch_size", "n", "threads", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# ------------------------------------------------------------------------------------------------ model


def build_model(arch: str, *, num_classes: int, image_size: int, seed: int) -> Any:
    """The registry model with random weights in eval mode; refuses models whose output is not one tensor."""
    import torch

    from raycv.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, num_classes=num_classes, image_size=image_size).eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, image_size, image_size))
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"'{arch}' returns {type(out).__name__}, not one tensor: this benchmark compares models with a "
            "single tensor output (classifiers, e.g. resnet18, resnet50, test_classifier)"
        )
    return model


def export_onnx(model: Any, path: str, image_size: int) -> float:
    """``model`` to ``path`` (weights in ``path.data`` beside it) with a dynamic batch; returns seconds."""
    import torch

    sample = torch.randn(2, 3, image_size, image_size)  # 2, not 1: export specialises a size-1 dimension
    t0 = time.perf_counter()
    try:
        torch.onnx.export(
            model,
            (sample,),
            path,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            input_names=["images"],
            output_names=["logits"],
            verbose=False,
        )
    except Exception as e:  # the exporter raises many types; say which model and where to look
        raise RuntimeError(
            f"torch.onnx.export of the model failed ({type(e).__name__}); rerun with a classifier "
            "such as resnet18, or see torch.onnx's report for the unsupported operator"
        ) from e
    return time.perf_counter() - t0


def _file_mib(path: str) -> float:
    data = path + ".data"
    size = os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)
    return size / 2**20


# ------------------------------------------------------------------------------------------------ backends


def torch_forward(model: Any, device: str, channels_last: bool) -> Forward:
    """Logits ``[N, K]`` of a host batch ``[N, 3, H, W]`` float32 through a copy of ``model`` on ``device``."""
    import torch

    from raycv.annotation.actor import to_channels_last

    model = copy.deepcopy(model).to(device)  # .to() and to_channels_last change a module in place
    model = to_channels_last(model) if channels_last else model

    def forward(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return model(x).float().cpu().numpy()  # type: ignore[no-any-return]

    return forward


def ort_forward(path: str, provider: str, threads: int) -> tuple[Forward | None, str | None]:
    """(forward through an onnxruntime session on ``provider``, None), or (None, why it is skipped)."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return None, (
            f"onnxruntime {ort.__version__} has no {provider} (available: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=[provider])
    if session.get_providers()[0] != provider:  # e.g. CUDA libraries missing: ORT falls back silently
        return None, f"{provider} did not load (session providers: {session.get_providers()})"
    name = session.get_inputs()[0].name

    def forward(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]  # type: ignore[no-any-return]

    return forward, None


def backends(model: Any, path: str, threads: int, cuda: bool) -> tuple[dict[str, Forward], dict[str, str]]:
    """({name: forward} in timing order, {name: why skipped})."""
    import torch

    forwards = {
        "torch_eager": torch_forward(model, "cpu", channels_last=False),
        "torch_channels_last": torch_forward(model, "cpu", channels_last=True),
    }
    skipped: dict[str, str] = {}
    ort_cpu, why = ort_forward(path, "CPUExecutionProvider", threads)
    if ort_cpu is None:
        raise RuntimeError(f"onnxruntime cannot run on the CPU: {why}")
    forwards["onnxruntime_cpu"] = ort_cpu
    if not cuda:
        reason = "--no-cuda" if torch.cuda.is_available() else "no CUDA device"
        skipped.update(dict.fromkeys(("torch_cuda", "torch_cuda_channels_last", "onnxruntime_cuda"), reason))
        return forwards, skipped
    forwards["torch_cuda"] = torch_forward(model, "cuda", channels_last=False)
    forwards["torch_cuda_channels_last"] = torch_forward(model, "cuda", channels_last=True)
    ort_cuda, why = ort_forward(path, "CUDAExecutionProvider", threads)
    if ort_cuda is None:
        skipped["onnxruntime_cuda"] = why or ""
    else:
        forwards["onnxruntime_cuda"] = ort_cuda
    return forwards, skipped


# ------------------------------------------------------------------------------------------------ timing


def time_forward(forward: Forward, batches: list[np.ndarray], warmup: int) -> tuple[float, np.ndarray]:
    """(img/s over all ``batches`` after ``warmup`` untimed ones, the logits of all images in order)."""
    for batch in itertools.islice(itertools.cycle(batches), warmup):
        forward(batch)
    t0 = time.perf_counter()
    outputs = [forward(batch) for batch in batches]  # each ends with a copy to the host: no async work left
    seconds = time.perf_counter() - t0
    return sum(len(b) for b in batches) / seconds, np.concatenate(outputs)


def random_batches(n: int, batch_size: int, image_size: int, seed: int) -> list[np.ndarray]:
    """``n`` images of standard-normal float32 pixels, ``[B, 3, H, W]`` each (the last one may be smaller)."""
    rng = np.random.default_rng(seed)
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    return [rng.standard_normal((b, 3, image_size, image_size), dtype=np.float32) for b in sizes]


def measure(
    forwards: dict[str, Forward], batches: list[np.ndarray], warmup: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """({backend: img/s of each round}, {backend: max |logits - torch_eager's logits|})."""
    rates: dict[str, list[float]] = {name: [] for name in forwards}
    diffs: dict[str, float] = {}
    reference: np.ndarray | None = None
    for _ in range(rounds):
        for name, forward in forwards.items():
            rate, logits = time_forward(forward, batches, warmup)
            rates[name].append(rate)
            reference = logits if reference is None else reference  # torch_eager runs first
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(logits - reference).max()))
    return rates, diffs


def _reference_of(name: str) -> tuple[str, str]:
    """The (NCHW, channels_last) torch backends on ``name``'s device: its ratios' denominators."""
    return (
        ("torch_cuda", "torch_cuda_channels_last")
        if "cuda" in name
        else ("torch_eager", "torch_channels_last")
    )


def summarise(rates: dict[str, list[float]], diffs: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per backend: best img/s, each round's, ratios vs torch on the same device, max abs diff."""
    best = {name: max(r) for name, r in rates.items()}
    rows = {}
    for name, rounds in rates.items():
        eager, channels_last = _reference_of(name)
        rows[name] = {
            "device": "cuda" if "cuda" in name else "cpu",
            "images_per_s": best[name],
            "images_per_s_rounds": rounds,
            "ratio_vs_torch_eager": C.ratio(best[name], best[eager]),
            "ratio_vs_torch_channels_last": C.ratio(best[name], best[channels_last]),
            "max_abs_diff_vs_torch_eager": diffs[name],
        }
    return rows


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    import onnxruntime as ort
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = build_model(args.arch, num_classes=args.num_classes, image_size=args.image_size, seed=args.seed)
    with C.workdir(args.workdir) as wd:
        path = os.path.join(wd, f"{args.arch}-{args.image_size}.onnx")
        export_s = export_onnx(model, path, args.image_size)
        cuda = torch.cuda.is_available() and not args.no_cuda
        forwards, skipped = backends(model, path, args.threads, cuda)
        batches = random_batches(args.n, args.batch_size, args.image_size, args.seed)
        rates, diffs = measure(forwards, batches, args.warmup, args.rounds)
        file_mib = _file_mib(path)
    rows = summarise(rates, diffs)
    cpu_diff = max(r["max_abs_diff_vs_torch_eager"] for r in rows.values() if r["device"] == "cpu")
    results = {
        "arch": args.arch,
        "image_size": args.image_size,
        "num_classes": args.num_classes,
        "batch_size": args.batch_size,
        "images": args.n,
        "threads": args.threads,
        "warmup_batches": args.warmup,
        "rounds": args.rounds,
        "onnxruntime": ort.__version__,
        "onnx_export_s": export_s,
        "onnx_file_mib": file_mib,
        "backends": rows,
        "skipped": skipped,
        "max_abs_diff_cpu": cpu_diff,
        "cpu_outputs_agree": cpu_diff < CPU_TOLERANCE,
        "cpu_tolerance": CPU_TOLERANCE,
        "cuda_tf32_conv": bool(torch.backends.cudnn.allow_tf32) if cuda else None,
        "load_avg_1min": [load_before[0], os.getloadavg()[0]],
    }
    table: list[tuple[str, Any]] = [
        (
            name,
            f"{r['images_per_s']:7.1f} img/s  {r['ratio_vs_torch_eager']:.2f}x eager  "
            f"{r['ratio_vs_torch_channels_last']:.2f}x channels_last  max|diff| {r['max_abs_diff_vs_torch_eager']:.1e}"
            f"  (rounds: {' '.join(f'{v:.1f}' for v in r['images_per_s_rounds'])})",
        )
        for name, r in rows.items()
    ]
    table += [(f"{name} skipped", why) for name, why in skipped.items()]
    table += [("ONNX export s, file MiB", f"{export_s:.1f}, {file_mib:.1f}")]
    table += [("load average (1 min) before, after", " ".join(f"{v:.2f}" for v in results["load_avg_1min"]))]
    return C.print_and_report(
        "onnx_vs_torch",
        args,
        results,
        title=f"ONNX Runtime {ort.__version__} vs torch {torch.__version__}: {args.arch} @ {args.image_size}, "
        f"batch {args.batch_size}, {args.threads} thread(s), {args.n} images x {args.rounds} round(s), best round",
        rows=table,
        target=TARGET,
    )


if __name__ == "__main__":
    main()
