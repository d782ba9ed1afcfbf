"""``raycv demo``: the whole path on generated data with a local Ray, in a few minutes on 2 CPUs.

It generates a labelled shapes dataset, trains a small classifier with 2 Ray Train workers, annotates an
unlabelled archive that includes broken and unusual files, and prints where everything is.
"""

from __future__ import annotations

import json
import os

from raycv.config import AnnotateConfig, TrainConfig
from raycv.outputs import schema as outputs
from raycv.runtime import ensure_ray
from raycv.storage import Storage


def run_demo(workdir: str) -> None:
    import pyarrow.parquet as pq
    import ray

    from raycv.annotation.pipeline import run_annotation
    from raycv.data.special_images import make_special_images
    from raycv.data.synthetic import write_flat_archive, write_imagefolder
    from raycv.training.loop import run_training

    root = os.path.abspath(workdir)
    dataset, archive = os.path.join(root, "dataset"), os.path.join(root, "archive")
    run_dir, out = os.path.join(root, "runs", "shapes"), os.path.join(root, "annotations", "shapes")
    print(f"[demo] 1/3 generating a shapes dataset in {dataset}", flush=True)
    store = Storage()  # local folders: no endpoint is used
    write_imagefolder(dataset, n_per_class=150, size=32, seed=0, store=store)
    truth = write_flat_archive(archive, n=60, size=48, seed=1, store=store)
    for name, data in make_special_images().items():
        store.write_bytes(os.path.join(archive, "edge_cases", name), data)

    if not ray.is_initialized():
        # The demo's epochs take under a second: Ray Train's default 2 s poll of its workers would pace them.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        ensure_ray(num_cpus=max(2, os.cpu_count() or 2))
    print("[demo] 2/3 training simple_cnn with 2 Ray Train workers", flush=True)
    train_cfg = TrainConfig.model_validate(
        {
            "model": {"arch": "simple_cnn"},
            "data": {"train": dataset, "image_size": 32, "val_fraction": 0.2},
            "train": {"epochs": 8, "batch_size": 8, "lr": 0.003, "augment": {"hflip": 0.5}},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
            "output": {"dir": run_dir},
        }
    )
    result = run_training(train_cfg)
    print("[demo] 3/3 annotating the archive (model actors sized from the machine: actors auto)", flush=True)
    ann_cfg = AnnotateConfig.model_validate(
        {
            "model": run_dir,
            "input": archive,
            "output": out,
            "batch_size": 32,
        }
    )
    summary = run_annotation(ann_cfg)
    table = pq.read_table(os.path.join(out, outputs.IMAGES_DIR))
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    correct = sum(rows[u]["label"] == lb for u, lb in truth.items() if rows.get(u, {}).get("status") == "ok")
    errors = [
        (os.path.basename(r["image_uri"]), r["error_stage"], r["error_type"], r["error_message"] or "")
        for r in rows.values()
        if r["status"] == "error"
    ]
    print("\n=== raycv demo ===")
    print(f"trained: {json.dumps(result.best_metrics)}")
    print(
        f"annotated: {summary.total} images, {summary.ok} ok, {summary.error} error rows; "
        f"accuracy on the labelled part of the archive {correct}/{len(truth)}"
    )
    for name, stage, kind, message in sorted(errors):
        reason = message.split(": ", 1)[-1]  # DecodeError messages start with the image's URI
        print(f"  error row: {name:<14} stage={stage:<7} {kind}: {reason[:80]}")
    print(
        f"\nrun directory: {run_dir}\nannotations:   {out}/images (Parquet)\nsummary:       {out}/_summary.json"
    )
