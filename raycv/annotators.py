"""The model replicas of an annotation run: one callable class per task, used as Ray Data actors.

Each loads the run's weights in ``__init__`` (never a ``ray.put`` model) and turns a batch of planned
images into rows of the task's Parquet schema; one image's failure becomes that image's error row.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from raycv import outputs, runs, storage
from raycv.data import geotiff
from raycv.data.images import decode_image, encode_png
from raycv.data.transforms import normalize, to_tensor_resized
from raycv.tasks.classification import topk_rows

# Above this many logits ([K, H, W] float32 = 4 bytes each) an untiled image is labelled at the model's
# resolution and its label map upsampled (nearest), instead of upsampling every class's scores.
MAX_UPSAMPLED_LOGITS = 64 * 1024 * 1024


def error_fields(stage: str, exc: BaseException) -> tuple[str, str, str]:
    """(error_stage, error_type, error_message) for one image's failure."""
    return stage, type(exc).__name__, str(exc)[:2000]


class _Annotator:
    """Shared set-up: the model on its device, its card, its normalisation, the output schema."""

    def __init__(
        self, run_dir: str, endpoint_url: str | None, run_id: str, threads: int, use_gpu: bool
    ) -> None:
        torch.set_num_threads(
            max(1, threads)
        )  # Ray sets OMP threads, but a reused worker keeps its old count
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.endpoint_url = endpoint_url
        self.run = runs.load_run(run_dir, endpoint_url, self.device)
        norm = self.run.card.get("normalization", {})
        self.mean = tuple(norm.get("mean", (0.0, 0.0, 0.0)))
        self.std = tuple(norm.get("std", (1.0, 1.0, 1.0)))
        self.run_id = run_id
        self.task = self.run.card["task"]
        self.schema = outputs.images_schema(self.task)

    def _forward(self, pixels: np.ndarray) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> the model's output (logits) for the normalised batch, float32 on the CPU."""
        x = (
            torch.from_numpy(np.ascontiguousarray(pixels))
            .to(self.device)
            .permute(0, 3, 1, 2)
            .float()
            .div_(255.0)
        )
        with torch.inference_mode():
            return self.run.model(normalize(x, self.mean, self.std)).float().cpu()

    def _common(
        self, batch: dict[str, np.ndarray], errors: list[tuple[str, str, str] | None]
    ) -> dict[str, list]:
        n = len(errors)
        now = dt.datetime.now(dt.timezone.utc)
        return {
            "image_id": [str(v) for v in batch["image_id"]],
            "image_uri": [str(v) for v in batch["image_uri"]],
            "frame": _optional_ints(batch.get("frame"), n),
            "frame_count": _optional_ints(batch.get("frame_count"), n),
            "source_etag": [str(v) or None for v in batch["source_etag"]],
            "status": ["error" if e else "ok" for e in errors],
            "error_stage": [e[0] if e else None for e in errors],
            "error_type": [e[1] if e else None for e in errors],
            "error_message": [e[2] if e else None for e in errors],
            "task": [self.task] * n,
            "model_id": [self.run.model_id] * n,
            "run_id": [self.run_id] * n,
            "annotated_at": [now] * n,
            "crs": [None] * n,
            "transform": [None] * n,
        }


def _optional_ints(values: np.ndarray | None, n: int) -> list[int | None]:
    """The read stage's int columns (-1 = none, e.g. ``frame`` of a single image) as nullable ints."""
    return [None] * n if values is None else [int(v) if v >= 0 else None for v in values]


def _window_reader(image: np.ndarray) -> Any:
    """``read(y0, x0, h, w)`` over an image already in memory (formats without windowed reads)."""
    return lambda y0, x0, h, w: image[y0 : y0 + h, x0 : x0 + w]


