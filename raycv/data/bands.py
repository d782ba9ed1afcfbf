"""Pixels with a model's number of input bands (its ``in_channels``), for the models that are not RGB.

A 3-band model sees an image as displayed, RGB (:func:`raycv.data.images.decode_image`). A model of C
bands sees:

- in a GeoTIFF (``.tif``/``.tiff``, read through rasterio): the bands ``geo.bands`` names when set, else
  its first C, each scaled to uint8 by ``geo.scale`` (:mod:`raycv.data.geotiff`); a raster with fewer than
  C bands is an error, never padded;
- in any other image, with C = 1: its luminance (ITU-R 601-2, as Pillow's ``L``: exact for grayscale
  images, DICOM frames included); with another C: an error naming what the model takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from raycv.data import geotiff
from raycv.data.geotiff import BandScale
from raycv.data.images import DEFAULT_MAX_PIXELS, decode_image
from raycv.errors import DecodeError
from raycv.storage import Storage

_LUMA = np.array([299, 587, 114], np.uint32)  # ITU-R 601-2 in thousandths, Pillow's convert("L")


def band_indexes(count: int, bands: int, chosen: Sequence[int] | None, uri: str) -> list[int]:
    """The 1-based bands of a ``count``-band raster that a ``bands``-band model reads.

    ``chosen`` (``geo.bands``) wins; a 3-band model takes bands 1-3 (band 1 three times from a raster of
    fewer than three), another model its first ``bands``.

    Raises:
        DecodeError: the raster has fewer bands than the model takes, or ``chosen`` names a missing one.
    """
    if chosen:
        missing = [b for b in chosen if not 1 <= int(b) <= count]
        if missing:
            raise DecodeError(uri, f"geo.bands names band(s) {missing} and this raster has {count}")
        return [int(b) for b in chosen]
    if bands == 3:
        return [1, 2, 3] if count >= 3 else [1, 1, 1]
    if count < bands:
        raise DecodeError(
            uri,
            f"raster has {count} band(s) and the model takes {bands}: annotate {bands}-band rasters, or "
            "use a model of this raster's bands",
        )
    return list(range(1, bands + 1))


def band_scale(scale: Any) -> BandScale:
    """``geo.scale`` from a config (explicit ranges as lists) as :mod:`raycv.data.geotiff` takes it."""
    return [tuple(s) for s in scale] if isinstance(scale, list) else scale  # type: ignore[no-any-return]


def read_raster(
    uri: str,
    store: Storage,
    *,
    bands: int,
    chosen: Sequence[int] | None = None,
    scale: BandScale = "dtype",
    max_pixels: int,
) -> tuple[np.ndarray, int, int]:
    """A whole GeoTIFF as ``([H, W, bands] uint8, width, height)`` (see the module doc for the bands).

    Raises:
        FileNotFoundError, DecodeError: as :func:`raycv.data.geotiff.read_scene`, and :func:`band_indexes`.
    """
    with geotiff.open_raster(uri, store) as ds:
        return _whole(ds, uri, bands, chosen, scale, max_pixels), int(ds.width), int(ds.height)


def _whole(
    ds: Any, uri: str, bands: int, chosen: Sequence[int] | None, scale: BandScale, max_pixels: int
) -> np.ndarray:
    """All of an open raster's pixels in the model's bands, after the bands and the pixel limit are checked."""
    indexes = band_indexes(int(ds.count), bands, chosen, uri)
    if ds.width * ds.height > max_pixels:
        raise DecodeError(
            uri, f"raster is {ds.width}x{ds.height} pixels, over the limit of {max_pixels} (max_pixels)"
        )
    return geotiff.read_window(ds, 0, 0, ds.width, ds.height, bands=indexes, scale=scale)


def decode_bands(data: bytes, uri: str, bands: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A file's bytes as the ``[H, W, bands]`` uint8 input of a ``bands``-band model (training's reads):
    a GeoTIFF's first ``bands`` scaled by its dtype's range, an ordinary image through :func:`to_bands`.

    Raises:
        DecodeError: undecodable, over ``max_pixels``, or without the bands the model takes.
    """
    if not geotiff.is_geotiff(uri):
        return to_bands(decode_image(data, uri, max_pixels=max_pixels), bands, uri)
    from rasterio.errors import RasterioError
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as mem, mem.open() as ds:
            return _whole(ds, uri, bands, None, "dtype", max_pixels)
    except (RasterioError, OSError) as e:
        raise DecodeError(uri, f"cannot open as a raster: {e}") from e


def to_bands(rgb: np.ndarray, bands: int, uri: str) -> np.ndarray:
    """An [H, W, 3] uint8 RGB image as the ``bands``-band input of a model: itself, or its luminance.

    Raises:
        DecodeError: the model takes neither 3 bands nor 1 (only a GeoTIFF can hold its bands).
    """
    if bands == 3:
        return rgb
    if bands == 1:
        luma = (rgb.astype(np.uint32) * _LUMA).sum(axis=2, dtype=np.uint32)
        return ((luma + 500) // 1000).astype(np.uint8)[:, :, None]
    raise DecodeError(
        uri,
        f"the model takes {bands} bands and this image has 3 (RGB): {bands}-band inputs are read from "
        "GeoTIFFs (.tif), geo.bands picks which",
    )
