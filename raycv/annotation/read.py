"""The read stage of an annotation run: fetch files from storage and decode them, one error row per failure.

A multi-frame DICOM or a NIfTI volume is expanded here into one row per frame or slice
(``image_uri`` = ``<file>#frame=<k>``), so the model actors only ever see single images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from raycv.data import geotiff, medical
from raycv.data.bands import band_scale, read_raster, to_bands
from raycv.data.files import decode_file, decode_file_resized
from raycv.data.images import encode_png
from raycv.data.preprocess import Resize, prepare_rgb
from raycv.errors import error_fields
from raycv.outputs import schema as outputs
from raycv.storage import Storage

FILES_PER_READ = 8  # files fetched and decoded together: bounds a read task's memory when files are volumes


def _fetch_all(uris: list[str], fetch: Any) -> list[Any]:
    with ThreadPoolExecutor(max_workers=FILES_PER_READ) as pool:  # object storage is latency-bound
        return list(pool.map(fetch, uris))


_OK: tuple[str, str, str] = ("", "", "")


def _expanded(
    batch: dict[str, np.ndarray], results: list[list[Any]], errors: list[list[tuple[str, str, str]]]
) -> dict[str, np.ndarray]:
    """The plan columns with one row per image of each file, ``frame``/``frame_count`` (-1 for single
    images) and the error columns; a file giving several images gets ``<uri>#frame=<k>`` rows."""
    cols: dict[str, list[Any]] = {
        k: [] for k in ("image_id", "image_uri", "source_etag", "frame", "frame_count")
    }
    for i, images in enumerate(results):
        uri = str(batch["image_uri"][i])
        etag = str(batch["source_etag"][i]) if "source_etag" in batch else ""
        many = len(images) > 1
        for k in range(len(images)):
            image_uri = outputs.frame_uri(uri, k) if many else uri
            cols["image_id"].append(outputs.image_id_of(image_uri) if many else str(batch["image_id"][i]))
            cols["image_uri"].append(image_uri)
            cols["source_etag"].append(etag)
            cols["frame"].append(k if many else -1)
            cols["frame_count"].append(len(images) if many else -1)
    out: dict[str, np.ndarray] = {k: np.array(v, dtype=object) for k, v in cols.items() if k[:5] != "frame"}
    out["frame"] = np.array(cols["frame"], np.int32)
    out["frame_count"] = np.array(cols["frame_count"], np.int32)
    flat = [e for per_file in errors for e in per_file]
    for j, col in enumerate(("error_stage", "error_type", "error_message")):
        out[col] = np.array([e[j] for e in flat], dtype=object)
    return out


