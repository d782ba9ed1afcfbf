"""GeoTIFF reading, scaling and COG writing, on scenes written by ``make_test_geotiff`` (locally and on the
moto S3 server of conftest.py)."""

from __future__ import annotations

import io
import logging
import os
import re
import uuid

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.abc import FileContainer
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from raycv.data import cog, geotiff, geotiff_info
from raycv.data.geotiff import open_raster, read_scene, read_window
from raycv.data.geotiff_info import RasterInfo
from raycv.data.synthetic_geo import make_test_geotiff
from raycv.errors import DecodeError
from raycv.storage import Storage

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)

UTM = (500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0)
BIG = (3000, 2000)  # 12 x 8 internal tiles of 256


@pytest.fixture(scope="module")
def big_scene(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("geotiff") / "scene.tif")
    make_test_geotiff(path, width=BIG[0], height=BIG[1], seed=3)
    return path


@pytest.fixture(scope="module")
def ramp(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("geotiff") / "ramp.tif")
    make_test_geotiff(path, width=300, height=200, count=2, pattern="ramp")
    return path


def _ramp_values(band: int, *, width: int = 300, height: int = 200, count: int = 2, top: int = 65535):
    """The ramp that make_test_geotiff documents, computed independently of any file."""
    n = width * height
    flat = np.arange(n, dtype=np.int64).reshape(height, width)
    return ((flat + (band - 1) * n // count) % n) * top // (n - 1)


def _write(path, values: np.ndarray, *, nodata=None, crs="EPSG:32633") -> str:
    """A small GeoTIFF holding exactly ``values`` ([count, H, W])."""
    count, height, width = values.shape
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=count, dtype=values.dtype.name,
        crs=crs, transform=Affine.from_gdal(*UTM), nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(values)
    return str(path)


# -- Header --------------------------------------------------------------------------------------------------


def test_raster_info_reports_crs_and_gdal_transform(big_scene):
    info = geotiff.raster_info(big_scene, STORE)

    assert info == RasterInfo(
        width=3000, height=2000, count=4, dtype="uint16", crs="EPSG:32633", transform=UTM, nodata=None
    )
    assert info.is_georeferenced
    with rasterio.open(big_scene) as ds:
        assert info.transform == ds.transform.to_gdal()  # GDAL order: x0, px_w, rot, y0, rot, px_h
        assert (ds.transform.c, ds.transform.a, ds.transform.f, ds.transform.e) == (
            500000.0,
            10.0,
            5e6,
            -10.0,
        )


def test_crs_without_epsg_code_is_wkt(tmp_path):
    custom = "+proj=tmerc +lat_0=0 +lon_0=15.5 +k=0.9996 +x_0=500000 +y_0=0 +ellps=WGS84 +units=m +no_defs"
    path = _write(tmp_path / "custom.tif", np.zeros((1, 8, 8), np.uint8), crs=custom)

    crs = geotiff.raster_info(path, STORE).crs

    assert crs is not None and crs.startswith("PROJCS[")
    assert rasterio.crs.CRS.from_wkt(crs) == rasterio.crs.CRS.from_proj4(custom)


def test_is_geotiff_by_extension():
    assert geotiff.is_geotiff("s3://b/scene.TIF") and geotiff.is_geotiff("/x/a.tiff")
    assert not geotiff.is_geotiff("/x/a.png") and not geotiff.is_geotiff("/x/tif")


# -- Windows -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y", "width", "height"),
    [(256, 512, 300, 200), (1000, 37, 1, 1), (2900, 1900, 256, 256), (2800, 0, 512, 2000)],
    ids=["inside", "one-pixel", "corner-clipped", "right-strip"],
)
@pytest.mark.parametrize("scale", ["dtype", "minmax"])
def test_window_equals_slice_of_full_read(big_scene, x, y, width, height, scale):
    with open_raster(big_scene, STORE) as ds:
        full = read_window(ds, 0, 0, *BIG, scale=scale, bands=[3, 2, 1])
        window = read_window(ds, x, y, width, height, scale=scale, bands=[3, 2, 1])

    assert window.dtype == np.uint8 and window.flags.c_contiguous
    assert window.shape == (min(height, BIG[1] - y), min(width, BIG[0] - x), 3)  # clipped, not padded
    np.testing.assert_array_equal(window, full[y : y + height, x : x + width])


def test_full_window_equals_read_scene(big_scene):
    image, info = read_scene(big_scene, STORE)

    with open_raster(big_scene, STORE) as ds:
        np.testing.assert_array_equal(read_window(ds, 0, 0, info.width, info.height), image)
    assert image.shape == (2000, 3000, 3) and info.crs == "EPSG:32633"


def test_band_selection_and_order(big_scene):
    with open_raster(big_scene, STORE) as ds:
        rgb = read_window(ds, 100, 100, 64, 48)
        bgr = read_window(ds, 100, 100, 64, 48, bands=[3, 2, 1])
        nir = read_window(ds, 100, 100, 64, 48, bands=[4])
        raw = ds.read(window=((100, 148), (100, 164)))

    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])
    assert nir.shape == (48, 64, 1)
    np.testing.assert_array_equal(nir[:, :, 0], (raw[3].astype(np.int64) * 255 + 32767) // 65535)
    for bad in ([0], [5], []):
        with (
            open_raster(big_scene, STORE) as ds,
            pytest.raises(ValueError, match=r"1-based indexes in 1\.\.4"),
        ):
            read_window(ds, 0, 0, 8, 8, bands=bad)


def test_single_band_is_replicated_to_rgb(tmp_path):
    values = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    image, _ = read_scene(_write(tmp_path / "gray.tif", values), STORE)

    assert image.shape == (8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], values[0])


