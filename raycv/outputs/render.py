"""``raycv render``: an annotation output drawn on its source images, one PNG per image.

Segmentation label maps are blended in class colours with a legend of the classes present; detections are
boxes tagged with label and score (instance masks blended too); classifications get their label and score
on a band across the top, over the Grad-CAM heatmap when the row has one. Images are scaled down so that
the longer side is at most ``max_side``. Error rows have nothing to draw and are skipped (counted).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from raycv import storage
from raycv.data import draw as viz
from raycv.data.files import decode_file
from raycv.data.images import DEFAULT_MAX_PIXELS, decode_png_mask
from raycv.outputs import schema as outputs
from raycv.outputs.read import (
    Where,
    applies_to_objects,
    filter_table,
    iter_rows,
    read_objects,
    task_of,
)
from raycv.storage import Storage
from raycv.tasks.registry import Task


@dataclass
class RenderSummary:
    out_dir: str
    written: list[str] = field(default_factory=list)
    skipped_errors: int = 0
    failed: list[str] = field(default_factory=list)  # "image_uri: reason" of sources that could not be read


def output_name(image_uri: str, image_id: str) -> str:
    """``<stem>-<8 hex of image_id>.png``: readable, and distinct for equal names in different folders."""
    stem = posixpath.splitext(posixpath.basename(image_uri.split(outputs.FRAME_SUFFIX)[0]))[0]
    frame = re.search(re.escape(outputs.FRAME_SUFFIX) + r"(\d+)$", image_uri)
    if frame:
        stem += f"_frame{frame[1]}"
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:80]}-{image_id[:8]}.png"


def load_source(row: dict[str, Any], task: Task, max_side: int, store: Storage) -> np.ndarray:
    """The row's source image as [h, w, 3] uint8 RGB, scaled down to ``max_side`` (as it was annotated:
    EXIF orientation applied, the frame of a multi-frame file, GeoTIFFs of segmentation through rasterio)."""
    from raycv.data import geotiff

    uri = row["image_uri"]
    source = uri if row.get("frame") is None else uri.rsplit(outputs.FRAME_SUFFIX, 1)[0]
    if task.label_maps and geotiff.is_geotiff(source):
        return _read_raster(source, max_side, store)
    frames = decode_file(store.read_bytes(source), source, max_pixels=4 * DEFAULT_MAX_PIXELS)
    return viz.fit(frames[int(row.get("frame") or 0)], max_side)


def _read_raster(uri: str, max_side: int, store: Storage) -> np.ndarray:
    """A GeoTIFF read decimated by GDAL (overviews when present) to ``max_side``, bands 1-3 stretched
    between their 2nd and 98th percentiles for display."""
    from rasterio.enums import Resampling

    from raycv.data import geotiff

    with geotiff.open_raster(uri, store) as ds:
        scale = min(1.0, max_side / max(ds.width, ds.height))
        h, w = max(1, round(ds.height * scale)), max(1, round(ds.width * scale))
        bands = [1, 2, 3] if ds.count >= 3 else [1, 1, 1]
        data = ds.read(bands, out_shape=(3, h, w), resampling=Resampling.average).astype(np.float64)
    out = np.empty((h, w, 3), np.uint8)
    for b in range(3):
        lo, hi = np.percentile(data[b], (2, 98))
        out[..., b] = np.clip(np.rint((data[b] - lo) / max(hi - lo, 1e-9) * 255), 0, 255)
    return out


def draw_row(
    image: np.ndarray, row: dict[str, Any], task: Task, objects: list[dict[str, Any]] | None = None
) -> Image.Image:
    """Draw one row's predictions on its (possibly scaled) source image."""
    if task.label_maps and row.get("mask_png"):
        return _draw_segmentation(image, row)
    if task.objects:
        return _draw_detections(image, row, objects or [])
    if row.get("gradcam_png"):
        from raycv.models.gradcam import decode_heatmap

        image = viz.blend_heatmap(image, decode_heatmap(row["gradcam_png"]))
    im = Image.fromarray(image)
    if row.get("label_name") is not None or row.get("label") is not None:
        name = row.get("label_name") if row.get("label_name") is not None else row.get("label")
        viz.draw_caption(im, f"{name} {row['score']:.2f}" if row.get("score") is not None else str(name))
    return im


