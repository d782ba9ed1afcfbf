"""raycv.data.medical: DICOM frames as displayed (rescale, window, MONOCHROME1, colour, codecs) and NIfTI slices.

Inputs are pydicom's and nibabel's bundled test files, read with ``download=False`` (only the files that ship
inside the wheel; none is fetched), plus variants made here by editing a header with pydicom or building a
volume with nibabel.
"""

from __future__ import annotations

import gzip
import io
import os

import nibabel
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.sequence import Sequence

from raycv.data.medical import (
    DICOM_EXTENSIONS,
    NIFTI_EXTENSIONS,
    dicom_frames,
    dicom_info,
    is_dicom,
    is_nifti,
    looks_like_dicom,
    nifti_slices,
)
from raycv.errors import DecodeError


def _path(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with pydicom here"
    return str(path)


def _bytes(name: str) -> bytes:
    with open(_path(name), "rb") as f:
        return f.read()


def _dataset(name: str) -> FileDataset:
    return pydicom.dcmread(_path(name))


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _gray(frames: list[np.ndarray]) -> np.ndarray:
    assert len(frames) == 1
    assert (frames[0] == frames[0][..., :1]).all(), "a monochrome frame gives three equal channels"
    return frames[0][..., 0].astype(np.int32)


# -- recognising files ---------------------------------------------------------------------------------------


def test_extensions_and_magic() -> None:
    assert DICOM_EXTENSIONS == (".dcm", ".dicom") and NIFTI_EXTENSIONS == (".nii", ".nii.gz")
    assert is_dicom("s3://b/ct/IMG0001.DCM") and is_dicom("a.dicom") and not is_dicom("a.nii")
    assert is_nifti("/x/brain.nii") and is_nifti("brain.NII.GZ") and not is_nifti("brain.gz")
    assert looks_like_dicom(_bytes("CT_small.dcm"))
    assert not looks_like_dicom(b"\x89PNG\r\n\x1a\n" + bytes(200)) and not looks_like_dicom(b"DICM")


def test_dicom_info_reads_the_header_only() -> None:
    info = dicom_info(_bytes("examples_ybr_color.dcm"), "us.dcm")
    assert info == {
        "modality": "US",
        "photometric_interpretation": "YBR_FULL_422",
        "rows": 240,
        "columns": 320,
        "number_of_frames": 30,
        "transfer_syntax_uid": "1.2.840.10008.1.2.4.50",
        "transfer_syntax_name": "JPEG Baseline (Process 1)",
    }
    # Cheap: the header is read even when the pixel data is cut off.
    data = _bytes("CT_small.dcm")
    assert dicom_info(data[: len(data) // 2])["rows"] == 128


# -- shapes, dtypes, frame counts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "frames", "height", "width"),
    [
        ("CT_small.dcm", 1, 128, 128),
        ("MR_small.dcm", 1, 64, 64),
        ("rtdose.dcm", 15, 10, 10),  # 32-bit multi-frame dose grid
        ("examples_ybr_color.dcm", 30, 240, 320),  # multi-frame JPEG baseline, YBR_FULL_422
        ("SC_rgb_rle_2frame.dcm", 2, 100, 100),
        ("examples_palette.dcm", 1, 350, 800),
        ("JPEG2000.dcm", 1, 1024, 256),
        ("liver_1frame.dcm", 1, 512, 512),  # 1-bit segmentation
    ],
)
def test_every_frame_is_rgb_uint8(name: str, frames: int, height: int, width: int) -> None:
    images = dicom_frames(_bytes(name), name)
    assert int(_dataset(name).get("NumberOfFrames") or 1) == frames == len(images)
    for image in images:
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert images[0].max() > images[0].min(), "not a blank frame"


def test_multiframe_frames_differ() -> None:
    images = dicom_frames(_bytes("rtdose.dcm"))
    assert len({image.tobytes() for image in images}) > 1


# -- monochrome: rescale, window, MONOCHROME1 ----------------------------------------------------------------


def test_ct_rescale_and_window_match_the_standard_formula() -> None:
    ds = _dataset("CT_small.dcm")
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024) and "WindowCenter" not in ds
    raw = ds.pixel_array.astype(np.float64)

    # Without VOI attributes: the frame's own min..max (rescale is linear, so it equals raw min-max).
    unwindowed = _gray(dicom_frames(_to_bytes(ds)))
    raw_minmax = np.rint((raw - raw.min()) * 255 / (raw.max() - raw.min()))
    assert np.abs(unwindowed - raw_minmax).max() <= 1

    # A soft-tissue window (centre 40 HU, width 400), computed by hand in Hounsfield units.
    ds.WindowCenter, ds.WindowWidth = 40, 400
    windowed = _gray(dicom_frames(_to_bytes(ds), "ct.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(hu, raw - 1024)
    expected = np.clip((hu - (40 - 200)) * 255 / 400, 0, 255)
    assert np.abs(windowed - expected).max() <= 2
    # Direction: everything above 240 HU saturates at white, below -160 HU at black, where min-max did not.
    bright, dark = hu > 240, hu < -160
    assert bright.any() and dark.any()
    assert (windowed[bright] == 255).all() and (unwindowed[bright] < 255).any()
    assert (windowed[dark] == 0).all() and (unwindowed[dark] > 0).any()


def test_first_of_several_windows_is_used() -> None:
    ds = _dataset("MR_small.dcm")
    assert (ds.WindowCenter, ds.WindowWidth) == (600, 1600)
    single = _gray(dicom_frames(_to_bytes(ds)))
    expected = np.clip((ds.pixel_array.astype(np.float64) - (600 - 800)) * 255 / 1600, 0, 255)
    assert np.abs(single - expected).max() <= 2
    ds.WindowCenter, ds.WindowWidth = [600, 100], [1600, 50]
    assert (_gray(dicom_frames(_to_bytes(ds))) == single).all()


def test_monochrome1_is_inverted() -> None:
    ds = _dataset("MR_small.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    as_mono2 = _gray(dicom_frames(_to_bytes(ds)))
    ds.PhotometricInterpretation = "MONOCHROME1"
    as_mono1 = _gray(dicom_frames(_to_bytes(ds)))
    assert (as_mono1 + as_mono2 == 255).all()
    assert as_mono2.std() > 10


def test_enhanced_multiframe_uses_functional_groups() -> None:
    """Enhanced CT/MR keep rescale and window in functional groups; the result equals the top-level form."""
    ds = _dataset("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    expected = _gray(dicom_frames(_to_bytes(ds)))
    transform, voi = Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    voi.WindowCenter, voi.WindowWidth = 40, 400
    shared, per_frame = Dataset(), Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    per_frame.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([per_frame])
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    assert (_gray(dicom_frames(_to_bytes(ds))) == expected).all()


# -- colour --------------------------------------------------------------------------------------------------


def test_rgb_bars_come_out_in_order() -> None:
    image = dicom_frames(_bytes("SC_rgb_rle.dcm"))[0]
    assert image[0, 0].tolist() == [255, 0, 0]  # red, green, blue bars down the image
    assert image[25, 0].tolist() == [0, 255, 0]
    assert image[45, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_ybr_is_converted_to_rgb(name: str) -> None:
    assert _dataset(name).PhotometricInterpretation.startswith("YBR_FULL")
    rgb = dicom_frames(_bytes("SC_rgb_rle.dcm"))[0].astype(int)
    image = dicom_frames(_bytes(name))[0].astype(int)
    assert np.abs(image - rgb).mean() < 3 and np.abs(image[0, 0] - [255, 0, 0]).max() <= 6


def test_palette_colour_goes_through_its_lut() -> None:
    ds = _dataset("examples_palette.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    lut = apply_color_lut(ds.pixel_array, ds)
    expected = np.rint(lut.astype(np.float64) * 255 / np.iinfo(lut.dtype).max)
    image = dicom_frames(_bytes("examples_palette.dcm"))[0]
    assert np.array_equal(image, expected.astype(np.uint8))
    assert (image[..., 0] != image[..., 2]).any(), "palette output is in colour"


# -- compressed transfer syntaxes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "compressed", "tolerance"),
    [
        ("MR_small.dcm", "MR_small_RLE.dcm", 0),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm", 0),  # JPEG 2000 lossless (openjpeg)
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 0),  # JPEG-LS lossless (libjpeg)
        ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG lossless, process 14 SV1
        ("SC_rgb_rle.dcm", "SC_rgb_gdcm_KY.dcm", 3),  # JPEG 2000
        ("SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", 3),  # JPEG baseline, lossy, YBR_FULL
        ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd_jpeg.dcm", 3),
    ],
)
def test_compressed_decodes_like_its_uncompressed_twin(
    reference: str, compressed: str, tolerance: int
) -> None:
    assert _dataset(compressed).file_meta.TransferSyntaxUID.is_compressed
    expected = dicom_frames(_bytes(reference))[0].astype(int)
    image = dicom_frames(_bytes(compressed), compressed)[0].astype(int)
    assert image.shape == expected.shape
    assert np.abs(image - expected).mean() <= tolerance


def test_transfer_syntax_without_decoder_is_named() -> None:
    ds = _dataset("JPEG2000.dcm")  # already encapsulated, so it can be relabelled as a video syntax
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    with pytest.raises(DecodeError) as info:
        dicom_frames(_to_bytes(ds), "s3://pacs/video.dcm")
    assert info.value.uri == "s3://pacs/video.dcm"
    assert "MPEG2 Main Profile / Main Level" in info.value.reason
    assert "1.2.840.10008.1.2.4.100" in info.value.reason and "transcode" in info.value.reason


def test_decoder_failure_names_the_syntax_and_an_alternative() -> None:
    with pytest.raises(DecodeError) as info:  # 12-bit JPEG Extended that libjpeg and Pillow both reject
        dicom_frames(_bytes("JPEG-lossy.dcm"), "lossy.dcm")
    assert "JPEG Extended (Process 2 and 4)" in info.value.reason and "gdcm" in info.value.reason


# -- bad inputs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [100, 1000, 0.5, 0.8])
def test_truncated_file_raises_with_the_uri(cut: float) -> None:
    data = _bytes("MR_small.dcm")
    end = int(len(data) * cut) if isinstance(cut, float) else cut
    with pytest.raises(DecodeError) as info:
        dicom_frames(data[:end], "s3://bucket/mr.dcm")
    assert info.value.uri == "s3://bucket/mr.dcm" and "s3://bucket/mr.dcm" in str(info.value)


def test_bundled_truncated_file_raises() -> None:
    with pytest.raises(DecodeError, match="less than expected"):
        dicom_frames(_bytes("MR_truncated.dcm"), "MR_truncated.dcm")


@pytest.mark.parametrize("data", [b"patient,age\nanon,42\n" * 30, b"", b"\x89PNG\r\n\x1a\n" + bytes(300)])
def test_not_dicom_raises(data: bytes) -> None:
    with pytest.raises(DecodeError, match=r"notes\.txt.*not a DICOM file"):
        dicom_frames(data, "notes.txt")
    with pytest.raises(DecodeError, match=r"notes\.txt"):
        dicom_info(data, "notes.txt")


def test_object_without_pixels_raises() -> None:
    with pytest.raises(DecodeError, match="RTSTRUCT"):
        dicom_frames(_bytes("rtstruct.dcm"), "rtstruct.dcm")


def test_invalid_window_raises() -> None:
    ds = _dataset("MR_small.dcm")
    ds.WindowWidth = 0
    with pytest.raises(DecodeError, match="Window Width"):
        dicom_frames(_to_bytes(ds), "mr.dcm")


# -- NIfTI ---------------------------------------------------------------------------------------------------


def _nifti(volume: np.ndarray, slope: float = 1.0, inter: float = 0.0, *, gz: bool = False) -> bytes:
    image = nibabel.Nifti1Image(volume, np.eye(4))
    image.header.set_slope_inter(slope, inter)
    data = image.to_bytes()
    return gzip.compress(data) if gz else data


@pytest.mark.parametrize(
    "name",
    ["anatomical.nii", "functional.nii", "example4d.nii.gz", "standard.nii.gz", "example_nifti2.nii.gz"],
)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_bundled_nifti_slices(name: str, axis: int) -> None:
    path = os.path.join(NIBABEL_DATA, name)
    assert os.path.exists(path), f"{name} is not bundled with nibabel here"
    shape = nibabel.as_closest_canonical(nibabel.load(path)).shape
    with open(path, "rb") as f:
        slices = nifti_slices(f.read(), name, axis=axis)
    volumes = int(np.prod(shape[3:]))
    assert len(slices) == shape[axis] * volumes
    height, width = [shape[a] for a in (0, 1, 2) if a != axis][::-1]
    assert all(s.shape == (height, width, 3) and s.dtype == np.uint8 for s in slices)
    assert max(int(s.max()) for s in slices) == 255 and min(int(s.min()) for s in slices) == 0


def test_synthetic_volume_shapes_orientation_and_shared_scale() -> None:
    volume = np.zeros((6, 5, 4), dtype=np.int16)
    volume[:, :, 0] = 10  # a dim slice must stay dim, not be stretched to white
    volume[:, :, 1:] = np.arange(6 * 5 * 3, dtype=np.int16).reshape(6, 5, 3) + 100
    volume[0, 4, 3] = 30_000  # one hot voxel, beyond the 99th percentile, must not darken everything
    data = _nifti(volume)
    for axis, count, shape in [(0, 6, (4, 5)), (1, 5, (4, 6)), (2, 4, (5, 6))]:
        slices = nifti_slices(data, "v.nii", axis=axis)
        assert len(slices) == count and all(s.shape == (*shape, 3) for s in slices)
    axial = nifti_slices(data, axis=2)
    assert axial[0].max() == 0 and axial[3].max() == 255
    assert 0 < np.median(axial[2]) < 255, "the outlier clips instead of setting the scale"
    # Rotated for display: the first voxel row (x=0, y=max) is the top-left pixel.
    assert axial[3][0, 0, 0] == 255 and axial[3][-1, -1, 0] < 255


def test_scl_slope_is_applied() -> None:
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 1000, size=(8, 7, 5)).astype(np.int16)
    positive = np.stack(nifti_slices(_nifti(volume, slope=2.0, inter=5.0), axis=1)).astype(int)
    negative = np.stack(nifti_slices(_nifti(volume, slope=-2.0, inter=5.0), axis=1)).astype(int)
    assert np.abs(positive + negative - 255).max() <= 1, "a negative slope inverts the image"
    scaled = volume.astype(np.float64) * 2 + 5
    lo, hi = np.percentile(scaled, [1, 99])
    expected = np.clip(np.rint((scaled - lo) * 255 / (hi - lo)), 0, 255)
    expected = np.stack([np.rot90(expected[:, y, :]) for y in range(7)])
    assert np.abs(positive[..., 0] - expected).max() <= 1


def test_gzip_and_plain_nifti_agree() -> None:
    volume = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    plain = nifti_slices(_nifti(volume), "v.nii")
    assert all(np.array_equal(a, b) for a, b in zip(plain, nifti_slices(_nifti(volume, gz=True), "v.nii.gz")))


@pytest.mark.parametrize("data", [b"not a volume at all", b"", gzip.compress(b"x" * 400)])
def test_bad_nifti_raises_with_the_uri(data: bytes) -> None:
    with pytest.raises(DecodeError, match=r"brain\.nii\.gz.*NIfTI"):
        nifti_slices(data, "brain.nii.gz")


def test_truncated_nifti_raises() -> None:
    data = _nifti(np.ones((10, 10, 10), dtype=np.float32))
    with pytest.raises(DecodeError, match=r"brain\.nii.*NIfTI"):
        nifti_slices(data[: len(data) // 2], "brain.nii")


def test_non_spatial_axis_raises() -> None:
    with pytest.raises(DecodeError, match="axis must be 0, 1 or 2"):
        nifti_slices(_nifti(np.ones((2, 2, 2), dtype=np.float32)), "v.nii", axis=3)
