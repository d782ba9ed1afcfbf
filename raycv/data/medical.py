"""DICOM and NIfTI bytes to displayed RGB arrays, the way a radiologist's viewer shows them.

``ds.pixel_array`` scaled min..max looks plausible and is wrong for most clinical files; each rule below
fixes one way it goes wrong:

- The Modality LUT (rescale slope/intercept, e.g. CT's ``-1024`` to Hounsfield units) is applied first.
- The VOI LUT or the *first* window centre/width is applied next and its output range, not the frame's own
  min..max, maps to 0..255, so a soft-tissue window saturates bone as the scanner intended. Only without
  any VOI information is each frame stretched from its own min..max.
- MONOCHROME1 is inverted after windowing (``255 - value``): high values are dark, as on the light box.
- Colour is returned as RGB: YBR_* are converted by pydicom's decoders, PALETTE COLOR through its LUT.
- Enhanced multi-frame files keep rescale and window in functional groups; each frame uses its own.
- Compressed transfer syntaxes go through the installed pylibjpeg plugins; one that nothing here decodes
  raises with the syntax's name and the package that would decode it.

NIfTI volumes are sliced along one axis after reorientation to RAS+, with one robust intensity range
(1st..99th percentile) for the whole volume, so a dark slice stays dark.

Every failure is a :class:`~raycv.errors.DecodeError` naming the URI and the reason.
"""

from __future__ import annotations

import gzip
import io
import struct
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from raycv.errors import DecodeError

DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")

_DICOM_MAGIC_OFFSET = 128  # a Part 10 file: 128-byte preamble, then b"DICM"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# What the windowing and LUT functions read; copied into a per-frame view so functional groups can override.
_DISPLAY_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def is_dicom(uri: str) -> bool:
    """Whether ``uri`` names a DICOM file by its extension (case-insensitive)."""
    return uri.lower().endswith(DICOM_EXTENSIONS)


def is_nifti(uri: str) -> bool:
    """Whether ``uri`` names a NIfTI file (``.nii`` or ``.nii.gz``) by its extension (case-insensitive)."""
    return uri.lower().endswith(NIFTI_EXTENSIONS)


def looks_like_dicom(data: bytes) -> bool:
    """Whether ``data`` starts like a DICOM Part 10 file (preamble + ``DICM``); PACS exports often lack a suffix."""
    return data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


# -- DICOM ---------------------------------------------------------------------------------------------------


def dicom_info(data: bytes, uri: str = "") -> dict[str, Any]:
    """Header facts of a DICOM file, read without touching the pixel data.

    Returns:
        ``modality``, ``photometric_interpretation`` (str or None), ``rows``, ``columns``,
        ``number_of_frames`` (int; 1 for single-frame files), ``transfer_syntax_uid`` and
        ``transfer_syntax_name`` (str or None when the file has no meta header).
    """
    ds = _read_dicom(data, uri, stop_before_pixels=True)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return {
        "modality": ds.get("Modality"),
        "photometric_interpretation": ds.get("PhotometricInterpretation"),
        "rows": _int_or_none(ds.get("Rows")),
        "columns": _int_or_none(ds.get("Columns")),
        "number_of_frames": _number_of_frames(ds, uri),
        "transfer_syntax_uid": str(syntax) if syntax else None,
        "transfer_syntax_name": syntax.name if syntax else None,
    }


def dicom_frames(data: bytes, uri: str = "") -> list[np.ndarray]:
    """Every frame of a DICOM file as displayed: rescaled, windowed, MONOCHROME1 inverted, colour as RGB.

    Args:
        data: the file's bytes (Part 10, or a bare dataset pydicom can read).
        uri: where the bytes came from, for error messages.

    Returns:
        One ``[Rows, Columns, 3]`` uint8 RGB array per frame (``NumberOfFrames`` of them).

    Raises:
        DecodeError: not DICOM, truncated, no pixel data, a transfer syntax nothing here decodes, or a
            header whose display attributes are invalid (e.g. a window width below 1).
    """
    ds = _read_dicom(data, uri, stop_before_pixels=False)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        kind = ds.get("Modality") or ds.get("SOPClassUID", "unknown")
        raise DecodeError(
            uri,
            f"no pixel data: a non-image object (Modality/SOP class: {kind}) or a truncated file ({len(data)} bytes)",
        )
    _check_decoder(ds, uri)
    try:
        pixels = pixel_array(ds)  # as_rgb: YBR_FULL/_422 become RGB; J2K's RCT/ICT are undone by the codec
    except Exception as e:
        raise DecodeError(uri, _pixel_failure(ds, e)) from e
    count = _number_of_frames(ds, uri)
    stack = pixels if count > 1 else pixels[np.newaxis]
    try:
        return [_display(stack[i], ds, _frame_view(ds, i)) for i in range(count)]
    except (ValueError, NotImplementedError, AttributeError, IndexError) as e:
        raise DecodeError(uri, f"invalid display attributes in the header: {e}") from e


