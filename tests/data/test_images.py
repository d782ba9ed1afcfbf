"""raycv.data.images: every format decodes to the displayed RGB pixels; every bad input says why.

The inputs are the generated edge-case files of ``special_images.make_special_images`` plus a few made here
(16-bit colour PNG written chunk by chunk, since Pillow cannot save one).
"""

from __future__ import annotations

import io
import struct
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from raycv.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    decode_image,
    decode_png_mask,
    decode_reduced,
    encode_png,
    image_header,
    resize_rgb,
)
from raycv.data.special_images import make_special_images
from raycv.errors import DecodeError

SPECIAL = make_special_images()
GOOD = [name for name in SPECIAL if name not in ("truncated.jpg", "empty.png", "text.png", "bomb.png")]


def _save(im: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """[H, W, 3] uint16 as a 16-bit-per-channel RGB PNG."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _close(pixel: np.ndarray, expected: tuple[int, int, int], tolerance: int = 3) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(expected)) <= tolerance))


# -- Formats and modes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOOD)
def test_every_good_file_decodes_to_contiguous_writeable_rgb_matching_its_header(name):
    image = decode_image(SPECIAL[name], name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.flags.c_contiguous and image.flags.writeable
    height, width = image.shape[:2]
    assert image_header(SPECIAL[name], name) == (width, height)


@pytest.mark.parametrize(
    ("name", "shape", "checks"),
    [
        ("image.bmp", (16, 24, 3), {(8, 2): (0, 255, 0), (8, 20): (0, 0, 255)}),
        ("image.tif", (32, 48, 3), {(0, 0): (255, 0, 0), (31, 47): (255, 0, 0)}),  # page 1 is blue 16x16
        ("image.webp", (20, 30, 3), {(10, 15): (255, 0, 0)}),  # frame 1 is blue
        ("palette.gif", (20, 30, 3), {(10, 3): (0, 160, 0), (10, 25): (255, 255, 255)}),  # transparent: white
        ("cmyk.jpg", (64, 64, 3), {(16, 16): (0, 255, 255), (16, 48): (255, 0, 255), (48, 48): (0, 0, 0)}),
        ("rgba.png", (16, 48, 3), {(8, 8): (255, 255, 255), (8, 24): (127, 127, 127), (8, 40): (0, 0, 255)}),
    ],
)
def test_first_frame_transparency_and_colour_spaces(name, shape, checks):
    image = decode_image(SPECIAL[name], name)
    assert image.shape == shape
    for (y, x), expected in checks.items():
        assert _close(image[y, x], expected), f"{name} at {(y, x)}: {image[y, x]} != {expected}"
    if name == "cmyk.jpg":
        assert _close(image[48, 16], (255, 255, 0))


def test_gray16_ramp_is_scaled_by_full_range_not_clipped():
    image = decode_image(SPECIAL["gray16.png"], "gray16.png")
    assert image.shape == (8, 512, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    row = image[0, :, 0].astype(int)
    assert row.min() == 0 and row.max() == 255 and len(np.unique(row)) >= 200
    assert (np.diff(row) >= 0).all()
    ramp = np.rint(np.linspace(0, 65535, 512)).astype(np.int64)
    assert (row == (ramp * 255 + 32767) // 65535).all()  # v * 255 / 65535, rounded


@pytest.mark.parametrize("dtype", [">u2", "<u2"])
def test_16bit_tiff_in_either_byte_order(dtype):
    ramp = np.rint(np.linspace(0, 65535, 300)).astype(dtype)[None, :].repeat(2, axis=0)
    data = _save(Image.fromarray(ramp), "TIFF")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    row = decode_image(data, "ramp.tif")[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and len(np.unique(row)) >= 200


def test_16bit_rgb_png_keeps_full_range():
    ramp = np.rint(np.linspace(0, 65535, 300)).astype(np.uint16)
    pixels = np.stack([ramp, ramp[::-1], np.full_like(ramp, 32768)], axis=-1)[None].repeat(2, axis=0)
    image = decode_image(_png_16bit_rgb(pixels), "rgb16.png")
    assert image.shape == (2, 300, 3)
    assert image[0, :, 0].min() == 0 and image[0, :, 0].max() == 255 and len(np.unique(image[0, :, 0])) >= 200
    assert image[0, 0, 1] == 255 and abs(int(image[0, 0, 2]) - 128) <= 1


def _png_chunks(data: bytes) -> dict[bytes, bytes]:
    """A PNG's chunks, type -> payload (the last of each type)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks[data[pos + 4 : pos + 8]] = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return chunks


@pytest.mark.parametrize(
    ("key", "row"),
    [(1000, [0, 255, 4, 156, 255]), (0, [255, 4, 4, 156, 255]), (40000, [0, 4, 4, 255, 255])],
)
def test_16bit_gray_png_colour_key_is_composited_over_white(key, row):
    values = np.array([[0, 1000, 1001, 40000, 65535]], dtype=np.uint16).repeat(3, axis=0)
    data = _save(Image.fromarray(values), "PNG", transparency=key)
    chunks = _png_chunks(data)
    assert chunks[b"IHDR"][8:10] == bytes([16, 0])  # bit depth 16, colour type 0: 16-bit grayscale
    assert chunks[b"tRNS"] == struct.pack(">H", key)  # the colour key, a 16-bit sample
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode in ("I;16", "I") and im.info["transparency"] == key
    image = decode_image(data, "keyed16.png")
    assert image.shape == (3, 5, 3) and (image == image[..., :1]).all()
    # only the exact key is transparent: 1001 scales to the same grey as 1000 and stays grey
    assert (image[..., 0] == row).all()


def test_int32_and_float_images():
    in_16bit_range = np.array([[0, 65535]], dtype=np.int32)
    assert decode_image(_save(Image.fromarray(in_16bit_range), "TIFF"))[0, :, 0].tolist() == [0, 255]
    signed = np.array([[-1000, 0, 1000]], dtype=np.int32)  # not 16-bit data: stretched min..max
    assert decode_image(_save(Image.fromarray(signed), "TIFF"))[0, :, 0].tolist() == [0, 128, 255]
    floats = np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)
    assert decode_image(_save(Image.fromarray(floats), "TIFF"))[0, :, 0].tolist() == [0, 64, 255]
    constant = np.full((2, 2), 7.5, dtype=np.float32)
    assert (decode_image(_save(Image.fromarray(constant), "TIFF")) == 0).all()


