"""Annotation outputs written directly (no Ray): rows of the real schemas from generated scenes, so the
tests of render/inspect/export know exactly what each row holds."""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycv.data.images import encode_png
from raycv.data.rle import encode_rle
from raycv.data.synthetic_scenes import CLASSES, render_scene
from raycv.outputs import schema as outputs


def common(uri: str, *, task: str, status: str = "ok", width=None, height=None, **extra) -> dict:
    row = {
        "image_id": outputs.image_id_of(uri),
        "image_uri": uri,
        "frame": None,
        "frame_count": None,
        "source_etag": "e",
        "status": status,
        "error_stage": "decode" if status == "error" else None,
        "error_type": "DecodeError" if status == "error" else None,
        "error_message": f"cannot decode {uri}: not an image" if status == "error" else None,
        "width": width,
        "height": height,
        "task": task,
        "model_id": "m0",
        "run_id": "r0",
        "annotated_at": dt.datetime.now(dt.timezone.utc),
        "crs": None,
        "transform": None,
    }
    row.update(extra)
    return row


def write_images(
    out: str, rows: list[dict], task: str, extra_fields: list[pa.Field] = (), name="part-0"
) -> None:
    schema = outputs.images_schema(task)
    for f in extra_fields:
        schema = schema.append(f)
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    pq.write_table(table, os.path.join(out, "images", f"{name}.parquet"))


def write_objects(out: str, objects: list[dict], name="part-0") -> None:
    schema = outputs.objects_schema()
    os.makedirs(os.path.join(out, "objects"), exist_ok=True)
    table = pa.Table.from_pylist([{k: o.get(k) for k in schema.names} for o in objects], schema=schema)
    pq.write_table(table, os.path.join(out, "objects", f"{name}.parquet"))


def detection_output(tmp, n: int = 4, size=(60, 80), masks: bool = True) -> dict:
    """``n`` scenes of 2-3 shapes as PNGs, their ground truth written as the output's objects (scores
    0.3, 0.6, 0.9 in turn), plus one error row. Returns the paths, scenes and object rows."""
    task = "instance_segmentation" if masks else "detection"
    src, out = tmp / "src", tmp / "out"
    src.mkdir()
    rows, objects, scenes = [], [], {}
    for i in range(n):
        scene = render_scene(np.random.default_rng(i), size=size, n_objects=3, min_scale=0.3, max_scale=0.45)
        uri = str(src / f"scene{i}.png")
        with open(uri, "wb") as f:
            f.write(encode_png(scene.image))
        scenes[uri] = scene
        rows.append(common(uri, task=task, width=size[1], height=size[0]))
        for k, (box, label) in enumerate(zip(scene.boxes, scene.labels)):
            o = {
                "image_id": outputs.image_id_of(uri),
                "image_uri": uri,
                "label": int(label),
                "label_name": CLASSES[int(label)],
                "score": (0.3, 0.6, 0.9)[k % 3],
                "box": [float(v) for v in box],
            }
            if masks:
                o["mask_rle_size"], o["mask_rle_counts"] = encode_rle(scene.instance_masks[k])
            objects.append(o)
    rows.append(common(str(src / "broken.png"), task=task, status="error"))
    write_images(str(out), rows, task)
    write_objects(str(out), objects)
    return {"out": str(out), "src": str(src), "scenes": scenes, "objects": objects, "task": task}
