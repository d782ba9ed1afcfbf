"""Every image a file holds: the frames of a DICOM, the slices of a NIfTI volume, else its one image."""

from __future__ import annotations

import numpy as np

from raycv.data import medical
from raycv.data.images import decode_image, decode_reduced
from raycv.data.preprocess import Resize, prepare_rgb, resized_size
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
    data: bytes, uri: str, size_hw: Resize, *, max_pixels: int, crop: Resize = None
) -> list[tuple[np.ndarray, int, int]]:
    """:func:`decode_file`, each image resized to ``size_hw`` (``[h, w]``, or an int: the shorter side) and
    centre-cropped to ``crop`` (:func:`prepare_rgb`): ``(pixels, width, height)`` with the original size.
    A large JPEG is decoded at reduced DCT scale (:func:`decode_reduced`)."""
    if not is_volume(data, uri):
        if size_hw is None:
            image = decode_image(data, uri, max_pixels=max_pixels)
            width, height = image.shape[1], image.shape[0]
        else:
            draft = (size_hw, size_hw) if isinstance(size_hw, int) else (int(size_hw[0]), int(size_hw[1]))
            image, width, height = decode_reduced(data, uri, draft, max_pixels=max_pixels)
            if isinstance(size_hw, int) and (image.shape[1], image.shape[0]) != (width, height):
                # decoded at reduced scale: the shorter side's target from the full size, as torchvision
                size_hw = resized_size(height, width, size_hw)
        return [(prepare_rgb(image, size_hw, crop), width, height)]
    return [
        (prepare_rgb(im, size_hw, crop), im.shape[1], im.shape[0])
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
