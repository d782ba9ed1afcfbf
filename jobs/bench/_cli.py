"""Arguments and reporting of the benchmarks in ``jobs/bench/``: the shared command line, machine info,
tables, the JSON document of a run.
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
from collections.abc import Sequence
from typing import Any

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


def print_and_report(
    name: str,
    args: argparse.Namespace,
    results: dict[str, Any],
    *,
    title: str,
    rows: Sequence[tuple[str, Any]],
    target: str,
) -> dict[str, Any]:
    """A benchmark's last step: :func:`print_table` of ``rows`` and a last row naming the target, then
    :func:`report`'s JSON document (returned)."""
    print_table(title, [*rows, ("target", target)])
    return report(name, args, results, target=target)


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b
