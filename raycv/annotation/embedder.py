"""Embedding replicas: a classifier's pooled penultimate features, L2-normalised (SPEC §6 ``embedding``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raycv.annotation.actor import ActorSpec, incoming_errors
from raycv.annotation.classifier import Classifier
from raycv.errors import error_fields
from raycv.tasks.embedding import embedding_field


class Embedder(Classifier):
    """Reads and decodes as :class:`Classifier` does; writes ``embedding`` instead of labels.

    The model gives ``[N, D]`` (a classifier whose head :func:`raycv.models.foreign.strip_head` removed,
    or a file exported that way); ``[N, D, h, w]`` maps are average-pooled. ``D`` is learnt from one
    forward pass on a blank image when the actor starts, so the schema is fixed before the first batch.
    """

    def __init__(self, spec: ActorSpec) -> None:
        super().__init__(spec)
        size = self.source.fixed_size
        if size is None:
            resize = self.preprocess.get("resize") or 224
            size = (resize, resize) if isinstance(resize, int) else (int(resize[0]), int(resize[1]))
        bands = int(self.run.card.get("in_channels", 3))
        self.dim = int(self._features(np.zeros((1, *size, bands), np.uint8)).shape[1])
        self.schema = self.schema.append(embedding_field(self.dim))

    def _features(self, x: Any) -> torch.Tensor:
        out = self._forward(x)
        if isinstance(out, list):
            out = torch.stack(out)
        if out.dim() == 4:
            out = out.mean(dim=(2, 3))
        out = out.reshape(out.shape[0], -1)
        return torch.nn.functional.normalize(out.float(), dim=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = incoming_errors(batch)
        n = len(errors)
        x, good = self._decoded(batch, errors)
        vectors: list[list[float] | None] = [None] * n
        if x is not None:
            try:
                for i, v in zip(good, self._features(x).numpy(), strict=True):
                    vectors[i] = v.tolist()
            except Exception as exc:  # a model failure marks this batch's images; the run goes on
                for i in good:
                    errors[i] = error_fields("model", exc)
        cols = self._sized_common(batch, errors)
        cols["embedding"] = [v if not errors[i] else None for i, v in enumerate(vectors)]
        return pa.table(cols, schema=self.schema)