def _incoming_errors(batch: dict[str, np.ndarray]) -> list[tuple[str, str, str] | None]:
    return [
        (str(s), str(t), str(m)) if s else None
        for s, t, m in zip(batch["error_stage"], batch["error_type"], batch["error_message"], strict=True)
    ]


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
    ) -> None:
        super().__init__(run_dir, endpoint_url, run_id, threads, use_gpu)
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


class Segmenter(_Annotator):
    """Label maps at the original resolution; large images are tiled, blended and stitched.

    Small images are batched at the model's training size and their class scores resized back; an image
    larger than ``tile.size`` (with ``tile`` set) is cut into overlapping tiles run at native resolution
    (fully convolutional) and blended without seams, in bounded memory. GeoTIFFs are read through rasterio
    by windows when tiled, and their CRS and transform are kept (and optionally written as a COG).
    """

    def __init__(
        self,
        run_dir: str,
        endpoint_url: str | None,
        run_id: str,
        threads: int,
        use_gpu: bool,
        output: str,
        tile: dict[str, int] | None = None,
        geo: dict[str, Any] | None = None,
        batch_size: int = 8,
        max_pixels: int = 178_956_970,
    ) -> None:
        super().__init__(run_dir, endpoint_url, run_id, threads, use_gpu)
        self.output, self.tile, self.batch_size, self.max_pixels = output, tile, batch_size, max_pixels
        geo = geo or {}
        self.bands, self.write_rasters = geo.get("bands"), bool(geo.get("write_rasters"))
        scale = geo.get("scale", "dtype")
        self.scale = [tuple(s) for s in scale] if isinstance(scale, list) else scale
        self.k = int(self.run.card["num_classes"])

    def _probs(self, pixels: np.ndarray) -> np.ndarray:
        return torch.softmax(self._forward(pixels), dim=1).numpy()

    def _needs_tiling(self, h: int, w: int) -> bool:
        return self.tile is not None and max(h, w) > self.tile["size"]

    def _tiled(self, read: Any, h: int, w: int) -> np.ndarray:
        from raycv.tiling import predict_tiled

        assert self.tile is not None
        return predict_tiled(
            self._probs,
            read,
            h,
            w,
            num_classes=self.k,
            tile=self.tile["size"],
            overlap=self.tile["overlap"],
            batch_size=self.batch_size,
        )

    def _whole(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Label maps for small images: one batch at the model's size, scores resized to each original."""
        size = self.run.size_hw
        x = torch.stack([to_tensor_resized(im, size) for im in images]).mul_(255.0).round_().to(torch.uint8)
        logits = self._forward(x.permute(0, 2, 3, 1).numpy())
        maps = []
        for im, lg in zip(images, logits, strict=True):
            h, w = im.shape[:2]
            if lg.shape[0] * h * w <= MAX_UPSAMPLED_LOGITS:
                up = F.interpolate(lg[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                maps.append(up.argmax(dim=0).to(torch.uint8).numpy())
            else:
                low = lg.argmax(dim=0)[None, None].float()
                maps.append(
                    F.interpolate(low, size=(h, w), mode="nearest-exact")[0, 0].to(torch.uint8).numpy()
                )
        return maps

    def _geotiff(self, uri: str) -> tuple[np.ndarray, geotiff.RasterInfo]:
        info = geotiff.raster_info(uri, self.endpoint_url)
        if not self._needs_tiling(info.height, info.width):
            image, info = geotiff.read_scene(
                uri, self.endpoint_url, bands=self.bands, scale=self.scale, max_pixels=self.max_pixels
            )
            return self._whole([image])[0], info
        with geotiff.open_raster(uri, self.endpoint_url) as ds:

            def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
                return geotiff.read_window(ds, x0, y0, w, h, bands=self.bands, scale=self.scale)

            return self._tiled(read, info.height, info.width), info

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from raycv.tasks.segmentation import class_pixels

        errors = _incoming_errors(batch)
        n = len(errors)
        maps: list[np.ndarray | None] = [None] * n
        geo: list[geotiff.RasterInfo | None] = [None] * n
        small: list[tuple[int, np.ndarray]] = []
        for i in range(n):
            if errors[i]:
                continue
            uri = str(batch["image_uri"][i])
            try:
                if geotiff.is_geotiff(uri):
                    maps[i], geo[i] = self._geotiff(uri)
                    continue
                image = decode_image(bytes(batch["data"][i]), uri, max_pixels=self.max_pixels)
            except Exception as exc:
                errors[i] = error_fields("decode", exc)
                continue
            try:
                if self._needs_tiling(*image.shape[:2]):
                    maps[i] = self._tiled(_window_reader(image), *image.shape[:2])
                else:
                    small.append((i, image))
            except Exception as exc:
                errors[i] = error_fields("model", exc)
        for start in range(0, len(small), self.batch_size):
            chunk = small[start : start + self.batch_size]
            try:
                for (i, _), m in zip(chunk, self._whole([im for _, im in chunk]), strict=True):
                    maps[i] = m
            except Exception as exc:
                for i, _ in chunk:
                    errors[i] = error_fields("model", exc)
        for i in range(n):
            if maps[i] is not None and geo[i] is not None and self.write_rasters and not errors[i]:
                try:
                    raster = storage.join(self.output, "rasters", f"{batch['image_id'][i]}.tif")
                    geotiff.write_cog(raster, maps[i], geo[i], self.endpoint_url)  # type: ignore[arg-type]
                except Exception as exc:
                    errors[i] = error_fields("write", exc)
        names = self.run.class_names
        cols = self._common(batch, errors)
        ok = [m if not errors[i] else None for i, m in enumerate(maps)]
        cols["width"] = [int(m.shape[1]) if m is not None else None for m in ok]
        cols["height"] = [int(m.shape[0]) if m is not None else None for m in ok]
        cols["crs"] = [g.crs if g is not None and ok[i] is not None else None for i, g in enumerate(geo)]
        cols["transform"] = [
            list(g.transform) if g is not None and ok[i] is not None else None for i, g in enumerate(geo)
        ]
        cols["mask_png"] = [encode_png(m) if m is not None else None for m in ok]
        cols["class_pixels"] = [class_pixels(m, names) if m is not None else None for m in ok]
        return pa.table(cols, schema=self.schema)


class Detector(_Annotator):
    """Boxes (and instance masks as COCO RLE) per image, in original-image pixels, 0-based labels.

    Detectors resize internally, so each image goes in at its own size; ``score_threshold`` and
    ``iou_threshold`` (class-aware NMS) are applied to what the model returns. With ``tile``, an image larger
    than ``tile.size`` is cut into overlapping tiles run at native resolution (small objects stay small
    enough to see), and the tiles' detections are merged so that an object crossing a tile border is
    reported once (:func:`raycv.tasks.detection.merge_tile_detections`).
    """

    def __init__(
        self,
        run_dir: str,
        endpoint_url: str | None,
        run_id: str,
        threads: int,
        use_gpu: bool,
        score_threshold: float = 0.25,
        iou_threshold: float = 0.5,
        batch_size: int = 8,
        max_pixels: int = 178_956_970,
        tile: dict[str, int] | None = None,
    ) -> None:
        super().__init__(run_dir, endpoint_url, run_id, threads, use_gpu)
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold
        self.batch_size, self.max_pixels, self.tile = batch_size, max_pixels, tile
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
        with torch.inference_mode():
            outs = self.run.model(tensors)
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
        masks = kept.get("masks")
        return self._rows(
            kept, order.tolist(), None if masks is None else lambda i: masks[i, 0].numpy() > 0.5
        )

    def _objects_tiled(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Detect tile by tile, move boxes to image pixels, merge across tiles; masks pasted back whole."""
        from raycv.tasks.detection import merge_tile_detections, tile_offsets_to_image
        from raycv.tiling import tile_grid

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
        from raycv.tasks.detection import encode_rle

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
        errors = _incoming_errors(batch)
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
