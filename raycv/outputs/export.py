"""``raycv export``: an annotation output in the formats other tools read.

- ``coco``: one COCO JSON (``pycocotools.coco.COCO(path)`` loads it): ``images`` (``file_name`` = the
  source URI, ``width``/``height`` original pixels), ``categories`` (``id = label + 1``; COCO ids start at
  1), ``annotations`` with ``bbox`` [x, y, w, h], ``area``, ``score``, ``iscrowd`` 0 and, for instance and
  semantic segmentation, ``segmentation`` as COCO compressed RLE. Semantic segmentation gives one
  annotation per (image, class present), background classes left out.
- ``yolo``: ``PATH/labels/<stem>.txt`` (``class cx cy w h``, normalised; an empty file for an image
  without detections), ``PATH/classes.txt``, ``PATH/images.csv`` (``stem,image_uri``), and with
  ``copy_images`` the sources under ``PATH/images/``: a dataset ``raycv train`` reads (format ``yolo``).
- ``geojson``: a FeatureCollection of polygons in map coordinates for geo-referenced rows (those with a
  ``crs``): segmentation label maps vectorised per class (``rasterio.features.shapes``, background left
  out) and detection boxes, through each row's ``transform``. Coordinates are in the rows' CRS (named in
  the legacy ``crs`` member that GDAL/QGIS read), or reprojected to ``crs`` when given (e.g. ``EPSG:4326``
  for RFC 7946 lon/lat).

Error rows are left out of every format.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raycv import storage
from raycv.data import draw as viz
from raycv.data.images import decode_png_mask
from raycv.errors import ConfigError
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

Format = Literal["coco", "yolo", "geojson"]


@dataclass
class ExportSummary:
    path: str
    images: int  # image rows exported
    items: int  # annotations (coco), label lines (yolo) or features (geojson)
    skipped: int  # error rows, and rows without geo-reference for geojson


def export_output(
    output: str,
    fmt: Format,
    path: str,
    store: Storage,
    *,
    where: Where | None = None,
    crs: str | None = None,
    copy_images: bool = False,
) -> ExportSummary:
    """Export the ok rows of ``output`` (those ``where`` selects) to ``path`` as ``fmt`` (module doc).

    Raises:
        ConfigError: a format the output's task has nothing for (e.g. boxes of a classification output).
    """
    task = task_of(output, store)
    if task is not None and not task.export_formats:
        raise ConfigError(
            "--format",
            fmt,
            f"A {task.name} output has no boxes, masks or shapes: read OUTPUT/images with pyarrow "
            f"(columns image_uri, {', '.join(f.name for f in task.image_fields)}).",
        )
    if task is not None and fmt not in task.export_formats:
        raise ConfigError(
            "--format",
            fmt,
            f"A {task.name} output exports to {' or '.join(task.export_formats)} (YOLO labels are boxes).",
        )
    rows, objects, skipped = _selected(output, task, where, store)
    if fmt == "coco":
        return _write_coco(rows, objects, task, path, skipped, store)
    if fmt == "yolo":
        return _write_yolo(rows, objects, path, skipped, copy_images, store)
    return _write_geojson(rows, objects, task, path, skipped, crs, store)


def _has_objects(task: Task | None) -> bool:
    return task is not None and task.objects


def _selected(
    output: str, task: Task | None, where: Where | None, store: Storage
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], int]:
    """(ok image rows, objects by image_id, error rows left out)."""
    on_objects = where is not None and applies_to_objects(where, task)
    objects: dict[str, list[dict[str, Any]]] = {}
    if _has_objects(task):
        table = read_objects(output, store)
        for obj in (filter_table(table, where) if on_objects and where else table).to_pylist():
            objects.setdefault(obj["image_id"], []).append(obj)
    rows, skipped = [], 0
    for table in iter_rows(output, store, None if on_objects else where):
        ok = table.filter(pc.equal(table["status"], "ok"))
        skipped += table.num_rows - ok.num_rows
        if on_objects:
            ok = ok.filter(pc.is_in(ok["image_id"], pa.array(list(objects), pa.string())))
        rows.extend(ok.drop_columns([c for c in ("gradcam_png",) if c in ok.column_names]).to_pylist())
    return rows, objects, skipped


def _categories(rows: list[dict[str, Any]], objects: dict[str, list[dict[str, Any]]]) -> dict[int, str]:
    """label -> name, for every label seen (gaps named ``class_<i>``)."""
    names: dict[int, str] = {}
    for row in rows:
        for c in row.get("class_pixels") or []:
            names.setdefault(int(c["label"]), c["label_name"] or f"class_{c['label']}")
    for objs in objects.values():
        for o in objs:
            names.setdefault(int(o["label"]), o["label_name"] or f"class_{o['label']}")
    top = max(names, default=-1)
    return {i: names.get(i, f"class_{i}") for i in range(top + 1)}


# -- COCO ------------------------------------------------------------------------------------------------------


def _mask_annotations(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One annotation per non-background class of a segmentation row (without ids)."""
    from raycv.data.rle import encode_rle

    labels = decode_png_mask(row["mask_png"])
    out = []
    for c in row.get("class_pixels") or []:
        if str(c["label_name"]).lower() in viz.BACKGROUND_NAMES:
            continue
        mask = labels == c["label"]
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if not len(ys):
            continue
        size, counts = encode_rle(mask)
        x0, y0, x1, y1 = int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1
        out.append(
            {
                "category_id": int(c["label"]) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": int(mask.sum()),
                "segmentation": {"size": size, "counts": counts},
            }
        )
    return out