def test_gray_bilevel_and_colour_key_transparency():
    gray = decode_image(SPECIAL["gray.png"], "gray.png")
    assert (gray[..., 0] == gray[..., 2]).all() and gray[0, :, 0].tolist() == list(range(256))
    bilevel = decode_image(_save(Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1"), "PNG"))
    assert bilevel[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), mode="LA")
    assert decode_image(_save(la, "PNG"))[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    keyed = Image.fromarray(np.array([[[10, 20, 30], [40, 50, 60]]], dtype=np.uint8))
    assert decode_image(_save(keyed, "PNG", transparency=(10, 20, 30)))[0].tolist() == [
        [255, 255, 255],
        [40, 50, 60],
    ]


def test_lab_and_ycbcr_are_converted_to_rgb():
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    for mode in ("LAB", "YCbCr"):
        image = decode_image(_save(red.convert(mode) if mode == "YCbCr" else _lab(red), "TIFF"), mode)
        assert image[0, 0, 0] > 225 and image[0, 0, 1] < 30 and image[0, 0, 2] < 30, (mode, image[0, 0])


def _lab(im: Image.Image) -> Image.Image:
    from PIL import ImageCms

    transform = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    result = ImageCms.applyTransform(im, transform)
    assert result is not None and result.mode == "LAB"
    return result


# -- EXIF orientation -------------------------------------------------------------------------------------


def test_exif_orientation_6_turns_a_40x20_jpeg_upright():
    image = decode_image(SPECIAL["exif_rotated.jpg"], "exif_rotated.jpg")
    assert image.shape == (40, 20, 3)  # 40 high, 20 wide
    # The stored left half (red) is displayed on top.
    assert _close(image[5, 10], (255, 0, 0), 4) and _close(image[35, 10], (0, 0, 255), 4)
    assert image_header(SPECIAL["exif_rotated.jpg"]) == (20, 40)


@pytest.mark.parametrize(
    ("fmt", "orientation", "shape", "top_left"),
    [
        ("PNG", 6, (40, 20, 3), (255, 0, 0)),
        ("WEBP", 6, (40, 20, 3), (255, 0, 0)),
        ("TIFF", 6, (40, 20, 3), (255, 0, 0)),
        ("TIFF", 8, (40, 20, 3), (0, 0, 255)),
        ("PNG", 3, (20, 40, 3), (0, 0, 255)),
        ("JPEG", 1, (20, 40, 3), (255, 0, 0)),
    ],
)
def test_exif_orientation_in_every_format(fmt, orientation, shape, top_left):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20], pixels[:, 20:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = _save(Image.fromarray(pixels), fmt, exif=exif.tobytes(), **options)
    image = decode_image(data, f"o{orientation}.{fmt}")
    assert image.shape == shape and _close(image[0, 0], top_left, 4)
    assert image_header(data) == (shape[1], shape[0])


def test_corrupt_exif_keeps_the_stored_orientation():
    data = _save(Image.new("RGB", (40, 20), (9, 9, 9)), "JPEG", exif=b"Exif\x00\x00garbage, not TIFF")
    assert decode_image(data, "bad_exif.jpg").shape == (20, 40, 3)
    assert image_header(data, "bad_exif.jpg") == (40, 20)


# -- Decoding for a target size -----------------------------------------------------------------------------


def _shapes_jpeg(width: int, height: int, **options: object) -> tuple[bytes, np.ndarray]:
    from raycv.data import synthetic

    rng = np.random.default_rng(width * 7 + height)
    square = synthetic.render_classification_sample(rng, 1, size=max(width, height))
    pixels = np.ascontiguousarray(square[:height, :width])
    return _save(Image.fromarray(pixels), "JPEG", quality=90, **options), pixels


@pytest.mark.parametrize(
    ("width", "height", "size_hw", "decoded_hw"),
    [
        (512, 512, (112, 112), (256, 256)),  # 1/2: 1/4 would leave less than twice 112
        (1024, 1024, (112, 112), (256, 256)),  # 1/4
        (2048, 1024, (100, 200), (256, 512)),  # 1/4: height and width each keep twice their target
        (1600, 1600, (96, 96), (200, 200)),  # 1/8
        (256, 256, (224, 224), (256, 256)),  # under twice the target: in full
        (448, 300, (224, 150), (300, 448)),
    ],
)
def test_decode_reduced_decodes_large_jpegs_smaller_and_resizes_like_a_full_decode(
    width, height, size_hw, decoded_hw
):
    data, _ = _shapes_jpeg(width, height)
    image, w, h = decode_reduced(data, "a.jpg", size_hw)
    assert image.shape == (*decoded_hw, 3) and image.flags.c_contiguous and image.flags.writeable
    assert (w, h) == (width, height)  # the original size, for the output's width/height columns
    full = resize_rgb(decode_image(data), size_hw).astype(np.int32)
    diff = np.abs(resize_rgb(image, size_hw).astype(np.int32) - full)
    if decoded_hw == (height, width):
        assert diff.max() == 0
    else:  # DCT scaling, then the antialiased resize from at least twice the size: within a level or two
        assert diff.mean() <= 0.4 and np.percentile(diff, 99) <= 3, (diff.mean(), diff.max())


def test_decode_reduced_keeps_exif_orientation_progressive_gray_and_cmyk():
    pixels = np.zeros((400, 800, 3), dtype=np.uint8)  # stored 800 wide: left half red, right half blue
    pixels[:, :400], pixels[:, 400:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed 400 wide x 800 high, the stored left half on top
    data = _save(Image.fromarray(pixels), "JPEG", exif=exif.tobytes())
    image, w, h = decode_reduced(data, "turned.jpg", (200, 100))
    assert (w, h) == (400, 800) == image_header(data)
    assert image.shape == (400, 200, 3)  # 1/2: twice (200, 100) as displayed
    assert _close(image[10, 100], (255, 0, 0), 6) and _close(image[390, 100], (0, 0, 255), 6)
    corrupt = _save(Image.fromarray(pixels), "JPEG", exif=b"Exif\x00\x00garbage, not TIFF")
    image, w, h = decode_reduced(corrupt, "bad_exif.jpg", (50, 100))
    assert (w, h) == (800, 400) and image.shape == (100, 200, 3)  # 1/4, stored orientation

    data, _ = _shapes_jpeg(640, 640, progressive=True)
    assert decode_reduced(data, "p.jpg", (80, 80))[0].shape == (160, 160, 3)
    gray = _save(Image.fromarray(np.full((640, 480), 77, np.uint8)), "JPEG")
    image, w, h = decode_reduced(gray, "g.jpg", (80, 60))
    assert image.shape == (160, 120, 3) and (w, h) == (480, 640) and _close(image[80, 60], (77, 77, 77), 2)
    cmyk = _save(Image.new("CMYK", (640, 480), (0, 255, 255, 0)), "JPEG")  # red
    image, w, h = decode_reduced(cmyk, "c.jpg", (60, 80))
    assert image.shape == (120, 160, 3) and (w, h) == (640, 480) and _close(image[60, 80], (255, 0, 0), 6)
    png, _ = _save(Image.new("RGB", (640, 480), (1, 2, 3)), "PNG"), None
    assert decode_reduced(png, "a.png", (60, 80))[0].shape == (480, 640, 3)  # other formats: in full


def test_decode_reduced_checks_max_pixels_on_the_full_size():
    data, _ = _shapes_jpeg(1000, 1000)
    with pytest.raises(DecodeError, match="1000x1000 = 1000000 pixels, over the limit of 500000"):
        decode_reduced(data, "big.jpg", (50, 50), max_pixels=500_000)
    assert decode_reduced(data, "big.jpg", (50, 50), max_pixels=1_000_000)[0].shape == (125, 125, 3)


# -- Bad inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.png", "empty file (0 bytes)"),
        ("text.png", "not a recognised image format: the file looks like text"),
        ("truncated.jpg", "truncated image data"),
    ],
)
def test_bad_special_files_raise_decode_error_naming_uri_and_reason(name, reason):
    uri = f"s3://bucket/archive/{name}"
    with pytest.raises(DecodeError) as caught:
        decode_image(SPECIAL[name], uri)
    assert uri in str(caught.value) and reason in str(caught.value)
    assert caught.value.uri == uri and reason in caught.value.reason
    if name != "empty.png":
        assert caught.value.__cause__ is not None  # raise ... from the library's own error


def test_truncated_images_raise_and_pillow_is_not_set_to_load_them():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "GIF", "BMP", "TIFF", "WEBP"):
        data = _save(noise, fmt)
        with pytest.raises(DecodeError, match="truncated image data"):
            decode_image(data[: len(data) // 2], f"half.{fmt}")
    png_header_only = _save(noise, "PNG")[:30]
    with pytest.raises(DecodeError, match="truncated image data or a corrupt PNG header"):
        decode_image(png_header_only, "cut.png")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "the file is a PDF document"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "looks like HTML"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "XML/SVG"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF/HEIC photo; install"),
        (bytes(range(200, 256)), "it starts with bytes c8 c9 ca cb"),
    ],
)
def test_not_an_image_says_what_the_bytes_look_like(data, expected):
    with pytest.raises(DecodeError, match="not a recognised image format") as caught:
        decode_image(data, "mystery.jpg")
    assert expected in str(caught.value) and "mystery.jpg" in str(caught.value)


