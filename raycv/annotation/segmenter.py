"""Segmentation replicas: label maps at the original resolution, tiled and stitched for large scenes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from raycv import storage
from raycv.annotation.actor import ActorSpec, Annotator, incoming_errors, window_reader
from raycv.annotation.read import stack_images
from raycv.data import cog, geotiff
from raycv.data.bands import band_indexes, band_scale, to_bands
from raycv.data.images import decode_image, encode_png
from raycv.data.preprocess import prepare_rgb
from raycv.errors import error_fields

# Above this many logits ([K, H, W] float32 = 4 bytes each) an untiled image is labelled at the model's
# resolution and its label map upsampled (nearest), instead of upsampling every class's scores.
MAX_UPSAMPLED_LOGITS = 64 * 1024 * 1024


class Segmenter(Annotator):
    """Label maps at the original resolution; large images are tiled, blended and stitched.

    Small images are batched at the model's training size and their class scores resized back; an image
    larger than ``tile.size`` (with ``tile`` set) is cut into overlapping tiles run at native resolution
    (fully convolutional) and blended without seams, in bounded memory. GeoTIFFs are read through rasterio
    by windows when tiled, and their CRS and transform are kept (and optionally written as a COG).
    """

    skip_geotiff = True

    def __init__(self, spec: ActorSpec) -> None:
        super().__init__(spec)
        self.output, self.tile, self.batch_size = spec.output, spec.tile, spec.batch_size
        self.max_pixels = spec.max_pixels
        geo = spec.geo
        self.bands, self.write_rasters = geo.get("bands"), bool(geo.get("write_rasters"))
        self.in_bands = int(self.run.card.get("in_channels", 3))
        self.scale = band_scale(geo.get("scale", "dtype"))
        self.k = int(self.run.card["num_classes"])

    def _probs(self, pixels: np.ndarray) -> np.ndarray:
        return torch.softmax(self._forward(pixels), dim=1).numpy()

    def _needs_tiling(self, h: int, w: int) -> bool:
        return self.tile is not None and max(h, w) > self.tile["size"]

    def _tiled(self, read: Any, h: int, w: int) -> np.ndarray:
        from raycv.annotation.tiling import predict_tiled

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
        resize = self.preprocess.get("resize")
        logits = self._forward(
            stack_images([prepare_rgb(im, resize) for im in images], (1, 1, self.in_bands))
        )
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
        info = geotiff.raster_info(uri, self.store)
        bands = band_indexes(info.count, self.in_bands, self.bands, uri)
        if not self._needs_tiling(info.height, info.width):
            image, info = geotiff.read_scene(
                uri, self.store, bands=bands, scale=self.scale, max_pixels=self.max_pixels
            )
            return self._whole([image])[0], info
        with geotiff.open_raster(uri, self.store) as ds:

            def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
                return geotiff.read_window(ds, x0, y0, w, h, bands=bands, scale=self.scale)

            return self._tiled(read, info.height, info.width), info

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from raycv.tasks.segmentation import class_pixels

        errors = incoming_errors(batch)
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
                image = to_bands(image, self.in_bands, uri)
            except Exception as exc:
                errors[i] = error_fields("decode", exc)
                continue
            try:
                if self._needs_tiling(*image.shape[:2]):
                    maps[i] = self._tiled(window_reader(image), *image.shape[:2])
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
                    cog.write_cog(raster, maps[i], geo[i], self.store)  # type: ignore[arg-type]
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
