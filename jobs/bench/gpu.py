"""GPU figures in one JSON: bare-model forward img/s in fp32 vs bf16 + channels_last, and JPEG decode img/s
with nvJPEG vs raycv's CPU decode. Run by ``jobs/bench/gpu.sh`` on the GPU machine (with the GPU tests).

Models (registry names, random weights, eval mode; ``--tiny``: the ``test_*`` models at 32 px):

    resnet50 @224 batch 128, deeplabv3_resnet50 @512 batch 16, maskrcnn_resnet50_fpn @800 batch 8,
    yolo_s @640 batch 32

Each model runs three variants on the same random ``[B, 3, S, S]`` pixels in 0..1, already on the device
(so the figures are the model's alone, no copy or decode): ``fp32`` NCHW (the ratios' reference), ``fp32``
channels_last and ``bf16`` autocast + channels_last, the speed options of ``annotate`` (raycv's own
``autocast``/``to_channels_last``). R-CNN models (a ``backbone`` and ``roi_heads``) run bf16 in the backbone
only and their heads, box decoding and NMS in fp32, as raycv's detector actor does (``autocast_scope``).
Each variant runs ``--warmup`` untimed batches (allocation, cuDNN's algorithm search with
``cudnn.benchmark``), then batches until ``--seconds`` have passed (at least ``--min-iters``), timed from a
``torch.cuda.synchronize()`` to another under ``torch.inference_mode``.

Decode: nvJPEG vs raycv's CPU decode on the same generated JPEGs (``jobs/bench/gpu_decode.py``).

A global ``--budget-s`` guard skips what is left, with a note, once the time is spent; the JSON is rewritten
after every item, so a run stopped by ``timeout`` still leaves the finished rows. No Ray is imported (the GPU
machine's image has none); ``--tests-log``/``--tests-rc`` merge the GPU tests' pytest output (gpu.sh).

    python -m jobs.bench.gpu --out gpu.json                        # on a GPU (not yet run on one)
    python -m jobs.bench.gpu --device cpu --tiny --out tiny.json   # the logic on a CPU (< 1 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._cli import _cpu_model, _git_commit, print_table, ratio
from .gpu_decode import bench_decode

TARGET = "none (a comparison): bf16 + channels_last vs fp32, nvJPEG vs CPU decode, on one GPU"


@dataclass(frozen=True)
class ModelCase:
    name: str  # registry name
    batch: int
    image_size: int
    num_classes: int


MODELS = (
    ModelCase("resnet50", 128, 224, 1000),
    ModelCase("deeplabv3_resnet50", 16, 512, 21),
    ModelCase("maskrcnn_resnet50_fpn", 8, 800, 91),
    ModelCase("yolo_s", 32, 640, 80),
)
TINY_MODELS = (
    ModelCase("test_classifier", 2, 32, 3),
    ModelCase("test_segmenter", 2, 32, 3),
    ModelCase("test_instance_segmenter", 2, 32, 3),
    ModelCase("test_detector", 2, 32, 3),
)
_PYTEST_SUMMARY = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?|xfailed)\b.* in [\d.]+s")
# (precision, channels_last): the first is every ratio's reference.
VARIANTS = (("fp32", False), ("fp32", True), ("bf16", True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the logic")
    p.add_argument("--tiny", action="store_true", help="test_* models, tiny images, few iterations (CPU)")
    p.add_argument("--out", "--json", dest="out", default="gpu.json", help="the JSON written")
    p.add_argument("--models", nargs="+", default=None, help="registry names (default: the four above)")
    p.add_argument(
        "--seconds", type=float, default=None, help="timed seconds per variant (default 3; tiny 0)"
    )
    p.add_argument("--min-iters", type=int, default=None, help="timed batches at least (default 5; tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches (default 3; tiny 1)")
    p.add_argument("--decode-images", type=int, default=None, help="JPEGs decoded (default 256; tiny 8)")
    p.add_argument("--decode-batch", type=int, default=64, help="JPEGs per nvJPEG call")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip what is left after this many seconds")
    p.add_argument("--tests-log", default=None, help="the GPU tests' pytest output, merged into the JSON")
    p.add_argument("--tests-rc", default=None, help="their exit code, or a note why they did not run")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {"seconds": 0.0 if tiny else 3.0, "min_iters": 1 if tiny else 5, "warmup": 1 if tiny else 3}
    defaults["decode_images"] = 8 if tiny else 256
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.min_iters < 1 or args.decode_images < 1 or args.decode_batch < 1:
        p.error("--min-iters, --decode-images and --decode-batch must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------ models


def _cases(args: argparse.Namespace) -> list[ModelCase]:
    cases = TINY_MODELS if args.tiny else MODELS
    if not args.models:
        return list(cases)
    known = {c.name: c for c in (*MODELS, *TINY_MODELS)}
    size = 64 if args.tiny else 224
    return [known.get(name, ModelCase(name, 4 if args.tiny else 32, size, 10)) for name in args.models]


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _call_form(model: Any, x: Any) -> bool:
    """True when the model takes a list of ``[3, H, W]`` images (detectors), False for a batched tensor."""
    import torch

    with torch.inference_mode():
        try:
            model(x[:1])
            return False
        except (ValueError, TypeError, RuntimeError, AssertionError):
            model(list(x[:1]))  # raises if neither form works: the row records the error
            return True


def time_forward(
    model: Any, inputs: Any, *, device: str, precision: str, warmup: int, min_iters: int, seconds: float
) -> tuple[float, int, float]:
    """(img/s, timed batches, timed seconds) of ``model(inputs)``; ``inputs`` is a batch or a list of images.

    No sync inside the loop: the GPU queue is drained by the last ``synchronize``, so the elapsed time
    covers every launched batch; the stop test only decides how many are launched.
    """
    import torch

    from raycv.annotation.actor import autocast

    sync = _sync(device)
    n_images = len(inputs)
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(warmup):
            model(inputs)
        sync()
        t0 = time.perf_counter()
        iters = 0
        while iters < min_iters or time.perf_counter() - t0 < seconds:
            model(inputs)
            iters += 1
        sync()
        elapsed = time.perf_counter() - t0
    return iters * n_images / elapsed, iters, elapsed


def bench_model(case: ModelCase, args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """One row per variant (fp32 NCHW, fp32 channels_last, bf16 channels_last) of one registry model."""
    import torch

    from raycv.annotation.actor import to_channels_last
    from raycv.annotation.detector import _autocast_forward
    from raycv.models import create_model, get_model_info

    task = get_model_info(case.name).task
    torch.manual_seed(0)
    model = create_model(case.name, num_classes=case.num_classes, image_size=case.image_size)
    model = model.eval().to(args.device)
    x = torch.rand(case.batch, 3, case.image_size, case.image_size, device=args.device)
    takes_list = _call_form(model, x)
    # raycv's detector actor: R-CNNs autocast the backbone only (bf16 box corners would be rounded)
    rcnn = hasattr(model, "roi_heads") and hasattr(model, "backbone")
    base = {"model": case.name, "task": task, "batch": case.batch, "image_size": case.image_size}
    rows: list[dict[str, Any]] = []
    for precision, channels_last in VARIANTS:
        row = {**base, "precision": precision, "channels_last": channels_last}
        if time.monotonic() > deadline:
            rows.append({**row, "img_s": None, "skipped": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        if channels_last and not any(r["channels_last"] for r in rows):
            to_channels_last(model)  # in place, kept for the later variants
            x = x.contiguous(memory_format=torch.channels_last)
        whole = precision == "fp32" or not rcnn
        if not whole:  # bf16 is the last variant: the wrapped backbone serves no fp32 row
            _autocast_forward(model.backbone, args.device, precision)
        inputs = list(x) if takes_list else x
        img_s, iters, seconds = time_forward(
            model,
            inputs,
            device=args.device,
            precision="fp32" if not whole else precision,
            warmup=args.warmup,
            min_iters=args.min_iters,
            seconds=args.seconds,
        )
        row.update(img_s=img_s, iters=iters, seconds=seconds, input="list" if takes_list else "tensor")
        row["autocast_scope"] = None if precision == "fp32" else ("whole" if whole else "backbone")
        rows.append(row)
    reference = rows[0].get("img_s")
    for row in rows:
        row["ratio_vs_fp32"] = ratio(row.get("img_s"), reference)
    return rows


# ------------------------------------------------------------------------------------------------ report


def machine(device: str) -> dict[str, Any]:
    """Where it ran: the GPU's name (or the CPU's), library versions, date, command line, raycv commit."""
    import importlib.metadata

    import torch
    import torchvision

    cuda = device == "cuda" and torch.cuda.is_available()
    try:
        ray_version = importlib.metadata.version("ray")  # metadata only: importing Ray is not needed here
    except importlib.metadata.PackageNotFoundError:
        ray_version = None
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu: {_cpu_model()}",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray_version,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "raycv_commit": _git_commit(),
    }


def gpu_tests(log: str | None, rc: str | None) -> dict[str, Any]:
    """The GPU tests' result from gpu.sh: exit code (or why not run), pytest's summary line, the log's end."""
    if log is None:
        return {"ran": False, "note": "not run by this command (jobs/bench/gpu.sh runs them)"}
    try:
        with open(log) as f:
            lines = f.read().splitlines()
    except OSError as e:
        return {"ran": False, "note": f"no log at {log}: {e}"}
    ran = rc is not None and rc.lstrip("-").isdigit()
    summary = next((ln.strip("= ") for ln in reversed(lines) if _PYTEST_SUMMARY.search(ln)), None)
    return {
        "ran": ran,
        "exit_code": int(rc) if ran and rc is not None else None,
        "note": None if ran else rc,
        "summary": summary if ran else None,
        "log_tail": lines[-25:],
    }