def read_decode_batch(
    batch: dict[str, np.ndarray],
    *,
    size_hw: Resize,
    store: Storage,
    max_pixels: int,
    crop: Resize = None,
    bands: int = 3,
    geo: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Fetch and decode a batch of files into the model's input pixels, catching each file's failure.

    ``size_hw`` is ``[h, w]`` (exact) or an int (the shorter side, as torchvision's ``Resize``), then an
    optional centre ``crop`` (:func:`raycv.data.images.prepare_rgb`). Returns one row per image (a
    multi-frame DICOM or NIfTI volume gives one per frame or slice, see :func:`_expanded`) with ``pixels``
    [N, h, w, C] uint8 (an object array of [h_i, w_i, C] when the sizes differ; zeros for failed files),
    ``width`` and ``height`` (original, -1 when unknown) and ``error_stage/error_type/error_message`` (""
    when fine). C is the model's ``bands`` (:mod:`raycv.data.bands`): a GeoTIFF is read through rasterio
    with ``geo``'s ``bands`` and ``scale`` when the model is not RGB or ``geo.bands`` is set.
    """
    fixed = crop if crop is not None else (None if isinstance(size_hw, int) else size_hw)
    blank_hw = (fixed, fixed) if isinstance(fixed, int) else tuple(fixed or (1, 1))
    blank = np.zeros((*blank_hw, bands), np.uint8)
    chosen, scale = (geo or {}).get("bands"), band_scale((geo or {}).get("scale", "dtype"))

    def one(uri: str) -> list[tuple[np.ndarray, int, int, tuple[str, str, str]]]:
        if (bands != 3 or chosen) and geotiff.is_geotiff(uri):
            try:
                image, width, height = read_raster(
                    uri, store, bands=bands, chosen=chosen, scale=scale, max_pixels=max_pixels
                )
            except FileNotFoundError as exc:
                return [(blank, -1, -1, error_fields("read", exc))]
            except Exception as exc:
                return [(blank, -1, -1, error_fields("decode", exc))]
            return [(prepare_rgb(image, size_hw, crop), width, height, _OK)]
        try:
            data = store.read_bytes(uri)
        except Exception as exc:
            return [(blank, -1, -1, error_fields("read", exc))]
        try:
            if bands == 3:
                images = decode_file_resized(data, uri, size_hw, max_pixels=max_pixels, crop=crop)
            else:  # bands first, then resized: the pixels of a raster holding these bands
                images = [
                    (prepare_rgb(to_bands(im, bands, uri), size_hw, crop), im.shape[1], im.shape[0])
                    for im in decode_file(data, uri, max_pixels=max_pixels)
                ]
            return [(pixels, width, height, _OK) for pixels, width, height in images]
        except Exception as exc:
            return [(blank, -1, -1, error_fields("decode", exc))]

    results = _fetch_all([str(u) for u in batch["image_uri"]], one)
    out = _expanded(batch, results, [[r[3] for r in per_file] for per_file in results])
    flat = [r for per_file in results for r in per_file]
    out["pixels"] = stack_images([r[0] for r in flat], blank.shape)
    out["width"] = np.array([r[1] for r in flat], np.int32)
    out["height"] = np.array([r[2] for r in flat], np.int32)
    return out


def stack_images(images: list[np.ndarray], empty_shape: tuple[int, ...]) -> np.ndarray:
    """[N, h, w, C] when every image has one size, else an object array of the [h_i, w_i, C] images."""
    if not images:
        return np.zeros((0, *empty_shape), np.uint8)
    if len({im.shape for im in images}) == 1:
        return np.stack(images)
    ragged = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
        ragged[i] = image
    return ragged


def read_bytes_batch(
    batch: dict[str, np.ndarray], *, store: Storage, skip_geotiff: bool = False, max_pixels: int
) -> dict[str, np.ndarray]:
    """Fetch the encoded bytes of a batch (GeoTIFFs are left to the actor's windowed reads).

    Shipping encoded bytes rather than decoded pixels keeps object-store traffic ~10x smaller; the model
    actor decodes at the original resolution, which segmentation needs anyway. DICOM and NIfTI files are
    decoded here instead, and each frame or slice ships as a lossless PNG of its displayed pixels (one row
    each, see :func:`_expanded`), so the actors only ever decode ordinary images.
    """

    def one(uri: str) -> list[tuple[bytes, tuple[str, str, str]]]:
        if skip_geotiff and geotiff.is_geotiff(uri):
            return [(b"", _OK)]
        try:
            data = store.read_bytes(uri)
        except Exception as exc:
            return [(b"", error_fields("read", exc))]
        if not (medical.is_dicom(uri) or medical.is_nifti(uri) or medical.looks_like_dicom(data)):
            return [(data, _OK)]
        try:
            return [(encode_png(image), _OK) for image in decode_file(data, uri, max_pixels=max_pixels)]
        except Exception as exc:
            return [(b"", error_fields("decode", exc))]

    results = _fetch_all([str(u) for u in batch["image_uri"]], one)
    out = _expanded(batch, results, [[r[1] for r in per_file] for per_file in results])
    out["data"] = np.array([r[0] for per_file in results for r in per_file], dtype=object)
    return out


def read_stage(
    batch: dict[str, np.ndarray], *, read: Callable[..., dict[str, np.ndarray]], **kwargs: Any
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``read`` on FILES_PER_READ files at a time and yield each result, so that a batch of volumes
    (hundreds of frames each) never sits decoded in one task's memory; Ray Data rebuilds the blocks."""
    for start in range(0, len(batch["image_uri"]), FILES_PER_READ):
        yield read({k: v[start : start + FILES_PER_READ] for k, v in batch.items()}, **kwargs)