def test_header_errors():
    with pytest.raises(DecodeError, match="empty file"):
        image_header(b"", "e.png")
    with pytest.raises(DecodeError, match="not a recognised image format"):
        image_header(SPECIAL["text.png"], "t.png")


# -- Pixel limit ------------------------------------------------------------------------------------------


def test_bomb_is_rejected_from_its_header_quickly_with_the_fix():
    assert len(SPECIAL["bomb.png"]) < 1_000_000
    start = time.perf_counter()
    with pytest.raises(DecodeError) as caught:
        decode_image(SPECIAL["bomb.png"], "bomb.png")
    # Decoding 256 megapixels would take seconds and a gigabyte; the header check takes milliseconds.
    assert time.perf_counter() - start < 0.5
    message = str(caught.value)
    assert "bomb.png" in message and "16000x16000 = 256000000 pixels" in message
    assert str(DEFAULT_MAX_PIXELS) in message and "raise max_pixels" in message


def test_header_of_a_bomb_is_read_without_pillow_warnings_or_errors():
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked DecompressionBombWarning would fail here
        assert image_header(SPECIAL["bomb.png"], "bomb.png") == (16000, 16000)
        with pytest.raises(DecodeError, match="over the limit of 1000000"):
            decode_image(SPECIAL["bomb.png"], "bomb.png", max_pixels=1_000_000)
    assert before == Image.MAX_IMAGE_PIXELS


