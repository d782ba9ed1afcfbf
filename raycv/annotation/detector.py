"""Detection and instance segmentation replicas: boxes, scores, labels and RLE masks, tiled when large."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raycv.annotation.actor import ActorSpec, Annotator, autocast, incoming_errors
from raycv.data.images import decode_image
from raycv.data.transforms import normalize
from raycv.errors import error_fields


class Detector(Annotator):
    """Boxes (and instance masks as COCO RLE) per image, in original-image pixels, 0-based labels.

    Detectors resize internally, so each image goes in at its own size; ``score_threshold`` and
    ``iou_threshold`` (class-aware NMS) are applied to what the model returns. With ``tile``, an image larger
    than ``tile.size`` is cut into overlapping tiles run at native resolution (small objects stay small
    enough to see), and the tiles' detections are merged so that an object crossing a tile border is
    reported once (:func:`raycv.tasks.detection.merge_tile_detections`).
    """

    fuses = False  # torchvision's detectors branch on their inputs in Python: torch.fx cannot trace them

    def __init__(self, spec: ActorSpec) -> None:
        super().__init__(spec)
        score_threshold, iou_threshold = spec.score_threshold, spec.iou_threshold
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold
        self.batch_size, self.max_pixels, self.tile = spec.batch_size, spec.max_pixels, spec.tile
        # An exported detector keeps all its detections; the model's own cap applies here (see export.py).
        self.max_detections = int(self.run.card.get("export", {}).get("max_detections") or 0)
        # torchvision's R-CNN box coder casts the proposals to the regression's dtype: under autocast the box
        # corners would be rounded to bf16 (4 px steps at 1024 px). There only the backbone (most of the
        # FLOPs) runs in reduced precision and the heads, box decoding and NMS in fp32.
        self._autocast_whole = not (
            hasattr(self.run.model, "roi_heads") and hasattr(self.run.model, "backbone")
        )
        if not self._autocast_whole and self.precision != "fp32":
            _autocast_forward(self.run.model.backbone, self.device, self.precision)  # type: ignore[arg-type]
        # The model's own post-processing thresholds (torchvision R-CNNs keep them on roi_heads).
        for part in (self.run.model, getattr(self.run.model, "roi_heads", None)):
            if part is not None and hasattr(part, "score_thresh"):
                part.score_thresh = score_threshold
            if part is not None and hasattr(part, "nms_thresh"):
                part.nms_thresh = iou_threshold

    def _detect(self, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        tensors = [
            normalize(
                torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float().div_(255.0),
                self.mean,
                self.std,
            ).to(self.device)
            for im in images
        ]
        precision = self.precision if self._autocast_whole else "fp32"  # else: the backbone's own autocast
        with torch.inference_mode(), autocast(self.device, precision):
            outs = self.model(tensors)
        return [
            {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outs
        ]

    def _kept(self, out: dict[str, torch.Tensor], h: int, w: int) -> dict[str, torch.Tensor]:
        """The detections at or above ``score_threshold``, boxes clipped to the ``h`` x ``w`` input."""
        keep = out["scores"] >= self.score_threshold
        kept = {k: v[keep] for k, v in out.items()}
        b = kept["boxes"]
        kept["boxes"] = torch.stack(
            [b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], dim=1
        )
        return kept

    def _objects(self, out: dict[str, torch.Tensor], h: int, w: int) -> list[dict[str, Any]]:
        from torchvision.ops import batched_nms

        kept = self._kept(out, h, w)
        order = batched_nms(kept["boxes"], kept["scores"], kept["labels"], self.iou_threshold)
        if self.max_detections:
            order = order[: self.max_detections]
        masks = kept.get("masks")
        return self._rows(
            kept, order.tolist(), None if masks is None else lambda i: masks[i, 0].numpy() > 0.5
        )

    def _objects_tiled(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Detect tile by tile, move boxes to image pixels, merge across tiles; masks pasted back whole."""
        from raycv.annotation.tiling import tile_grid
        from raycv.tasks.tiles import merge_tile_detections, tile_offsets_to_image

        assert self.tile is not None
        h, w = image.shape[:2]
        windows = tile_grid(h, w, self.tile["size"], self.tile["overlap"])
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start : start + self.batch_size]
            outs = self._detect([image[y0 : y0 + th, x0 : x0 + tw] for y0, x0, th, tw in chunk])
            for t, ((y0, x0, th, tw), out) in enumerate(zip(chunk, outs, strict=True), start):
                kept = self._kept(out, th, tw)
                kept["boxes"] = tile_offsets_to_image(kept["boxes"], x0, y0)
                kept["tile"] = torch.full((len(kept["scores"]),), t, dtype=torch.int64)
                parts.append(kept)
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        order = merge_tile_detections(
            merged["boxes"],
            merged["scores"],
            merged["labels"],
            self.iou_threshold,
            windows=windows,
            tile_ids=merged["tile"],
        )
        masks = merged.get("masks")

        def whole_mask(i: int) -> np.ndarray:
            assert masks is not None
            y0, x0, th, tw = windows[int(merged["tile"][i])]
            full = np.zeros((h, w), dtype=bool)
            full[y0 : y0 + th, x0 : x0 + tw] = masks[i, 0].numpy() > 0.5
            return full

        return self._rows(merged, order.tolist(), None if masks is None else whole_mask)

    def _rows(
        self, det: dict[str, torch.Tensor], order: list[int], mask_of: Any | None
    ) -> list[dict[str, Any]]:
        """SPEC §6 object rows for the detections ``order`` indexes, best first."""
        from raycv.data.rle import encode_rle

        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        names = self.run.class_names
        rows = []
        for i in order:
            label = int(labels[i]) - 1  # the model's 1..K back to the dataset's 0..K-1
            row: dict[str, Any] = {
                "label": label,
                "label_name": names[label] if 0 <= label < len(names) else None,
                "score": float(scores[i]),
                "box": [float(v) for v in boxes[i]],
                "mask_rle_size": None,
                "mask_rle_counts": None,
            }
            if mask_of is not None:
                size, counts = encode_rle(mask_of(i))
                row["mask_rle_size"], row["mask_rle_counts"] = list(size), counts
            rows.append(row)
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = incoming_errors(batch)
        n = len(errors)
        images: dict[int, np.ndarray] = {}
        for i in range(n):
            if not errors[i]:
                uri = str(batch["image_uri"][i])
                try:
                    images[i] = decode_image(bytes(batch["data"][i]), uri, max_pixels=self.max_pixels)
                except Exception as exc:
                    errors[i] = error_fields("decode", exc)
        objects: list[Any] = [None] * n
        idx = []
        for i, image in images.items():
            if self.tile is not None and max(image.shape[:2]) > self.tile["size"]:
                try:
                    objects[i] = self._objects_tiled(image)
                except Exception as exc:
                    errors[i] = error_fields("model", exc)
            else:
                idx.append(i)
        for start in range(0, len(idx), self.batch_size):
            chunk = idx[start : start + self.batch_size]
            try:
                for i, out in zip(chunk, self._detect([images[i] for i in chunk]), strict=True):
                    objects[i] = self._objects(out, *images[i].shape[:2])
            except Exception as exc:  # this batch's images become error rows; the run goes on
                for i in chunk:
                    errors[i] = error_fields("model", exc)
        cols = self._common(batch, errors)
        cols["width"] = [int(images[i].shape[1]) if i in images and not errors[i] else None for i in range(n)]
        cols["height"] = [
            int(images[i].shape[0]) if i in images and not errors[i] else None for i in range(n)
        ]
        cols["objects"] = [o if not errors[i] else None for i, o in enumerate(objects)]
        return pa.table(cols, schema=self.schema)


def _autocast_forward(module: torch.nn.Module, device: str, precision: str) -> None:
    """Run ``module`` (a backbone returning a tensor or a dict of them) under autocast, outputs back in fp32."""
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with autocast(device, precision):
            out = inner(*args, **kwargs)
        if isinstance(out, dict):
            return type(out)((k, v.float()) for k, v in out.items())
        return out.float()

    module.forward = forward  # type: ignore[method-assign]