def _write(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu for a dry run")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithm (warm-up)
    doc: dict[str, Any] = {
        "benchmark": "gpu",
        "target": TARGET,
        "machine": machine(args.device),
        "args": vars(args),
        "settings": {
            "cudnn_benchmark": True,
            "tf32_conv": bool(torch.backends.cudnn.allow_tf32),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        },
        "gpu_tests": gpu_tests(args.tests_log, args.tests_rc),
        "models": [],
        "decode": [],
        "skipped": [],
    }
    for case in _cases(args):
        if time.monotonic() > deadline:
            doc["skipped"].append({"model": case.name, "why": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        try:
            doc["models"] += bench_model(case, args, deadline)
        except Exception as e:  # one model's failure (out of memory, an operator) must not lose the others
            doc["models"].append({"model": case.name, "img_s": None, "error": f"{type(e).__name__}: {e}"})
        if args.device == "cuda":
            torch.cuda.empty_cache()
        doc["wall_s"] = time.monotonic() - start
        _write(args.out, doc)
    side, src_wh = (32, (128, 96)) if args.tiny else (224, (1024, 768))
    if time.monotonic() > deadline:
        doc["skipped"].append({"decode": "all", "why": f"time budget of {args.budget_s:.0f} s spent"})
    else:
        doc["decode"] = bench_decode(args, side, src_wh)
    doc["wall_s"] = time.monotonic() - start
    _write(args.out, doc)
    _print(doc)
    print(f"\nwrote {args.out}")
    return doc


def _print(doc: dict[str, Any]) -> None:
    def figure(row: dict[str, Any], key: str) -> str:
        if row.get("img_s") is None:
            return row.get("skipped") or row.get("error") or "n/a"
        return f"{row['img_s']:9.1f} img/s  {row[key]:.2f}x"

    rows = [
        (
            f"{r['model']} {r.get('precision', '')} {'NHWC' if r.get('channels_last') else 'NCHW'}",
            figure(r, "ratio_vs_fp32"),
        )
        for r in doc["models"]
    ]
    rows += [(f"decode {r['decoder']}", figure(r, "ratio_vs_cpu")) for r in doc["decode"]]
    rows += [("gpu tests", doc["gpu_tests"].get("summary") or doc["gpu_tests"].get("note"))]
    rows += [("wall s", doc["wall_s"])]
    print_table(f"GPU benchmark on {doc['machine']['device']}", rows)


if __name__ == "__main__":
    main()
