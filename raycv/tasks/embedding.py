"""Embeddings: a classifier's pooled penultimate features, L2-normalised, one vector per image.

Annotation only (nothing to train): any classifier (a raycv run, a torchvision or timm architecture with
its weights, or a model file whose output is ``[N, D]``) gives ``embedding`` (fixed_size_list<float32, D>)
in ``OUTPUT/images``; ``raycv similar`` finds an image's nearest neighbours by cosine similarity.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from raycv.tasks.registry import Task, register_task


def embedding_field(dim: int) -> pa.Field:
    """The ``embedding`` column of a ``dim``-dimensional model."""
    return pa.field("embedding", pa.list_(pa.float32(), dim))


class Embedding(Task):
    """Features for search and deduplication; its rows hold a vector, no label."""

    name = "embedding"
    formats = ()  # annotation only
    primary_metric = ""
    metrics = ()
    export_formats = ()
    embeds = True
    annotator = "raycv.annotation.embedder:Embedder"

    def check_train_config(self, cfg: Any) -> str | None:
        return (
            "task: embedding annotates only: train a classifier (task: classification), then annotate with "
            "model: {run: RUN_DIR, task: embedding}"
        )


EMBEDDING = register_task(Embedding())
