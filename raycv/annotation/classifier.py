"""Classification replicas: top class, score, top-k and optional Grad-CAM heatmaps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raycv.annotation.actor import ActorSpec, Annotator, incoming_errors
from raycv.annotation.decode import decode_batch
from raycv.data.transforms import normalize
from raycv.errors import error_fields
from raycv.tasks.classification import topk_rows


class Classifier(Annotator):
    """Labels batches of decoded, resized images: top class, score and the top-k.

    A batch holds the read tasks' ``pixels`` (``decode: tasks``), or the files' encoded ``data``
    (``decode: actor``), which the actor decodes and resizes on its device (:mod:`.decode`: nvJPEG on a
    GPU), filling ``width``/``height`` and giving undecodable files their decode error rows.

    With ``explain="gradcam"`` each ok row also gets ``gradcam_png``: the Grad-CAM heatmap of the top class
    (:mod:`raycv.models.gradcam`) as a uint8 PNG at the model's input size (stretch it to the image, as the input
    was). The column is added to the schema only then.
    """

    reads = "pixels"

    def __init__(self, spec: ActorSpec) -> None:
        super().__init__(spec)
        self.topk, self.explain, self.max_pixels = spec.topk, spec.explain, spec.max_pixels
        if self.explain == "gradcam":
            from raycv.models.gradcam import find_target_layer

            self.cam_layer = find_target_layer(self.run.model)
            self.schema = self.schema.append(pa.field("gradcam_png", pa.binary()))

    def _explained(self, x: Any) -> tuple[torch.Tensor, list[bytes]]:
        """Logits and Grad-CAM PNGs of a [B, 3, H, W] batch in 0..1 (one forward and one backward pass)."""
        from raycv.models.gradcam import gradcam, heatmap_png

        if isinstance(x, np.ndarray):  # images of several sizes: one at a time
            parts = [self._explained(self._to_device(im[None])) for im in x]
            return torch.cat([p[0] for p in parts]), [png for p in parts for png in p[1]]

        logits, cams = gradcam(self.run.model, normalize(x, self.mean, self.std), target_layer=self.cam_layer)
        return logits.cpu(), [heatmap_png(c.numpy()) for c in cams]

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.source.fixed_size
        assert size is not None, "decode: actor needs a fixed input size (checked by the pipeline)"
        return size

    def _decoded(
        self, batch: dict[str, np.ndarray], errors: list[tuple[str, str, str] | None]
    ) -> tuple[Any, list[int]]:
        """The good images of a batch as [B, 3, H, W] in 0..1 on the device, and their row indices.

        Decodes ``data`` (``decode: actor``) first: its failures become the rows' errors, and the original
        sizes go into ``batch["width"]``/``batch["height"]``.
        """
        n = len(errors)
        if "data" not in batch:
            good = [i for i in range(n) if errors[i] is None]
            if not good:
                return None, good
            pixels = batch["pixels"][good]
            if pixels.dtype == object:  # several sizes (resize of the shorter side, no crop)
                return pixels, good
            return self._to_device(pixels), good
        todo = [i for i in range(n) if errors[i] is None]
        decoded = decode_batch(
            [bytes(batch["data"][i]) for i in todo],
            [str(batch["image_uri"][i]) for i in todo],
            self.input_size,
            self.device,
            max_pixels=self.max_pixels,
        )
        batch["width"] = np.full(n, -1, np.int64)
        batch["height"] = np.full(n, -1, np.int64)
        good, tensors = [], []
        for i, d in zip(todo, decoded, strict=True):
            batch["width"][i], batch["height"][i] = d.width, d.height
            if d.pixels is None:
                errors[i] = d.error
            else:
                good.append(i)
                tensors.append(d.pixels)
        return (torch.stack(tensors) if tensors else None), good

    def _sized_common(
        self, batch: dict[str, np.ndarray], errors: list[tuple[str, str, str] | None]
    ) -> dict[str, list]:
        """The common columns, and each image's original ``width``/``height`` (null when unknown)."""
        cols = self._common(batch, errors)
        cols["width"] = [int(w) if w >= 0 else None for w in batch["width"]]
        cols["height"] = [int(h) if h >= 0 else None for h in batch["height"]]
        return cols

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = incoming_errors(batch)
        n = len(errors)
        x, good = self._decoded(batch, errors)
        rows: list[Any] = [None] * n
        cams: list[bytes | None] = [None] * n
        if x is not None:
            try:
                if self.explain == "gradcam":
                    logits, pngs = self._explained(x)
                    for i, png in zip(good, pngs, strict=True):
                        cams[i] = png
                else:
                    logits = self._forward(x)
                probs = torch.softmax(logits, dim=1).numpy()
                for i, r in zip(good, topk_rows(probs, self.run.class_names, self.topk), strict=True):
                    rows[i] = r
            except Exception as exc:  # a model failure marks this batch's images; the run goes on
                for i in good:
                    errors[i] = error_fields("model", exc)
        cols = self._sized_common(batch, errors)
        cols["label"] = [r[0]["label"] if r and not errors[i] else None for i, r in enumerate(rows)]
        cols["label_name"] = [r[0]["label_name"] if r and not errors[i] else None for i, r in enumerate(rows)]
        cols["score"] = [r[0]["score"] if r and not errors[i] else None for i, r in enumerate(rows)]
        cols["topk"] = [r if not errors[i] else None for i, r in enumerate(rows)]
        if self.explain == "gradcam":
            cols["gradcam_png"] = [c if not errors[i] else None for i, c in enumerate(cams)]
        return pa.table(cols, schema=self.schema)
