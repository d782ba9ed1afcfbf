"""Inputs of the benchmarks in ``jobs/bench/``: the work folder, generated archives, a run directory with
random weights, the fixed-cost benchmark model, and the decoded pixels the model actors receive.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from raycv.storage import Storage

# ------------------------------------------------------------------------------------------------ work folder


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
    root: str, *, n: int, size: int, fmt: str = "jpg", seed: int = 0, store: Storage | None = None
) -> list[str]:
    """``n`` generated shape images (``size`` px square) under ``root``; returns their URIs in order.

    Files already there (same name) are kept, so a larger ``n`` reuses a smaller run's files.
    """
    from PIL import Image

    from raycv import storage
    from raycv.data import synthetic_scenes
    from raycv.storage import Storage

    store = store or Storage()

    def one(i: int) -> str:
        uri = storage.join(root, f"{i:06d}.{fmt}")
        if storage.scheme(uri) == "file" and os.path.exists(uri):
            return uri
        rng = np.random.default_rng([seed, i])
        label = i % len(synthetic_scenes.CLASSES)
        pixels = synthetic_scenes.render_classification_sample(rng, label, size=size)
        import io

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG" if fmt == "jpg" else "PNG", quality=90)
        store.write_bytes(uri, buf.getvalue())
        return uri

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(n)))


def inputs(args: argparse.Namespace, wd: str) -> tuple[list[str], str]:
    """(the image URIs, the source the pipeline plans from): ``--input``, else a generated archive."""
    from raycv.annotation.pipeline import plan_inputs
    from raycv.storage import Storage

    if args.input:
        return [u for u, _ in plan_inputs(args.input, Storage(endpoint_url=args.endpoint_url))], args.input
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
    store: Storage | None = None,
) -> str:
    """A raycv run directory (``model.json`` + ``model.pt``) holding ``arch`` with random weights.

    This is what ``raycv train`` leaves behind, minus the training: annotation loads it the same way.
    Returns the model_id.
    """
    import torch

    from raycv import storage
    from raycv.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from raycv.models import create_model, get_model_info, saved
    from raycv.storage import Storage
    from raycv.training import run_directory

    store = store or Storage()
    task = get_model_info(arch).task
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=num_classes, image_size=image_size, **(options or {}))
    model_id = run_directory.save_weights(
        storage.join(run_dir, saved.WEIGHTS), model.state_dict(), store.endpoint_url
    )
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
    store.write_json(storage.join(run_dir, saved.MODEL_CARD), card)
    return model_id


# scaling.py ships register_bench_models to Ray workers by value (register_pickle_by_value of this
# module), with the globals it uses: keep those in this module or in installed packages.
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


def decoded_pixels(uris: Sequence[str], size: int, store: Storage | None = None) -> np.ndarray:
    """[N, size, size, 3] uint8: exactly what the annotation pipeline's read stage hands the model actors."""
    from raycv.annotation.pipeline import read_decode_batch
    from raycv.outputs import schema as outputs
    from raycv.storage import Storage

    out = []
    for i in range(0, len(uris), 64):
        chunk = list(uris[i : i + 64])
        plan = {  # the columns of the pipeline's plan blocks
            "image_id": np.array([outputs.image_id_of(u) for u in chunk], dtype=object),
            "image_uri": np.array(chunk, dtype=object),
            "source_etag": np.array([""] * len(chunk), dtype=object),
        }
        batch = read_decode_batch(plan, size_hw=(size, size), store=store or Storage(), max_pixels=1 << 30)
        out.append(batch["pixels"])
    return np.concatenate(out)
