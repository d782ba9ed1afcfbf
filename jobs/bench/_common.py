"""Shared pieces of the benchmarks in ``jobs/bench/``, re-exported from the modules that hold them
(the scripts use ``from . import _common as C``):

- ``_cli``: the arguments every benchmark takes, machine info, tables, the JSON document, ``fmt``, ``ratio``
- ``_inputs``: the work folder, generated archives, a run directory with random weights, the fixed-cost
  benchmark model, decoded pixels
- ``_ray``: the Ray session, one run of the annotation pipeline with its steady and mid-run rates, the
  niceness of Ray's workers
- ``_baseline``: baselines outside Ray, in fresh processes at the workers' niceness: a script's function,
  the bare model on pre-decoded pixels
- and here: :func:`annotate_as_args`, one pipeline run with the layout of a script's command line

Every benchmark reports ratios against a baseline measured in the same run (same process, same machine,
same minutes), because absolute img/s on a shared machine move with whatever else runs there.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._baseline import bare_model_rate, call_niced, call_niced_concurrently, omp_env, set_niceness
from ._cli import GPU_ARCHS, base_parser, fmt, machine_info, print_and_report, print_table, ratio, report
from ._inputs import (
    FIXED_COST_ARCH,
    decoded_pixels,
    inputs,
    make_archive,
    make_run,
    register_bench_models,
    workdir,
)
from ._ray import annotate, auto_or, mid_run_rate, ray_session, ray_worker_niceness, sizing, steady_rate


def annotate_as_args(
    args: argparse.Namespace,
    run_dir: str,
    source: str | list[str],
    output: str,
    *,
    gpus_per_actor: float,
    speed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`annotate` with the script's ``--batch-size``, ``--actors``, ``--cpus-per-actor``,
    ``--endpoint-url`` and ``--address``."""
    given = {
        k: getattr(args, k) for k in ("batch_size", "actors", "cpus_per_actor", "endpoint_url", "address")
    }
    return annotate(run_dir, source, output, gpus_per_actor=gpus_per_actor, speed=speed, **given)


__all__ = [
    "FIXED_COST_ARCH",
    "GPU_ARCHS",
    "annotate",
    "annotate_as_args",
    "auto_or",
    "bare_model_rate",
    "base_parser",
    "call_niced",
    "call_niced_concurrently",
    "decoded_pixels",
    "fmt",
    "inputs",
    "machine_info",
    "make_archive",
    "make_run",
    "mid_run_rate",
    "omp_env",
    "print_and_report",
    "print_table",
    "ratio",
    "ray_session",
    "ray_worker_niceness",
    "register_bench_models",
    "report",
    "set_niceness",
    "sizing",
    "steady_rate",
    "workdir",
]