def test_max_pixels_is_per_call_and_inclusive():
    data = _save(Image.new("RGB", (64, 64)), "PNG")
    assert decode_image(data, max_pixels=64 * 64).shape == (64, 64, 3)
    with pytest.raises(DecodeError, match=r"64x64 = 4096 pixels, over the limit of 4095"):
        decode_image(data, "small.png", max_pixels=64 * 64 - 1)
    with pytest.raises(ValueError, match="max_pixels must be a positive"):
        decode_image(data, max_pixels=0)


def test_pillow_global_limit_neither_applies_nor_changes(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would raise on a 64x64 image
    data = _save(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data).shape == (64, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(Image.DecompressionBombError):  # other code still gets Pillow's protection
        Image.open(io.BytesIO(data))


def test_concurrent_decodes_restore_pillow_limit():
    before = Image.MAX_IMAGE_PIXELS
    files = [SPECIAL[name] for name in GOOD] * 20 + [SPECIAL["bomb.png"]] * 5
    failures: list[BaseException] = []

    def work(chunk: list[bytes]) -> None:
        for data in chunk:
            try:
                decode_image(data)
            except DecodeError:
                pass
            except BaseException as e:  # anything else is a bug
                failures.append(e)

    threads = [threading.Thread(target=work, args=(files[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and before == Image.MAX_IMAGE_PIXELS


# -- Label maps -------------------------------------------------------------------------------------------


def test_png_round_trips():
    labels = np.random.default_rng(0).integers(0, 21, size=(37, 53), dtype=np.uint8)
    encoded = encode_png(labels)
    assert encoded.startswith(b"\x89PNG")
    decoded = decode_png_mask(encoded)
    assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous and (decoded == labels).all()
    rgb = np.random.default_rng(1).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    assert (decode_image(encode_png(rgb)) == rgb).all()


def test_palette_masks_give_indices_not_colours():
    indices = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    voc = Image.fromarray(indices, mode="P")
    voc.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    assert (decode_png_mask(_save(voc, "PNG")) == indices).all()
    assert decode_png_mask(_save(Image.fromarray(np.array([[0, 3]], dtype=np.uint16)), "PNG")).tolist() == [
        [0, 3]
    ]


def test_mask_errors():
    with pytest.raises(ValueError, match="uint8 array, got int64"):
        encode_png(np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[H, W\] or \[H, W, 3\], got shape \(4, 4, 4\)"):
        encode_png(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(DecodeError, match=r"single-channel label map.*got mode RGB"):
        decode_png_mask(encode_png(np.zeros((4, 4, 3), dtype=np.uint8)), "rgb_mask.png")
    with pytest.raises(DecodeError, match="losslessly"):
        decode_png_mask(_save(Image.new("L", (4, 4)), "JPEG"), "mask.jpg")
    wide = Image.fromarray(np.array([[0, 300]], dtype=np.uint16))
    with pytest.raises(DecodeError, match=r"label values span 0..300"):
        decode_png_mask(_save(wide, "PNG"), "wide.png")
    with pytest.raises(DecodeError, match="empty file"):
        decode_png_mask(b"", "none.png")


def test_image_extensions_are_lower_case_and_known_to_pillow():
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    assert set(IMAGE_EXTENSIONS) <= set(Image.registered_extensions())
