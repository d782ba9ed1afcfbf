"""What a raster's header says, geo-reference included: size, bands, data type, CRS and geotransform.

``transform`` is GDAL's geotransform ``(x0, pixel_width, row_rotation, y0, column_rotation, pixel_height)``,
i.e. ``Affine.to_gdal()``: it maps the pixel coordinates of :mod:`raycv.data.geotiff` (``x`` the column,
``y`` the row, (0, 0) the top-left corner) to map coordinates in the ``crs``. Outputs carry both
(``crs``, ``transform`` columns) and :mod:`raycv.data.cog` writes them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RasterInfo:
    """What a raster's header says.

    Attributes:
        width, height: pixels of the full-resolution raster.
        count: number of bands.
        dtype: numpy name of the first band's data type (``"uint16"``, ``"float32"``...).
        crs: ``"EPSG:32633"`` when the CRS is exactly an EPSG code, else its WKT; None when there is none.
        transform: GDAL geotransform ``(x0, pixel_width, row_rotation, y0, column_rotation, pixel_height)``;
            the identity ``(0, 1, 0, 0, 0, 1)`` for a raster that is not geo-referenced.
        nodata: the first band's nodata value, None when unset.
    """

    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None

    @property
    def is_georeferenced(self) -> bool:
        return self.crs is not None or self.transform != (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def dataset_info(ds: Any) -> RasterInfo:
    """The :class:`RasterInfo` of an open dataset."""
    crs: str | None = None
    if ds.crs is not None:
        # Only an exact match becomes an EPSG code: a fuzzy one would change the CRS written back.
        epsg = ds.crs.to_epsg(confidence_threshold=100)
        crs = f"EPSG:{epsg}" if epsg is not None else ds.crs.to_wkt()
    gdal = tuple(float(v) for v in ds.transform.to_gdal())
    nodata = None if ds.nodata is None else float(ds.nodata)
    return RasterInfo(
        width=int(ds.width),
        height=int(ds.height),
        count=int(ds.count),
        dtype=str(ds.dtypes[0]),
        crs=crs,
        transform=(gdal[0], gdal[1], gdal[2], gdal[3], gdal[4], gdal[5]),
        nodata=nodata,
    )