def _draw_segmentation(image: np.ndarray, row: dict[str, Any]) -> Image.Image:
    labels = decode_png_mask(row["mask_png"])
    present = row.get("class_pixels") or [
        {"label": int(k), "label_name": str(k), "pixels": int(n)}
        for k, n in zip(*np.unique(labels, return_counts=True), strict=True)
    ]
    skip = [c["label"] for c in present if str(c["label_name"]).lower() in viz.BACKGROUND_NAMES]
    im = Image.fromarray(viz.blend_labels(image, labels, skip=skip))
    total = max(sum(c["pixels"] for c in present), 1)
    viz.draw_legend(
        im,
        [
            (viz.colour_of(c["label"]), f"{c['label_name']} {100 * c['pixels'] / total:.1f}%")
            for c in sorted(present, key=lambda c: -c["pixels"])
            if c["label"] not in skip
        ],
    )
    return im


def _draw_detections(image: np.ndarray, row: dict[str, Any], objects: list[dict[str, Any]]) -> Image.Image:
    from raycv.data.rle import decode_rle

    for obj in objects:
        if obj.get("mask_rle_counts"):
            mask = decode_rle(obj["mask_rle_size"], obj["mask_rle_counts"])
            image = viz.blend_mask(image, mask, viz.colour_of(obj["label"]))
    im = Image.fromarray(image)
    sx = im.size[0] / (row.get("width") or im.size[0])
    sy = im.size[1] / (row.get("height") or im.size[1])
    viz.draw_boxes(
        im,
        [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in (o["box"] for o in objects)],
        [o["label"] for o in objects],
        [
            f"{o['label_name'] if o['label_name'] is not None else o['label']} {o['score']:.2f}"
            for o in objects
        ],
    )
    return im


def _objects_by_image(output: str, where: Where | None, store: Storage) -> dict[str, list[dict]]:
    objects = read_objects(output, store)
    if where is not None:
        objects = filter_table(objects, where)
    by_image: dict[str, list[dict]] = {}
    for obj in objects.to_pylist():
        by_image.setdefault(obj["image_id"], []).append(obj)
    return by_image


def _selected_rows(
    output: str,
    task: Task | None,
    where: Where | None,
    objects: dict[str, list[dict]] | None,
    store: Storage,
) -> Iterator[tuple[pa.Table, int]]:
    """(ok rows to draw, error rows left out), file by file."""
    on_objects = where is not None and applies_to_objects(where, task)
    for table in iter_rows(output, store, None if on_objects else where):
        ok = table.filter(pc.equal(table["status"], "ok"))
        errors = table.num_rows - ok.num_rows
        if on_objects and objects is not None:
            ok = ok.filter(pc.is_in(ok["image_id"], pa.array(list(objects), pa.string())))
        yield ok, errors


def render_output(
    output: str,
    out_dir: str,
    store: Storage,
    *,
    limit: int | None = None,
    where: Where | None = None,
    max_side: int = 2048,
) -> RenderSummary:
    """Render up to ``limit`` ok rows of ``output`` (those ``where`` selects) as PNGs into ``out_dir``.

    With a detection output, a ``where`` on object columns (``score``, ``label``, ``label_name``) selects
    the objects to draw, and the images holding at least one of them.
    """
    task = task_of(output, store)
    summary = RenderSummary(out_dir)
    objects = None
    if task is not None and task.objects:
        on_objects = where is not None and applies_to_objects(where, task)
        objects = _objects_by_image(output, where if on_objects else None, store)
    for table, errors in _selected_rows(output, task, where, objects, store):
        summary.skipped_errors += errors
        if task is None:  # no row names a task: only error rows, nothing to draw
            continue
        for row in table.to_pylist():
            if limit is not None and len(summary.written) >= limit:
                return summary
            try:
                image = load_source(row, task, max_side, store)
            except Exception as exc:  # a source moved or deleted since annotation: say so, go on
                summary.failed.append(f"{row['image_uri']}: {type(exc).__name__}: {exc}")
                continue
            im = draw_row(image, row, task, None if objects is None else objects.get(row["image_id"], []))
            dst = storage.join(out_dir, output_name(row["image_uri"], row["image_id"]))
            store.write_bytes(dst, viz.png_bytes(im))
            summary.written.append(dst)
    return summary
