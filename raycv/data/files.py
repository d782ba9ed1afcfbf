"""Every image a file holds: the frames of a DICOM, the slices of a NIfTI volume, else its one image."""

from __future__ import annotations

import numpy as np

from raycv.data import medical
from raycv.data.images import decode_image, decode_reduced, resize_rgb
from raycv.errors import DecodeError


def decode_file(data: bytes, uri: str, *, max_pixels: int) -> list[np.ndarray]:
    """Every image a file holds: the frames of a DICOM, the slices of a NIfTI volume, else its one image.

    DICOM is recognised by its extension or its ``DICM`` marker, NIfTI by ``.nii``/``.nii.gz``.

    Returns:
        [H, W, 3] uint8 RGB arrays as displayed (:mod:`raycv.data.medical`, :func:`decode_image`).

    Raises:
        DecodeError: unreadable, a compressed syntax without a decoder, or a frame over ``max_pixels``.
    """
    if not is_volume(data, uri):
        return [decode_image(data, uri, max_pixels=max_pixels)]
    if medical.is_dicom(uri) or medical.looks_like_dicom(data):
        info = medical.dicom_info(data, uri)  # the header only: refuse a pixel bomb before decoding it
        _check_pixels(uri, info["rows"] or 0, info["columns"] or 0, max_pixels)
        return medical.dicom_frames(data, uri)
    slices = medical.nifti_slices(data, uri)
    if slices:
        _check_pixels(uri, slices[0].shape[0], slices[0].shape[1], max_pixels)
    return slices


def decode_file_resized(
    data: bytes, uri: str, size_hw: tuple[int, int], *, max_pixels: int
) -> list[tuple[np.ndarray, int, int]]:
    """:func:`decode_file`, each image resized to ``size_hw`` (:func:`resize_rgb`): ``(pixels, width, height)``
    with the original size. A large JPEG is decoded at reduced DCT scale (:func:`decode_reduced`)."""
    if not is_volume(data, uri):
        image, width, height = decode_reduced(data, uri, size_hw, max_pixels=max_pixels)
        return [(resize_rgb(image, size_hw), width, height)]
    return [
        (resize_rgb(im, size_hw), im.shape[1], im.shape[0])
        for im in decode_file(data, uri, max_pixels=max_pixels)
    ]


def is_volume(data: bytes, uri: str) -> bool:
    """A DICOM (by extension or ``DICM`` marker) or a NIfTI file: frames or slices, not one image."""
    return medical.is_dicom(uri) or medical.looks_like_dicom(data) or medical.is_nifti(uri)


def _check_pixels(uri: str, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise DecodeError(
            uri,
            f"each frame is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
            "raise max_pixels",
        )