def _object_annotation(obj: dict[str, Any]) -> dict[str, Any]:
    x1, y1, x2, y2 = (float(v) for v in obj["box"])
    ann: dict[str, Any] = {
        "category_id": int(obj["label"]) + 1,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": (x2 - x1) * (y2 - y1),
        "score": float(obj["score"]),
    }
    if obj.get("mask_rle_counts"):
        from raycv.data.rle import decode_rle

        size = [int(v) for v in obj["mask_rle_size"]]
        ann["segmentation"] = {"size": size, "counts": obj["mask_rle_counts"]}
        ann["area"] = int(decode_rle(size, obj["mask_rle_counts"]).sum())
    return ann


def _write_coco(
    rows: list[dict[str, Any]],
    objects: dict[str, list[dict[str, Any]]],
    task: Task | None,
    path: str,
    skipped: int,
    store: Storage,
) -> ExportSummary:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i, row in enumerate(rows, start=1):
        images.append(
            {
                "id": i,
                "file_name": row["image_uri"],
                "width": row["width"],
                "height": row["height"],
                "raycv_image_id": row["image_id"],
            }
        )
        anns = (
            [_object_annotation(o) for o in objects.get(row["image_id"], [])]
            if _has_objects(task)
            else _mask_annotations(row)
        )
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i, "iscrowd": 0, **ann})
    categories = [
        {"id": label + 1, "name": name, "raycv_label": label}
        for label, name in _categories(rows, objects).items()
    ]
    doc = {
        "info": {"description": "raycv annotation export"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    store.write_bytes(path, json.dumps(doc).encode())
    return ExportSummary(path, len(images), len(annotations), skipped)


# -- YOLO ------------------------------------------------------------------------------------------------------


def _stems(rows: list[dict[str, Any]]) -> list[str]:
    """File stems per row: the source's own, with 8 hex of image_id added where two would collide."""
    base = [posixpath.splitext(posixpath.basename(r["image_uri"]))[0] for r in rows]
    counts: dict[str, int] = {}
    for b in base:
        counts[b] = counts.get(b, 0) + 1
    return [b if counts[b] == 1 else f"{b}_{r['image_id'][:8]}" for b, r in zip(base, rows, strict=True)]


def _write_yolo(
    rows: list[dict[str, Any]],
    objects: dict[str, list[dict[str, Any]]],
    path: str,
    skipped: int,
    copy_images: bool,
    store: Storage,
) -> ExportSummary:
    lines_written = 0
    index = io.StringIO()
    writer = csv.writer(index)
    writer.writerow(["stem", "image_uri"])
    for row, stem in zip(rows, _stems(rows), strict=True):
        w, h = float(row["width"]), float(row["height"])
        lines = []
        for o in objects.get(row["image_id"], []):
            x1, y1, x2, y2 = (float(v) for v in o["box"])
            cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
            lines.append(f"{int(o['label'])} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n")
        store.write_bytes(storage.join(path, "labels", f"{stem}.txt"), "".join(lines).encode())
        lines_written += len(lines)
        writer.writerow([stem, row["image_uri"]])
        if copy_images:
            ext = posixpath.splitext(row["image_uri"])[1] or ".png"
            data = store.read_bytes(row["image_uri"])
            store.write_bytes(storage.join(path, "images", f"{stem}{ext}"), data)
    names = _categories(rows, objects)
    classes = "".join(f"{names[i]}\n" for i in range(len(names)))
    store.write_bytes(storage.join(path, "classes.txt"), classes.encode())
    store.write_bytes(storage.join(path, "images.csv"), index.getvalue().encode())
    return ExportSummary(path, len(rows), lines_written, skipped)


# -- GeoJSON ---------------------------------------------------------------------------------------------------


def _row_geometries(
    row: dict[str, Any], task: Task | None, objects: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(geometry in the row's CRS, properties) of one geo-referenced row."""
    from affine import Affine

    t = Affine.from_gdal(*row["transform"])
    base = {"image_id": row["image_id"], "image_uri": row["image_uri"]}
    if _has_objects(task):
        out = []
        for o in objects:
            x1, y1, x2, y2 = (float(v) for v in o["box"])
            ring = [t * (x1, y1), t * (x2, y1), t * (x2, y2), t * (x1, y2), t * (x1, y1)]
            props = {**base, "label": o["label"], "label_name": o["label_name"], "score": o["score"]}
            out.append(({"type": "Polygon", "coordinates": [[list(p) for p in ring]]}, props))
        return out
    return _label_polygons(row, t, base)


def _label_polygons(row: dict[str, Any], t: Any, base: dict[str, Any]) -> list[tuple[dict, dict]]:
    from rasterio import features

    labels = decode_png_mask(row["mask_png"])
    names = {int(c["label"]): c["label_name"] for c in row.get("class_pixels") or []}
    background = [k for k, n in names.items() if str(n).lower() in viz.BACKGROUND_NAMES]
    keep = ~np.isin(labels, background)
    out = []
    for geom, value in features.shapes(labels, mask=keep, connectivity=4, transform=t):
        label = int(value)
        out.append((dict(geom), {**base, "label": label, "label_name": names.get(label)}))
    return out


def _write_geojson(
    rows: list[dict[str, Any]],
    objects: dict[str, list[dict[str, Any]]],
    task: Task | None,
    path: str,
    skipped: int,
    crs: str | None,
    store: Storage,
) -> ExportSummary:
    geo = [r for r in rows if r.get("crs") and r.get("transform")]
    if not geo:
        raise ConfigError(
            "--format", "geojson", "No ok row is geo-referenced (crs and transform): use coco or yolo."
        )
    crss = sorted({r["crs"] for r in geo})
    if crs is None and len(crss) > 1:
        raise ConfigError(
            "--crs", None, f"The rows are in {len(crss)} CRSs ({', '.join(crss)}): pass e.g. --crs EPSG:4326."
        )
    features = []
    for row in geo:
        for geom, props in _row_geometries(row, task, objects.get(row["image_id"], [])):
            if crs is not None and crs != row["crs"]:
                from rasterio.warp import transform_geom

                geom = transform_geom(row["crs"], crs, geom)
            features.append({"type": "Feature", "geometry": geom, "properties": props})
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    target = crs or crss[0]
    if target.upper() not in ("EPSG:4326", "OGC:CRS84"):  # RFC 7946 lon/lat needs no crs member
        doc["crs"] = {"type": "name", "properties": {"name": _crs_urn(target)}}
    store.write_bytes(path, json.dumps(doc).encode())
    return ExportSummary(path, len(geo), len(features), skipped + len(rows) - len(geo))


def _crs_urn(crs: str) -> str:
    """``EPSG:32633`` -> ``urn:ogc:def:crs:EPSG::32633`` (GeoJSON 2008's named CRS); WKT as it is."""
    if crs.upper().startswith("EPSG:"):
        return f"urn:ogc:def:crs:EPSG::{crs.split(':', 1)[1]}"
    return crs
