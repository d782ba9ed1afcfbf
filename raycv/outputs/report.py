"""``raycv inspect OUTPUT`` and ``raycv report RUN``: one-screen summaries (rich tables) of an annotation
output and of a training run, and the run's ``curves.png`` / ``confusion.png``."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from raycv import storage
from raycv.data import draw as viz
from raycv.models import saved
from raycv.outputs.read import DETECTION_TASKS, read_images, read_objects, read_summary, task_of

CURVES = "curves.png"
CONFUSION = "confusion.png"
# The validation metrics drawn on curves.png, per task (those a run's metrics.jsonl holds).
CURVE_METRICS = {
    "classification": ("accuracy", "precision", "recall", "f1"),
    "semantic_segmentation": ("miou", "dice", "pixel_accuracy"),
    "detection": ("map", "map_50"),
    "instance_segmentation": ("map", "map_50", "mask_map"),
}
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


def _class_table(task: str, images: pa.Table, objects: pa.Table) -> Table | None:
    ok = images.filter(pc.equal(images["status"], "ok"))
    if task == "classification" and "label_name" in ok.column_names:
        counts = Counter(ok["label_name"].to_pylist())
        total = max(sum(counts.values()), 1)
        rows: list[tuple[Any, ...]] = [(k, n, f"{100 * n / total:.1f}%") for k, n in counts.most_common()]
        return _counts_table("images by class", ("label_name", "images", "share"), rows)
    if task == "semantic_segmentation" and "class_pixels" in ok.column_names:
        pixels: Counter[str] = Counter()
        present: Counter[str] = Counter()
        for cells in ok["class_pixels"].to_pylist():
            for c in cells or []:
                pixels[c["label_name"]] += c["pixels"]
                present[c["label_name"]] += 1
        total = max(sum(pixels.values()), 1)
        rows = [(k, n, f"{100 * n / total:.1f}%", present[k]) for k, n in pixels.most_common()]
        return _counts_table("pixels by class", ("label_name", "pixels", "share", "images"), rows)
    if task in DETECTION_TASKS:
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


def inspect_output(
    output: str, console: Console | None = None, endpoint_url: str | None = None
) -> dict[str, Any]:
    """Print the one-screen summary of an annotation output; returns the counts it printed.

    Counts by status, by class (classification labels, segmentation pixels, detected objects), score
    histograms, the most frequent errors with an example URI each, and the last run's ``_summary.json``.
    """
    console = console or Console()
    task = task_of(output, endpoint_url)
    images = read_images(output, endpoint_url, _INSPECT_COLUMNS)
    objects = read_objects(output, endpoint_url, ["image_id", "label", "label_name", "score"])
    status = Counter(images["status"].to_pylist())
    console.rule(f"[bold]{output}[/bold]  task={task}  rows={images.num_rows}")
    console.print(_counts_table("rows by status", ("status", "rows"), sorted(status.items())))
    classes = _class_table(task, images, objects)
    if classes is not None:
        console.print(classes)
    scores = (
        objects["score"]
        if task in DETECTION_TASKS
        else images.column("score")
        if "score" in images.column_names
        else None
    )
    if scores is not None:
        values = np.asarray(pc.drop_null(scores).to_numpy(zero_copy_only=False), dtype=np.float64)
        if len(values):
            what = "object scores" if task in DETECTION_TASKS else "top-class scores"
            console.print(histogram_table(f"{what} (mean {values.mean():.3f})", values))
    _print_errors(console, images)
    summary = read_summary(output, endpoint_url)
    if summary is not None:
        console.print("[bold]last run[/bold] (_summary.json): " + json.dumps(summary))
    return {"task": task, "status": dict(status), "objects": objects.num_rows, "summary": summary}


# -- Training runs ---------------------------------------------------------------------------------------------


def read_history(run_dir: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    try:
        text = storage.read_bytes(storage.join(run_dir, saved.METRICS), endpoint_url).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_plots(
    run_dir: str, card: dict[str, Any], history: list[dict[str, Any]], endpoint_url: str | None = None
) -> list[str]:
    """Write ``curves.png`` (and ``confusion.png`` when the card has the best epoch's confusion matrix)."""
    written = []
    if history:
        metrics = CURVE_METRICS.get(card.get("task", ""), ())
        uri = storage.join(run_dir, CURVES)
        storage.write_bytes(uri, viz.png_bytes(viz.curves_image(history, metrics)), endpoint_url)
        written.append(uri)
    if card.get("best_confusion"):
        uri = storage.join(run_dir, CONFUSION)
        image = viz.confusion_image(card["best_confusion"], card.get("class_names", []))
        storage.write_bytes(uri, viz.png_bytes(image), endpoint_url)
        written.append(uri)
    return written


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def report_run(
    run_dir: str, console: Console | None = None, endpoint_url: str | None = None
) -> dict[str, Any]:
    """Print a run's model card and best metrics, refresh its plots; returns the card."""
    console = console or Console()
    card = saved.read_card(run_dir, endpoint_url)
    history = read_history(run_dir, endpoint_url)
    console.rule(f"[bold]{run_dir}[/bold]")
    model = Table(title="model card", show_header=False, show_edge=False)
    model.add_column(style="bold")
    model.add_column(overflow="fold")
    names = card.get("class_names", [])
    shown_names = ", ".join(names[:12]) + (f", ... ({len(names)})" if len(names) > 12 else "")
    for key, value in (
        ("task", card.get("task")),
        ("arch", card.get("arch")),
        ("classes", f"{card.get('num_classes')}: {shown_names}"),
        ("image_size", card.get("image_size")),
        ("train / val images", f"{card.get('train_images', '?')} / {card.get('val_images', '?')}"),
        ("epochs run", len(history)),
        ("resumed at epochs", card.get("resumed_at_epochs") or "-"),
        ("versions", f"raycv {card.get('raycv_version')}, torch {card.get('torch_version')}"),
    ):
        model.add_row(key, str(value))
    console.print(model)
    best = Table(title=f"best metrics (epoch {card.get('best_epoch')})", show_edge=False, min_width=36)
    best.add_column("metric")
    best.add_column("value", justify="right")
    for k, v in (card.get("best_metrics") or {}).items():
        best.add_row(k, _fmt(v))
    console.print(best)
    for uri in write_plots(run_dir, card, history, endpoint_url):
        console.print(f"wrote {uri}", soft_wrap=True, highlight=False)
    return card