def _read_dicom(data: bytes, uri: str, *, stop_before_pixels: bool) -> Dataset:
    try:
        # force=True also reads files without preamble; the checks below reject what is not DICOM at all.
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, struct.error, KeyError, TypeError) as e:
        raise DecodeError(uri, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    if len(ds) == 0 or ("SOPClassUID" not in ds and "Rows" not in ds and not looks_like_dicom(data)):
        raise DecodeError(
            uri, f"not a DICOM file (no DICM marker and no image attributes; {len(data)} bytes)"
        )
    return ds


def _check_decoder(ds: Dataset, uri: str) -> None:
    """Fail before decoding when the transfer syntax has no usable decoder, naming what to install."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as e:
        raise DecodeError(
            uri,
            f"transfer syntax '{syntax.name}' ({syntax}) has no pixel data decoder in pydicom; transcode "
            "the file to an image syntax first (e.g. dcmtk's dcmconv or gdcmconv, ffmpeg for video)",
        ) from e
    if not decoder.is_available:
        raise DecodeError(
            uri,
            f"transfer syntax '{syntax.name}' ({syntax}) needs a decoder plugin; install one of: "
            + "; ".join(decoder.missing_dependencies),
        )


def _pixel_failure(ds: Dataset, exc: BaseException) -> str:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    reason = f"pixel data cannot be decoded ({type(exc).__name__}: {exc})"
    if syntax is not None and syntax.is_compressed:
        missing = get_decoder(syntax).missing_dependencies
        others = f"; another decoder may read it: {'; '.join(missing)}" if missing else ""
        reason = f"transfer syntax '{syntax.name}' ({syntax}): {reason}{others}"
    return reason


def _number_of_frames(ds: Dataset, uri: str) -> int:
    value = ds.get("NumberOfFrames")
    try:
        return max(int(value), 1) if value not in (None, "") else 1
    except (TypeError, ValueError) as e:
        raise DecodeError(uri, f"invalid NumberOfFrames {value!r} in the header") from e


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The display attributes of frame ``index``: top level, overridden by shared then per-frame groups.

    A fresh dataset, because pydicom's windowing rewrites attributes in place and enhanced multi-frame
    files (Enhanced CT/MR) carry rescale and window only inside their functional group sequences.
    """
    view = Dataset()
    for keyword in _DISPLAY_KEYWORDS:
        if keyword in ds:
            setattr(view, keyword, ds[keyword].value)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta  # apply_voi reads OW LUT data with the file's endianness
    view.set_original_encoding(ds.original_encoding[0], ds.original_encoding[1], ds.original_character_set)
    groups = [ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")]
    items = [
        groups[0][0] if groups[0] else None,
        groups[1][index] if groups[1] and index < len(groups[1]) else None,
    ]
    for item in items:
        for macro in _FRAME_MACROS:
            if item is not None and item.get(macro):
                for element in item[macro].value[0]:
                    view[element.tag] = element
    return view


def _display(frame: np.ndarray, ds: Dataset, view: Dataset) -> np.ndarray:
    """One decoded frame to ``[H, W, 3]`` uint8 RGB."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR" and frame.ndim == 2:
        rgb = apply_color_lut(frame, ds)
        return _scale_to_uint8(rgb, 0.0, float(np.iinfo(rgb.dtype).max))
    if frame.ndim == 3:
        bits = int(ds.get("BitsStored") or frame.dtype.itemsize * 8)
        return _scale_to_uint8(frame[..., :3], 0.0, float(2**bits - 1))
    gray = _windowed(frame, view)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return np.repeat(gray[..., np.newaxis], 3, axis=2)


def _windowed(frame: np.ndarray, view: Dataset) -> np.ndarray:
    """Modality LUT, then VOI LUT or first window mapped from its output range; else the frame's min..max."""
    values = apply_modality_lut(frame, view)
    output_range = _voi_output_range(view)
    if output_range is None:
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        return _scale_to_uint8(values, lo, hi)
    if _has_voi_lut(view) and values.dtype.kind == "f":
        values = np.rint(values).astype(np.int64)  # LUT entries are indexed by integer stored values
    return _scale_to_uint8(apply_voi_lut(values, view, index=0), *output_range)


def _has_voi_lut(view: Dataset) -> bool:
    # The same test as apply_voi_lut's, which prefers the LUT over a window when both are present.
    sequence = view.get("VOILUTSequence")
    return bool(sequence) and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData"))


def _voi_output_range(view: Dataset) -> tuple[float, float] | None:
    """The range pydicom's VOI LUT or windowing maps into (PS3.3 C.11.2), or None without VOI attributes."""
    if _has_voi_lut(view):
        return 0.0, float(2 ** int(view.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if view.get("WindowCenter") is None or view.get("WindowWidth") is None:
        return None
    bits = int(view.BitsStored)
    if view.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(view.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(view.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = view.get("RescaleSlope"), view.get("RescaleIntercept")
    if slope is not None and intercept is not None and not view.get("ModalityLUTSequence"):
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return min(y_min, y_max), max(y_min, y_max)


def _scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly to 0..255 (clipped, rounded); a flat range gives zeros."""
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values.astype(np.float64), nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# -- NIfTI ---------------------------------------------------------------------------------------------------


def nifti_slices(data: bytes, uri: str = "", *, axis: int = 2) -> list[np.ndarray]:
    """A NIfTI-1/2 volume (``.nii`` or gzipped ``.nii.gz`` bytes) as one displayed image per slice.

    The volume is reoriented to the closest RAS+ orientation, scaled by ``scl_slope``/``scl_inter`` and then
    by one robust range for the whole volume (1st..99th percentile of the finite voxels), so slices share a
    scale. Each slice is rotated so that anterior (axial, sagittal) or superior (coronal) is up, in
    neurological convention (patient left on image left for axial and coronal).

    Args:
        data: the file's bytes; gzip is detected from its magic number, not the URI.
        uri: where the bytes came from, for error messages.
        axis: 0 sagittal (L-R), 1 coronal (P-A), 2 axial (I-S), in RAS+ voxel axes.

    Returns:
        One ``[H, W, 3]`` uint8 RGB array per slice; for a volume of shape (X, Y, Z) and ``axis=2``, Z arrays
        of shape (Y, X). 4-D series (fMRI) give the slices of each volume in turn, volume by volume.

    Raises:
        DecodeError: not NIfTI, truncated, or ``axis`` not in 0..2.
    """
    if axis not in (0, 1, 2):
        raise DecodeError(uri, f"axis must be 0, 1 or 2 (a spatial axis of the volume), got {axis!r}")
    volume = _nifti_volume(data, uri)
    lo, hi = _robust_range(volume)
    images = []
    for t in range(volume.shape[3]):
        moved = np.moveaxis(volume[..., t], axis, 0)
        for plane in moved:
            gray = _scale_to_uint8(np.rot90(plane), lo, hi)
            images.append(np.repeat(gray[..., np.newaxis], 3, axis=2))
    return images


def _nifti_volume(data: bytes, uri: str) -> np.ndarray:
    """The scaled voxels as float32 ``[X, Y, Z, T]`` in RAS+ (T is 1 for a 3-D volume)."""
    import nibabel  # deferred: only NIfTI inputs pay for the import

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        image_class = nibabel.Nifti2Image if _nifti_header_size(raw) == 540 else nibabel.Nifti1Image
        image = nibabel.as_closest_canonical(image_class.from_bytes(raw))
        volume = np.asarray(image.get_fdata(dtype=np.float32))  # applies scl_slope / scl_inter
    except Exception as e:  # nibabel raises ImageFileError, ValueError, EOFError, zlib.error, ...
        raise DecodeError(uri, f"not a readable NIfTI volume ({type(e).__name__}: {e})") from e
    if volume.ndim < 3:
        volume = volume.reshape(volume.shape + (1,) * (3 - volume.ndim))
    return volume.reshape(*volume.shape[:3], -1)


def _nifti_header_size(raw: bytes) -> int:
    """``sizeof_hdr`` in either byte order: 348 for NIfTI-1, 540 for NIfTI-2."""
    if len(raw) < 4:
        return 0
    little, big = struct.unpack("<i", raw[:4])[0], struct.unpack(">i", raw[:4])[0]
    return little if little in (348, 540) else big


def _robust_range(volume: np.ndarray) -> tuple[float, float]:
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 0.0
    lo, hi = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
    if not hi > lo:  # mostly-constant volumes (masks, one bright blob): fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    return lo, hi
