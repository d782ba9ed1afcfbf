"""``raycv inspect OUTPUT``: counts, classes, scores and errors of an annotation output on one screen."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from raycv.outputs.read import read_images, read_objects, read_summary, task_of
from raycv.storage import Storage
from raycv.tasks.registry import Task

_INSPECT_COLUMNS = [
    "image_uri", "status", "error_stage", "error_type", "error_message", "task", "label_name", "score",
    "class_pixels", "model_id", "run_id",
]  # fmt: skip


def _bar(count: int, most: int, width: int = 30) -> str:
    return "█" * (round(width * count / most) if most else 0)


def histogram_table(title: str, values: np.ndarray, bins: int = 10) -> Table:
    """Scores in ``bins`` equal bins over 0..1, as counts with text bars."""
    table = Table(title=title, show_edge=False)
    for name, justify in (("range", "left"), ("count", "right"), ("", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    # Rounded first: a float32 0.9 (0.8999999761...) belongs in the 0.9-1.0 bin.
    counts, edges = np.histogram(np.clip(np.round(values, 6), 0, 1), bins=bins, range=(0.0, 1.0))
    most = int(counts.max()) if len(counts) else 0
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        table.add_row(f"{lo:.1f}-{hi:.1f}", str(int(c)), _bar(int(c), most))
    return table


def _counts_table(title: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> Table:
    table = Table(title=title, show_edge=False, min_width=24)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    return table


def _class_table(task: Task | None, images: pa.Table, objects: pa.Table) -> Table | None:
    ok = images.filter(pc.equal(images["status"], "ok"))
    if task is None:
        return None
    if task.image_labels and "label_name" in ok.column_names:
        counts = Counter(ok["label_name"].to_pylist())
        total = max(sum(counts.values()), 1)
        rows: list[tuple[Any, ...]] = [(k, n, f"{100 * n / total:.1f}%") for k, n in counts.most_common()]
        return _counts_table("images by class", ("label_name", "images", "share"), rows)
    if task.label_maps and "class_pixels" in ok.column_names:
        pixels: Counter[str] = Counter()
        present: Counter[str] = Counter()
        for cells in ok["class_pixels"].to_pylist():
            for c in cells or []:
                pixels[c["label_name"]] += c["pixels"]
                present[c["label_name"]] += 1
        total = max(sum(pixels.values()), 1)
        rows = [(k, n, f"{100 * n / total:.1f}%", present[k]) for k, n in pixels.most_common()]
        return _counts_table("pixels by class", ("label_name", "pixels", "share", "images"), rows)
    if task.objects:
        names = objects["label_name"].to_pylist()
        per_image = Counter(zip(objects["image_id"].to_pylist(), names, strict=True))
        counts = Counter(names)
        images_with = Counter(name for _, name in per_image)
        rows = [(k, n, images_with[k]) for k, n in counts.most_common()]
        return _counts_table("objects by class", ("label_name", "objects", "images"), rows)
    return None


def _print_errors(console: Console, images: pa.Table, top: int = 8) -> None:
    """The most frequent (stage, type) of error rows, then an example URI of each on its own line (never
    wrapped, so it can be copied)."""
    errors = images.filter(pc.equal(images["status"], "error")).to_pylist()
    if not errors:
        return
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in errors:
        groups.setdefault((r.get("error_stage") or "?", r.get("error_type") or "?"), []).append(r)
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:top]
    table = Table(title="top errors", show_edge=False)
    for name in ("stage", "type", "count", "first message"):
        table.add_column(name, justify="right" if name == "count" else "left", overflow="ellipsis")
    for (stage, kind), rows in ranked:
        table.add_row(stage, kind, str(len(rows)), (rows[0].get("error_message") or "")[:200])
    console.print(table)
    for (_, kind), rows in ranked:
        console.print(f"  e.g. {kind}: {rows[0]['image_uri']}", soft_wrap=True, markup=False, highlight=False)


def inspect_output(output: str, store: Storage, console: Console | None = None) -> dict[str, Any]:
    """Print the one-screen summary of an annotation output; returns the counts it printed.

    Counts by status, by class (classification labels, segmentation pixels, detected objects), score
    histograms, the most frequent errors with an example URI each, and the last run's ``_summary.json``.
    """
    console = console or Console()
    task = task_of(output, store)
    images = read_images(output, store, _INSPECT_COLUMNS)
    objects = read_objects(output, store, ["image_id", "label", "label_name", "score"])
    status = Counter(images["status"].to_pylist())
    name = task.name if task else "unknown"
    console.rule(f"[bold]{output}[/bold]  task={name}  rows={images.num_rows}")
    console.print(_counts_table("rows by status", ("status", "rows"), sorted(status.items())))
    classes = _class_table(task, images, objects)
    if classes is not None:
        console.print(classes)
    on_objects = task is not None and task.objects
    scores = (
        objects["score"] if on_objects else images.column("score") if "score" in images.column_names else None
    )
    if scores is not None:
        values = np.asarray(pc.drop_null(scores).to_numpy(zero_copy_only=False), dtype=np.float64)
        if len(values):
            what = "object scores" if on_objects else "top-class scores"
            console.print(histogram_table(f"{what} (mean {values.mean():.3f})", values))
    _print_errors(console, images)
    summary = read_summary(output, store)
    if summary is not None:
        console.print("[bold]last run[/bold] (_summary.json): " + json.dumps(summary))
    return {"task": name, "status": dict(status), "objects": objects.num_rows, "summary": summary}


# -- Training runs ---------------------------------------------------------------------------------------------
