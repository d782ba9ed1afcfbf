"""Label maps written back as Cloud-Optimized GeoTIFFs, with the source scene's CRS and transform."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from raycv import storage
from raycv.data.geotiff_info import RasterInfo
from raycv.storage import Storage

_COG_BLOCK = 512


# -- Writing -------------------------------------------------------------------------------------------------


def write_cog(
    uri: str,
    label_map: np.ndarray,
    info: RasterInfo,
    store: Storage,
    *,
    colormap: dict[int, tuple[int, int, int]] | None = None,
) -> None:
    """Write a label map as a Cloud-Optimized GeoTIFF on the source raster's grid.

    Deflate-compressed 512x512 tiles; overviews built with ``mode`` resampling (the majority label of each
    block, never an average of labels). The file is written locally, then moved or uploaded in one piece,
    so readers never see a partial COG.

    Args:
        uri: destination (local path, ``file://`` or ``s3://``).
        label_map: [H, W] uint8 class indexes, H and W those of ``info``.
        info: the source raster's :class:`RasterInfo`; its CRS and transform are written.
        store: where ``uri`` is written.
        colormap: optional palette, label -> (r, g, b), so viewers show classes in colour.

    Raises:
        ValueError: a label map that is not [H, W] uint8 matching ``info``, or a malformed colormap.
        StorageError: the upload fails.
    """
    expected = (info.height, info.width)
    if not isinstance(label_map, np.ndarray) or label_map.dtype != np.uint8 or label_map.shape != expected:
        got = (label_map.dtype, label_map.shape) if isinstance(label_map, np.ndarray) else type(label_map)
        raise ValueError(
            f"write_cog expects a uint8 label map of shape {expected} (the raster's height, width), got "
            f"{got}; cast with .astype(np.uint8) and predict at the original resolution."
        )
    palette = _palette(colormap)
    profile = {
        "driver": "COG",
        "width": info.width,
        "height": info.height,
        "count": 1,
        "dtype": "uint8",
        "crs": CRS.from_user_input(info.crs) if info.crs else None,
        "transform": Affine.from_gdal(*info.transform),
        "compress": "deflate",
        "blocksize": _COG_BLOCK,
        "overview_resampling": "mode",
    }
    with local_output(uri, store) as local, rasterio.open(local, "w", **profile) as dst:
        dst.write(label_map, 1)
        if palette is not None:
            dst.write_colormap(1, palette)


def _palette(colormap: dict[int, tuple[int, int, int]] | None) -> dict[int, tuple[int, int, int, int]] | None:
    if colormap is None:
        return None
    palette = {}
    for label, colour in colormap.items():
        rgb = tuple(int(c) for c in colour)
        if not 0 <= int(label) <= 255 or len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(
                f"colormap maps a label 0..255 to (r, g, b) in 0..255, got {label!r}: {colour!r}."
            )
        palette[int(label)] = (rgb[0], rgb[1], rgb[2], 255)
    return palette


@contextmanager
def local_output(uri: str, store: Storage) -> Iterator[str]:
    """A local file path to write; on success it becomes ``uri`` whole (renamed locally, one PUT on S3)."""
    _, path = store.filesystem(uri)
    if storage.scheme(uri) == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="raycv-geotiff-") as folder:
        local = os.path.join(folder, "out.tif")
        yield local
        with open(local, "rb") as f:
            store.write_bytes(uri, f.read())
