"""Generated GeoTIFF scenes for tests, demos and benchmarks: multi-band, any dtype, geo-referenced, tiled."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any, Literal

import numpy as np
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from raycv.data.cog import local_output
from raycv.data.geotiff import is_geotiff
from raycv.data.images import encode_png
from raycv.storage import Storage

_TEST_BLOCK = 512  # make_test_geotiff renders and writes blocks of this side (a multiple of its 256 tiles)


# -- Test scenes ---------------------------------------------------------------------------------------------


def make_test_geotiff(
    path: str,
    *,
    width: int,
    height: int,
    count: int = 4,
    dtype: str = "uint16",
    crs: str | None = "EPSG:32633",
    transform: tuple[float, float, float, float, float, float] = (500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0),
    seed: int = 0,
    pattern: Literal["shapes", "ramp"] = "shapes",
    mask_path: str | None = None,
    compress: str | None = None,
    store: Storage | None = None,
) -> None:
    """Write a tiled GeoTIFF (256x256 internal tiles) with a known pattern, for the tests and the demo.

    Patterns, at the dtype's full range (float rasters: 0..1):

    - ``"shapes"``: bright saturated circles, squares and triangles on a darker noisy background, drawn
      by :func:`raycv.data.synthetic_scenes.render_scene` in independent 512x512 blocks (memory stays
      bounded for any size). Bands 1-3 hold the shapes' R, G, B, further bands their brightest channel;
      integer values are ``u8 * 256 + noise`` (noise 0..255), so the low byte is busy as in real 16-bit
      data.
    - ``"ramp"``: pixel ``i = row * width + col`` of band ``b`` (1-based) holds
      ``((i + (b - 1) * N // count) % N) * max // (N - 1)`` with ``N = width * height``: every band runs
      the full range 0..max, shifted per band.

    Args:
        path: destination URI (local, ``file://`` or ``s3://``).
        crs, transform: geo-reference, transform in GDAL order.
        seed: the same seed writes the same file.
        dtype: ``uint8``, ``uint16``, ``int16``, ``float32`` or ``float64``.
        mask_path: also write the ground truth of ``"shapes"`` ([H, W] uint8, 0 = background, k + 1 = class
            k of :data:`raycv.data.synthetic_scenes.CLASSES`): ``.png`` as a PNG, ``.tif``/``.tiff`` as a
            GeoTIFF on the same grid.
        compress: GDAL compression (``"deflate"``...), None for raw tiles.
        store: where to write; default: the endpoint of the environment (``Storage()``).
    """
    store = store or Storage()
    if dtype not in ("uint8", "uint16", "int16", "float32", "float64"):
        raise ValueError(f"dtype must be uint8, uint16, int16, float32 or float64, got {dtype!r}.")
    if pattern not in ("shapes", "ramp") or (mask_path is not None and pattern != "shapes"):
        raise ValueError(f"pattern must be 'shapes' or 'ramp' (mask_path needs 'shapes'), got {pattern!r}.")
    if width < 1 or height < 1 or count < 1:
        raise ValueError(f"width, height and count must be positive, got {width}, {height}, {count}.")
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "crs": crs,
        "transform": Affine.from_gdal(*transform),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": compress,
    }
    full_mask = np.zeros((height, width), np.uint8) if mask_path and not is_geotiff(mask_path) else None
    with ExitStack() as stack:
        dst = stack.enter_context(
            rasterio.open(stack.enter_context(local_output(path, store)), "w", **profile)
        )
        mask_dst = None
        if mask_path and is_geotiff(mask_path):
            mask_local = stack.enter_context(local_output(mask_path, store))
            mask_dst = stack.enter_context(
                rasterio.open(mask_local, "w", **{**profile, "count": 1, "dtype": "uint8"})
            )
        for window in _blocks(width, height):
            bands, mask = _test_block(seed, window, count, dtype, pattern, (width, height))
            dst.write(bands, window=window)
            if mask_dst is not None:
                mask_dst.write(mask, 1, window=window)
            if full_mask is not None:
                rows, cols = window.toslices()
                full_mask[rows, cols] = mask
    if full_mask is not None and mask_path:
        store.write_bytes(mask_path, encode_png(full_mask))


def _blocks(width: int, height: int) -> Iterator[Window]:
    for y in range(0, height, _TEST_BLOCK):
        for x in range(0, width, _TEST_BLOCK):
            yield Window(x, y, min(_TEST_BLOCK, width - x), min(_TEST_BLOCK, height - y))


def _test_block(
    seed: int, window: Window, count: int, dtype: str, pattern: str, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """([count, h, w] values in ``dtype``, [h, w] uint8 ground truth) of one block."""
    h, w = int(window.height), int(window.width)
    if pattern == "ramp":
        return _ramp_block(window, count, dtype, size), np.zeros((h, w), np.uint8)
    from raycv.data.synthetic_scenes import render_scene

    # One random stream per block: the file does not depend on the order blocks are written in.
    rng = np.random.default_rng([seed, int(window.row_off), int(window.col_off)])
    scene = render_scene(rng, size=(h, w), n_objects=2)
    shapes = scene.mask > 0
    rgb = np.where(shapes[:, :, None], scene.image, scene.image // 2)  # darker background
    planes = [rgb[:, :, b] if b < 3 else rgb.max(axis=2) for b in range(count)]
    u8 = np.stack(planes).astype(np.int64)
    sixteen = u8 * 256 + rng.integers(0, 256, size=u8.shape)  # 0..65535, busy low byte
    if dtype == "uint8":
        values: np.ndarray = u8
    elif dtype.startswith("float"):
        values = sixteen / 65535.0
    else:
        values = sixteen + int(np.iinfo(np.dtype(dtype)).min)
    return values.astype(dtype), scene.mask


def _ramp_block(window: Window, count: int, dtype: str, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    n = width * height
    rows, cols = np.mgrid[
        int(window.row_off) : int(window.row_off + window.height),
        int(window.col_off) : int(window.col_off + window.width),
    ]
    flat = rows.astype(np.int64) * width + cols
    kind = np.dtype(dtype)
    top = 1.0 if kind.kind == "f" else float(np.iinfo(kind).max) - float(np.iinfo(kind).min)
    planes = []
    for b in range(count):
        step = (flat + b * n // count) % n
        if kind.kind == "f":
            planes.append(step / max(n - 1, 1))
        else:
            planes.append(step * int(top) // max(n - 1, 1) + int(np.iinfo(kind).min))
    return np.stack(planes).astype(dtype)