def test_window_outside_raster_is_an_error(big_scene):
    with open_raster(big_scene, STORE) as ds:
        with pytest.raises(ValueError, match="outside the 3000x2000 raster"):
            read_window(ds, 3000, 0, 10, 10)
        with pytest.raises(ValueError, match="must be positive"):
            read_window(ds, 0, 0, 0, 10)


# -- Scaling -------------------------------------------------------------------------------------------------


def test_dtype_scale_is_exact_on_the_ramp(ramp):
    image, _ = read_scene(ramp, STORE, bands=[1, 2], scale="dtype")

    for channel, band in enumerate([1, 2]):
        values = _ramp_values(band)
        np.testing.assert_array_equal(image[:, :, channel], (values * 255 + 32767) // 65535)
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255  # the ramp spans 0..65535


def test_dtype_scale_of_signed_and_8bit_data(tmp_path):
    signed = np.array([[[-32768, -1, 0, 32767]]], np.int16)
    small = np.array([[[0, 1, 128, 255]]], np.uint8)

    assert read_scene(_write(tmp_path / "s.tif", signed), STORE, bands=[1])[0].ravel().tolist() == [
        0,
        127,
        128,
        255,
    ]
    assert read_scene(_write(tmp_path / "u.tif", small), STORE, bands=[1])[0].ravel().tolist() == [
        0,
        1,
        128,
        255,
    ]


def test_explicit_ranges_clip_and_scale(ramp):
    lo, hi = 10000.0, 20000.0
    image, _ = read_scene(ramp, STORE, bands=[1, 2], scale=[(lo, hi), (0, 65535)])

    expected = np.floor((np.clip(_ramp_values(1), lo, hi) - lo) * 255 / (hi - lo) + 0.5)
    np.testing.assert_array_equal(image[:, :, 0], expected)
    np.testing.assert_array_equal(image[:, :, 1], (_ramp_values(2) * 255 + 32767) // 65535)
    one_for_all, _ = read_scene(ramp, STORE, bands=[1, 2], scale=[(lo, hi)])
    np.testing.assert_array_equal(one_for_all[:, :, 0], expected)
    for bad in ([(5.0, 5.0)], [(0, 1), (0, 1), (0, 1)]):
        with pytest.raises(ValueError, match=r"one \(lo, hi\) with hi > lo per output channel"):
            read_scene(ramp, STORE, bands=[1, 2], scale=bad)


def test_minmax_stretches_each_band_and_nodata_is_zero(tmp_path):
    values = np.linspace(1000, 3000, 64 * 48).reshape(1, 48, 64).round().astype(np.uint16)
    values[0, 20:22, 30:32] = 7  # nodata, far below the data: must not count in the range
    path = _write(tmp_path / "dim.tif", values, nodata=7)

    stretched, info = read_scene(path, STORE, bands=[1], scale="minmax")
    dtype_scaled, _ = read_scene(path, STORE, bands=[1], scale="dtype")

    assert info.nodata == 7.0
    expected = np.floor((values[0].astype(np.float64) - 1000) * 255 / 2000 + 0.5)
    expected[20:22, 30:32] = 0
    np.testing.assert_array_equal(stretched[:, :, 0], expected)
    assert dtype_scaled.max() == 12  # 3000 of 65535: why 16-bit scenes with a narrow range need minmax


def test_float_rasters_default_to_minmax(tmp_path):
    path = str(tmp_path / "float.tif")
    make_test_geotiff(path, width=300, height=200, count=2, dtype="float32", pattern="ramp")

    image, info = read_scene(
        path, STORE, bands=[1]
    )  # scale="dtype": a float type has no range, minmax is used

    n = 300 * 200
    stored = (np.arange(n) / (n - 1)).astype(np.float32).astype(np.float64).reshape(200, 300)  # 0..1
    assert info.dtype == "float32"
    np.testing.assert_array_equal(image[:, :, 0], np.floor(stored * 255 + 0.5))


def test_minmax_on_a_large_scene_reaches_both_ends(big_scene):
    with open_raster(big_scene, STORE) as ds:
        image = read_window(ds, 0, 0, *BIG, bands=[1, 2, 3, 4], scale="minmax")

    assert image.reshape(-1, 4).min(axis=0).tolist() == [0, 0, 0, 0]
    assert image.reshape(-1, 4).max(axis=0).tolist() == [255, 255, 255, 255]


# -- Reading only what a window needs ------------------------------------------------------------------------


class _CountingFiles(FileContainer):
    """Serves one local file to GDAL through Python file objects (as open_raster serves S3 objects) and
    counts the bytes GDAL reads."""

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path, self.bytes_read = name, path, 0

    def open(self, path, mode="rb", **kwds):
        if path != self.name:
            raise FileNotFoundError(path)
        counter = self

        class Counting(io.FileIO):
            def read(self, size=-1):
                data = super().read(size)
                counter.bytes_read += len(data)
                return data

        return Counting(self.path, "rb")

    def isfile(self, path):
        return path == self.name

    def isdir(self, path):
        return False

    def ls(self, path):
        return []

    def mtime(self, path):
        return 0

    def rm(self, path):
        raise PermissionError(path)

    def size(self, path):
        if path != self.name:
            raise FileNotFoundError(path)
        return os.path.getsize(self.path)


@pytest.mark.parametrize(("scale", "share"), [("dtype", 0.03), ("minmax", 0.25)])
def test_a_window_reads_far_less_than_the_file(big_scene, scale, share):
    size = os.path.getsize(big_scene)  # 48 MB: 96 tiles of 4 x 256 x 256 uint16
    files = _CountingFiles(f"{uuid.uuid4().hex}/scene.tif", big_scene)

    with rasterio.open(files.name, opener=files) as ds:
        header = files.bytes_read
        window = read_window(ds, 1024, 512, 256, 256, scale=scale)

    assert window.shape == (256, 256, 3)
    assert header < 64 * 1024
    # dtype: the one tile (512 KB) and little else; minmax adds its 16 sampled blocks, not the scene.
    assert 512 * 1024 <= files.bytes_read < share * size


# -- S3 ------------------------------------------------------------------------------------------------------


@pytest.fixture
def s3_scene(tmp_path, bucket) -> tuple[str, str]:
    """(local path, s3 URI) of the same 1300 x 900 scene."""
    local = str(tmp_path / "scene.tif")
    make_test_geotiff(local, width=1300, height=900, seed=5)
    uri = f"{bucket}/scenes/scene.tif"
    with open(local, "rb") as f:
        STORE.write_bytes(uri, f.read())
    return local, uri


def test_s3_info_and_windows_match_local(s3_scene, caplog):
    local, uri = s3_scene
    caplog.set_level(logging.DEBUG, logger="s3fs")

    assert geotiff.raster_info(uri, STORE) == geotiff.raster_info(local, STORE)
    with open_raster(uri, STORE) as remote, open_raster(local, STORE) as ds:
        caplog.clear()
        got = read_window(remote, 700, 600, 256, 256, bands=[4, 1])
        fetched = [re.search(r"Fetch: .*, (\d+)-(\d+)$", r.getMessage()) for r in caplog.records]
        np.testing.assert_array_equal(got, read_window(ds, 700, 600, 256, 256, bands=[4, 1]))
        edge = read_window(remote, 1200, 800, 256, 256, scale="minmax")
        np.testing.assert_array_equal(edge, read_window(ds, 1200, 800, 256, 256, scale="minmax"))

    assert got.shape == (256, 256, 2) and edge.shape == (100, 100, 3)
    # s3fs logs each ranged GET as "Fetch: bucket/key, start-end": the window's 4 tiles of 24, not the file.
    fetched_bytes = sum(int(m[2]) - int(m[1]) for m in fetched if m)
    assert 4 * 512 * 1024 <= fetched_bytes < os.path.getsize(local) / 4


def test_s3_missing_and_bad_objects(bucket):
    STORE.write_bytes(f"{bucket}/notes.tif", b"just some notes, not an image\n")

    with pytest.raises(FileNotFoundError, match=r"missing\.tif"):
        geotiff.raster_info(f"{bucket}/missing.tif", STORE)
    with pytest.raises(DecodeError, match="not recognized") as caught:
        read_scene(f"{bucket}/notes.tif", STORE)
    assert caught.value.uri == f"{bucket}/notes.tif"


# -- Bad input -----------------------------------------------------------------------------------------------


def test_text_named_tif_is_a_decode_error(tmp_path):
    path = tmp_path / "fake.tif"
    path.write_text("this is a text file with a .tif name\n")

    with pytest.raises(DecodeError, match="cannot open as a raster") as caught:
        geotiff.raster_info(str(path), STORE)
    assert caught.value.uri == str(path)


@pytest.mark.parametrize("keep", [100, 0.5], ids=["header", "half"])
def test_truncated_tif_is_a_decode_error(tmp_path, big_scene, keep):
    data = open(big_scene, "rb").read()
    path = str(tmp_path / "cut.tif")
    with open(path, "wb") as f:
        f.write(data[: keep if isinstance(keep, int) else int(len(data) * keep)])

    with pytest.raises(DecodeError) as caught:
        read_scene(path, STORE)
    assert caught.value.uri == path
    assert "TIFFRead" in caught.value.reason


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file"):
        geotiff.raster_info(str(tmp_path / "absent.tif"), STORE)


def test_read_scene_refuses_scenes_over_the_pixel_limit(big_scene):
    with pytest.raises(DecodeError, match="tile it with read_window"):
        read_scene(big_scene, STORE, max_pixels=1000 * 1000)


# -- COG output ----------------------------------------------------------------------------------------------


def _majority_labels(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A label map whose 2x2 blocks hold one label 3 times and another once, the odd pixel at every
    position in turn: mode resampling gives the majority, nearest would give the odd one out somewhere."""
    rng = np.random.default_rng(0)
    majority = rng.integers(0, 4, size=(height // 2, width // 2)).astype(np.uint8)
    labels = np.repeat(np.repeat(majority, 2, axis=0), 2, axis=1)
    odd_row, odd_col = np.indices(majority.shape) % 2
    labels[2 * np.arange(height // 2)[:, None] + odd_row, 2 * np.arange(width // 2)[None, :] + odd_col] = (
        majority + 1
    ) % 4
    return labels, majority


def _check_cog(ds, labels: np.ndarray, info: RasterInfo) -> None:
    assert ds.shape == labels.shape and ds.count == 1 and ds.dtypes[0] == "uint8"
    assert ds.crs.to_string() == info.crs and ds.transform.to_gdal() == info.transform
    np.testing.assert_array_equal(ds.read(1), labels)
    assert ds.profile["tiled"] and ds.block_shapes == [(512, 512)]
    assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    assert ds.compression.name == "deflate"
    assert ds.overviews(1) == [2, 4]


def test_write_cog_local(tmp_path):
    info = RasterInfo(1300, 900, 4, "uint16", "EPSG:32633", UTM, None)
    labels, majority = _majority_labels(900, 1300)
    out = str(tmp_path / "out" / "labels.tif")

    cog.write_cog(out, labels, info, STORE, colormap={0: (0, 0, 0), 3: (255, 128, 0)})

    with rasterio.open(out) as ds:
        _check_cog(ds, labels, info)
        assert ds.colormap(1)[3] == (255, 128, 0, 255)
    with rasterio.open(out, overview_level=0) as half:
        np.testing.assert_array_equal(half.read(1), majority)  # mode, not nearest
    assert os.listdir(tmp_path / "out") == ["labels.tif"]  # no temporary left behind


def test_write_cog_on_s3_keeps_the_source_grid(s3_scene):
    _, uri = s3_scene
    info = geotiff.raster_info(uri, STORE)
    labels = np.zeros((info.height, info.width), np.uint8)
    labels[100:400, 200:900] = 2
    out = uri.replace("scenes/", "labels/")

    cog.write_cog(out, labels, info, STORE)

    with MemoryFile(STORE.read_bytes(out)) as memory, memory.open() as ds:
        _check_cog(ds, labels, info)


def test_write_cog_validates_the_label_map(tmp_path):
    info = RasterInfo(64, 32, 1, "uint8", None, (0.0, 1.0, 0.0, 0.0, 0.0, 1.0), None)

    with pytest.raises(ValueError, match=r"shape \(32, 64\)"):
        cog.write_cog(str(tmp_path / "x.tif"), np.zeros((64, 32), np.uint8), info, STORE)
    with pytest.raises(ValueError, match="uint8"):
        cog.write_cog(str(tmp_path / "x.tif"), np.zeros((32, 64), np.int64), info, STORE)
    with pytest.raises(ValueError, match="colormap"):
        cog.write_cog(
            str(tmp_path / "x.tif"), np.zeros((32, 64), np.uint8), info, STORE, colormap={300: (1, 2, 3)}
        )


# -- Test scenes ---------------------------------------------------------------------------------------------


def test_make_test_geotiff_layout_and_ground_truth(tmp_path):
    path, png, tif = (str(tmp_path / n) for n in ("a.tif", "a_mask.png", "a_mask.tif"))
    make_test_geotiff(path, width=700, height=600, seed=9, mask_path=png)
    make_test_geotiff(str(tmp_path / "b.tif"), width=700, height=600, seed=9, mask_path=tif)

    with rasterio.open(path) as ds:
        values = ds.read()
        assert ds.block_shapes == [(256, 256)] * 4 and ds.dtypes == ("uint16",) * 4
    mask = np.asarray(Image.open(png))
    with rasterio.open(tif) as ds:
        np.testing.assert_array_equal(ds.read(1), mask)
        assert ds.crs.to_string() == "EPSG:32633"
    assert open(path, "rb").read() == open(tmp_path / "b.tif", "rb").read()  # same seed, same file
    assert set(np.unique(mask)) <= {0, 1, 2, 3} and (mask > 0).mean() > 0.05
    brightest = values.max(axis=0)
    assert brightest[mask > 0].mean() > 2 * brightest[mask == 0].mean()  # bright shapes, darker background
    assert values.max() > 60000 and (values % 256).std() > 50  # full 16-bit range, busy low byte


def test_header_names_stay_importable_from_geotiff():
    assert geotiff.RasterInfo is RasterInfo and geotiff.dataset_info is geotiff_info.dataset_info
