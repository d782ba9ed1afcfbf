"""``raycv report RUN_DIR``: a training run's model card, best metrics and curves (``curves.png``)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from raycv import storage
from raycv.data import draw as viz
from raycv.models import saved
from raycv.storage import Storage
from raycv.tasks.registry import get_task

CURVES = "curves.png"
CONFUSION = "confusion.png"


def read_history(run_dir: str, store: Storage) -> list[dict[str, Any]]:
    try:
        text = store.read_bytes(storage.join(run_dir, saved.METRICS)).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_plots(
    run_dir: str, card: dict[str, Any], history: list[dict[str, Any]], store: Storage
) -> list[str]:
    """Write ``curves.png`` (and ``confusion.png`` when the card has the best epoch's confusion matrix)."""
    written = []
    if history:
        metrics = get_task(card["task"]).metrics if card.get("task") else ()
        uri = storage.join(run_dir, CURVES)
        store.write_bytes(uri, viz.png_bytes(viz.curves_image(history, metrics)))
        written.append(uri)
    if card.get("best_confusion"):
        uri = storage.join(run_dir, CONFUSION)
        image = viz.confusion_image(card["best_confusion"], card.get("class_names", []))
        store.write_bytes(uri, viz.png_bytes(image))
        written.append(uri)
    return written


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def report_run(run_dir: str, store: Storage, console: Console | None = None) -> dict[str, Any]:
    """Print a run's model card and best metrics, refresh its plots; returns the card."""
    console = console or Console()
    card = saved.read_card(run_dir, store)
    history = read_history(run_dir, store)
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
    for uri in write_plots(run_dir, card, history, store):
        console.print(f"wrote {uri}", soft_wrap=True, highlight=False)
    return card
