"""GeoTIFF scenes: opening them and windowed reads scaled to uint8 (COG writing: :mod:`raycv.data.cog`).

A satellite scene can hold billions of pixels, so tiling never reads one whole: :func:`read_window` reads
only the internal tiles that a window touches, through GDAL (rasterio). Local files are opened by path;
``s3://`` objects through an fsspec file object registered with rasterio's ``opener`` (GDAL asks it for
byte ranges, so a 256x256 window of a 50 MB scene fetches about 1 MB). rasterio's other ways to read a
Python file object (``rasterio.open(fileobj)``, ``FilePath``) download the whole object first.

Coordinates are pixels of the full-resolution raster: ``x`` is the column, ``y`` the row, (0, 0) the
top-left corner. Bands are 1-based, in GDAL order. The header facts (:class:`RasterInfo`: size, dtype,
CRS, geotransform) are :mod:`raycv.data.geotiff_info`; they stay importable from here.

Band values become uint8 by a per-band linear map ``lo..hi -> 0..255`` (rounded half up, values outside
clipped; nodata, masked and non-finite pixels give 0). The ranges come from :data:`BandScale`:

- ``"dtype"``: the data type's full range (uint16: ``v * 255 / 65535``, exactly as
  :func:`raycv.data.images.decode_image` scales 16-bit PNGs). Float rasters have no such range and use
  ``"minmax"``.
- ``"minmax"``: each band's min and max, estimated from a cheap sample, never the whole scene: the
  overviews when the file has them, else 16 internal blocks spread over the raster. A dataset opened
  with :func:`open_raster` computes them once, so every tile of a scene is scaled alike.
- ``[(lo, hi), ...]``: explicit ranges, one per output channel (or one for all).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
import rasterio
from rasterio.abc import FileContainer
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from raycv import storage
from raycv.data.geotiff_info import RasterInfo as RasterInfo
from raycv.data.geotiff_info import dataset_info as dataset_info
from raycv.data.images import DEFAULT_MAX_PIXELS
from raycv.errors import DecodeError, StorageError
from raycv.storage import Storage

BandScale: TypeAlias = Literal["dtype", "minmax"] | Sequence[tuple[float, float]]
"""How band values map to uint8: ``"dtype"``, ``"minmax"`` or explicit ``[(lo, hi), ...]`` (module doc)."""

GEOTIFF_EXTENSIONS = (".tif", ".tiff")

_S3_BLOCK_SIZE = 128 * 1024  # read-ahead per GDAL request: small, so a window fetches little beyond its tiles
_STATS_GRID = 4  # minmax without overviews samples a 4x4 grid of internal blocks
_STATS_SIDE = 1024  # minmax with overviews reads a decimated raster about this long on its longer side


@dataclass
class _Opened:
    """What raycv remembers about a dataset that :func:`open_raster` opened, until it closes."""

    uri: str
    ranges: dict[int, tuple[float, float]] = field(default_factory=dict)  # band -> sampled (min, max)


_OPENED: dict[int, _Opened] = {}  # id(dataset) -> state; entries live exactly as long as the `with` block


# -- Opening -------------------------------------------------------------------------------------------------


def is_geotiff(uri: str) -> bool:
    """True when the name ends in ``.tif`` or ``.tiff`` (any case); nothing is read."""
    return uri.lower().endswith(GEOTIFF_EXTENSIONS)


@contextmanager
def open_raster(uri: str, store: Storage) -> Iterator[Any]:
    """Open a raster for reading; yields a ``rasterio`` dataset, closed when the block ends.

    Local paths and ``file://`` URIs open directly; ``s3://`` objects through fsspec, fetching only the
    byte ranges GDAL asks for (header, then the tiles each read touches).

    Raises:
        FileNotFoundError: nothing is stored at ``uri``.
        DecodeError: GDAL cannot open it as a raster (not a raster, a corrupt or truncated header).
    """
    fs, path = store.filesystem(uri)
    local = storage.scheme(uri) == "file"
    if local and not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {uri}")
    size = 0 if local else _object_size(fs, path, uri)
    try:
        dataset = rasterio.open(path) if local else rasterio.open(path, opener=_ObjectOpener(fs, path, size))
    except (RasterioError, OSError) as e:
        raise DecodeError(uri, f"cannot open as a raster: {_gdal_message(e)}") from e
    _OPENED[id(dataset)] = _Opened(uri)
    try:
        with dataset:
            yield dataset
    finally:
        _OPENED.pop(id(dataset), None)


def _object_size(fs: Any, path: str, uri: str) -> int:
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"No such file: {uri}") from None
    except Exception as e:
        raise StorageError(f"{uri}: {type(e).__name__}: {e}") from e


class _ObjectOpener(FileContainer):
    """Serves one fsspec object to GDAL as a seekable file; answers "no such file" for anything else.

    GDAL also probes for side-car files (``.aux.xml``, ``.msk``, ``.ovr``): answering those without a
    request saves several round trips per scene.
    """

    def __init__(self, fs: Any, path: str, size: int) -> None:
        self._fs, self._path, self._size = fs, path, size

    def _check(self, path: str) -> None:
        if path != self._path:
            raise FileNotFoundError(path)

    def open(self, path: str, mode: str = "rb", **kwds: Any) -> Any:
        self._check(path)
        # Read-ahead of a small block: GDAL reads the header, then one range per tile; fsspec's default
        # (50 MB blocks for s3fs) would fetch most scenes whole on the first read.
        return self._fs.open(path, "rb", block_size=_S3_BLOCK_SIZE, cache_type="readahead")

    def isfile(self, path: str) -> bool:
        return path == self._path

    def isdir(self, path: str) -> bool:
        return False

    def ls(self, path: str) -> list[str]:
        return []

    def mtime(self, path: str) -> int:
        self._check(path)
        return 0

    def rm(self, path: str) -> None:
        raise PermissionError(f"{path}: raycv opens rasters read-only")

    def size(self, path: str) -> int:
        self._check(path)
        return self._size


def raster_info(uri: str, store: Storage) -> RasterInfo:
    """The header facts of the raster at ``uri`` (reads the header only).

    Raises:
        FileNotFoundError, DecodeError: as :func:`open_raster`.
    """
    with open_raster(uri, store) as ds:
        return dataset_info(ds)


# -- Reading -------------------------------------------------------------------------------------------------


def read_window(
    ds: Any,
    x: int,
    y: int,
    width: int,
    height: int,
    *,
    bands: Sequence[int] | None = None,
    scale: BandScale = "dtype",
) -> np.ndarray:
    """Read one window of a dataset as uint8, touching only the internal tiles it covers.

    A window that runs past the right or bottom edge is clipped to the raster, not padded: the result is
    ``[min(height, H - y), min(width, W - x), C]``.

    Args:
        ds: an open dataset, from :func:`open_raster` (or ``rasterio.open``).
        x, y: top-left column and row, inside the raster.
        width, height: window size in pixels, positive.
        bands: 1-based band indexes in output order (``[3, 2, 1]`` turns BGR-stored data into RGB); None
            takes bands 1, 2, 3, or band 1 three times when the raster has fewer than 3 bands.
        scale: how values become uint8 (module doc).

    Returns:
        [h, w, C] uint8, C = ``len(bands)`` (3 by default), C-contiguous.

    Raises:
        ValueError: a window outside the raster, a band out of range, malformed ranges.
        DecodeError: GDAL fails to read the pixels (truncated or corrupt tiles).
    """
    if width < 1 or height < 1:
        raise ValueError(f"Window size must be positive, got width={width}, height={height}.")
    if not (0 <= x < ds.width and 0 <= y < ds.height):
        raise ValueError(
            f"Window origin (x={x}, y={y}) is outside the {ds.width}x{ds.height} raster; "
            f"x must be in 0..{ds.width - 1} and y in 0..{ds.height - 1}."
        )
    indexes = _resolve_bands(ds, bands)
    window = Window(x, y, min(width, ds.width - x), min(height, ds.height - y))
    try:
        ranges = _band_ranges(ds, indexes, scale)
        return _read_scaled(ds, indexes, ranges, window)
    except (RasterioError, OSError) as e:
        raise DecodeError(
            _uri_of(ds), f"cannot read pixels, truncated or corrupt data: {_gdal_message(e)}"
        ) from e


def read_scene(
    uri: str,
    store: Storage,
    *,
    bands: Sequence[int] | None = None,
    scale: BandScale = "dtype",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, RasterInfo]:
    """Read a whole raster that is small enough to hold at once (no tiling) as uint8.

    Args:
        bands, scale: as :func:`read_window`.
        max_pixels: largest ``width * height`` read whole; larger scenes must be tiled with
            :func:`read_window`.

    Returns:
        ([H, W, C] uint8, its :class:`RasterInfo`).

    Raises:
        FileNotFoundError, DecodeError: as :func:`open_raster`; DecodeError also over ``max_pixels``.
    """
    with open_raster(uri, store) as ds:
        info = dataset_info(ds)
        if info.width * info.height > max_pixels:
            raise DecodeError(
                uri,
                f"raster is {info.width}x{info.height} = {info.width * info.height} pixels, over the limit "
                f"of {max_pixels}; tile it with read_window or raise max_pixels",
            )
        return read_window(ds, 0, 0, info.width, info.height, bands=bands, scale=scale), info


def _resolve_bands(ds: Any, bands: Sequence[int] | None) -> list[int]:
    if bands is None:
        return [1, 2, 3] if ds.count >= 3 else [1, 1, 1]
    indexes = [int(b) for b in bands]
    bad = [b for b in indexes if not 1 <= b <= ds.count]
    if not indexes or bad:
        raise ValueError(
            f"bands must be 1-based indexes in 1..{ds.count} for this {ds.count}-band raster, "
            f"got {list(bands)}."
        )
    return indexes


def _band_ranges(ds: Any, indexes: list[int], scale: BandScale) -> list[tuple[float, float]]:
    """One ``(lo, hi)`` per output channel."""
    if isinstance(scale, str):
        if scale not in ("dtype", "minmax"):
            raise ValueError(f"scale must be 'dtype', 'minmax' or [(lo, hi), ...] per band, got {scale!r}.")
        dtype = np.dtype(ds.dtypes[0])
        if scale == "dtype" and np.issubdtype(dtype, np.integer):
            limits = np.iinfo(dtype)
            return [(float(limits.min), float(limits.max))] * len(indexes)
        return [_sampled_range(ds, i) for i in indexes]  # "minmax", and "dtype" for float rasters
    ranges = [(float(lo), float(hi)) for lo, hi in scale]
    if len(ranges) == 1:
        ranges *= len(indexes)
    if len(ranges) != len(indexes) or any(not hi > lo for lo, hi in ranges):
        raise ValueError(
            f"Explicit scale ranges must be one (lo, hi) with hi > lo per output channel "
            f"({len(indexes)} here) or a single one for all, got {list(scale)}."
        )
    return ranges


def _sampled_range(ds: Any, index: int) -> tuple[float, float]:
    state = _OPENED.get(id(ds))
    if state is not None and index in state.ranges:
        return state.ranges[index]
    values = _stats_sample(ds, index)
    values = values[np.isfinite(values)]
    if values.size == 0:
        found = (0.0, 1.0)  # nothing valid in the sample: every pixel maps to 0
    else:
        low, high = float(values.min()), float(values.max())
        found = (low, high if high > low else low + 1.0)  # a constant band maps to 0
    if state is not None:
        state.ranges[index] = found
    return found


def _stats_sample(ds: Any, index: int) -> np.ndarray:
    """Valid values of one band from a cheap sample: the overviews, else a grid of whole internal blocks.

    Without overviews a decimated read would still decode every tile that a sampled pixel falls in (all of
    them), so whole blocks spread over the raster are read instead, like GDAL's approximate statistics.
    """
    longest = max(ds.width, ds.height)
    if longest <= _STATS_SIDE or ds.overviews(index):
        factor = max(1, math.ceil(longest / _STATS_SIDE))
        shape = (max(1, ds.height // factor), max(1, ds.width // factor))
        data = ds.read(index, out_shape=shape, resampling=Resampling.nearest, masked=True)
        return np.asarray(data.compressed(), dtype=np.float64)
    block_h, block_w = ds.block_shapes[index - 1]
    rows = np.unique(np.linspace(0, (ds.height - 1) // block_h, _STATS_GRID).astype(int))
    cols = np.unique(np.linspace(0, (ds.width - 1) // block_w, _STATS_GRID).astype(int))
    samples = []
    for r in rows:
        for c in cols:
            x, y = int(c) * block_w, int(r) * block_h
            window = Window(x, y, min(block_w, ds.width - x), min(block_h, ds.height - y))
            samples.append(ds.read(index, window=window, masked=True))
    return np.concatenate([np.asarray(s.compressed(), dtype=np.float64) for s in samples])


def _read_scaled(
    ds: Any, indexes: list[int], ranges: list[tuple[float, float]], window: Window
) -> np.ndarray:
    unique = sorted(set(indexes))  # a single-band raster read as RGB is decoded once
    data = ds.read(unique, window=window, masked=True)
    values = np.ma.getdata(data)
    valid = ~np.ma.getmaskarray(data)
    out = np.empty((values.shape[1], values.shape[2], len(indexes)), dtype=np.uint8)
    for channel, (band, (lo, hi)) in enumerate(zip(indexes, ranges, strict=True)):
        position = unique.index(band)
        out[:, :, channel] = _scale_band(values[position], valid[position], lo, hi)
    return out


def _scale_band(values: np.ndarray, valid: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``lo..hi -> 0..255``, rounded half up; invalid and non-finite pixels give 0.

    Integer data on an integer range is scaled in integers, exactly: ``floor((v - lo) * 255 / span + 1/2)``
    is ``((v - lo) * 510 + span) // (2 * span)`` (uint16 on 0..65535 gives what
    :func:`raycv.data.images.decode_image` gives for 16-bit PNGs).
    """
    if values.dtype.kind in "iu" and values.dtype.itemsize <= 4 and lo.is_integer() and hi.is_integer():
        span = int(hi) - int(lo)
        shifted = np.clip(values.astype(np.int64), int(lo), int(hi)) - int(lo)
        scaled = (shifted * 510 + span) // (2 * span)
    else:
        wide = values.astype(np.float64)
        valid = valid & np.isfinite(wide)
        clipped = np.clip(np.where(valid, wide, lo), lo, hi)
        scaled = np.floor((clipped - lo) * 255.0 / (hi - lo) + 0.5)
    out = scaled.astype(np.uint8)
    out[~valid] = 0
    return out


def _uri_of(ds: Any) -> str:
    state = _OPENED.get(id(ds))
    return state.uri if state is not None else str(ds.name)


def _gdal_message(exc: BaseException) -> str:
    """GDAL's own message: rasterio raises "Read failed. See previous exception" with GDAL's as the cause."""
    cause = exc.__cause__
    return str(cause or exc) or type(exc).__name__
