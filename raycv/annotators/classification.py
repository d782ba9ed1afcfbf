"""Classification replicas: top class, score, top-k and optional Grad-CAM heatmaps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raycv.annotators.base import _Annotator, _incoming_errors
from raycv.data.transforms import normalize
from raycv.errors import error_fields
from raycv.tasks.classification import topk_rows


class Classifier(_Annotator):
    """Labels batches of decoded, resized images: top class, score and the top-k.

    With ``explain="gradcam"`` each ok row also gets ``gradcam_png``: the Grad-CAM heatmap of the top class
    (:mod:`raycv.gradcam`) as a uint8 PNG at the model's input size (stretch it to the image, as the input
    was). The column is added to the schema only then.
    """

    def __init__(
        self,
        run_dir: str,
        endpoint_url: str | None,
        run_id: str,
        threads: int,
        use_gpu: bool,
        topk: int = 5,
        explain: str | None = None,
        **speed: Any,
    ) -> None:
        super().__init__(run_dir, endpoint_url, run_id, threads, use_gpu, **speed)
        self.topk, self.explain = topk, explain
        if explain == "gradcam":
            from raycv.gradcam import find_target_layer

            self.cam_layer = find_target_layer(self.run.model)
            self.schema = self.schema.append(pa.field("gradcam_png", pa.binary()))

    def _explained(self, pixels: np.ndarray) -> tuple[torch.Tensor, list[bytes]]:
        """Logits and Grad-CAM PNGs of a [B, H, W, 3] uint8 batch (one forward and one backward pass)."""
        from raycv.gradcam import gradcam, heatmap_png

        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        logits, cams = gradcam(self.run.model, normalize(x, self.mean, self.std), target_layer=self.cam_layer)
        return logits.cpu(), [heatmap_png(c.numpy()) for c in cams]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = _incoming_errors(batch)
        n = len(errors)
        good = [i for i in range(n) if errors[i] is None]
        rows: list[Any] = [None] * n
        cams: list[bytes | None] = [None] * n
        if good:
            try:
                if self.explain == "gradcam":
                    logits, pngs = self._explained(batch["pixels"][good])
                    for i, png in zip(good, pngs, strict=True):
                        cams[i] = png
                else:
                    logits = self._forward(batch["pixels"][good])
                probs = torch.softmax(logits, dim=1).numpy()
                for i, r in zip(good, topk_rows(probs, self.run.class_names, self.topk), strict=True):
                    rows[i] = r
            except Exception as exc:  # a model failure marks this batch's images; the run goes on
                for i in good:
                    errors[i] = error_fields("model", exc)
        cols = self._common(batch, errors)
        cols["width"] = [int(w) if w >= 0 else None for w in batch["width"]]
        cols["height"] = [int(h) if h >= 0 else None for h in batch["height"]]
        cols["label"] = [r[0]["label"] if r and not errors[i] else None for i, r in enumerate(rows)]
        cols["label_name"] = [r[0]["label_name"] if r and not errors[i] else None for i, r in enumerate(rows)]
        cols["score"] = [r[0]["score"] if r and not errors[i] else None for i, r in enumerate(rows)]
        cols["topk"] = [r if not errors[i] else None for i, r in enumerate(rows)]
        if self.explain == "gradcam":
            cols["gradcam_png"] = [c if not errors[i] else None for i, c in enumerate(cams)]
        return pa.table(cols, schema=self.schema)
