"""The files that break naive pipelines (truncated, empty, bombs, 16-bit, CMYK, alpha, EXIF, multi-frame), built in memory."""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

from raycv.data.synthetic import save_image

# -- Edge-case files -------------------------------------------------------------------------------------------


def make_special_images() -> dict[str, bytes]:
    """The files that break naive pipelines, name -> bytes, each small and built in memory.

    ``truncated.jpg`` (a JPEG cut in half), ``empty.png`` (0 bytes), ``text.png`` (UTF-8 text), ``bomb.png``
    (a valid 1-bit 16000x16000 PNG: 256 megapixels declared, ~31 KB on disk), ``gray16.png`` (16-bit ramp
    0..65535 over 512 columns), ``cmyk.jpg`` (quadrants cyan, magenta / yellow, black), ``rgba.png`` (three
    16-pixel bands: red at alpha 0, black at alpha 128, opaque blue), ``gray.png`` (8-bit ramp),
    ``exif_rotated.jpg`` (stored 40 wide x 20 high, left half red, orientation 6: displayed 20 wide x 40
    high, red on top), ``palette.gif`` (two frames; the first green on the left, transparent on the right),
    ``image.webp`` (two lossless frames, the first red), ``image.bmp`` (green left, blue right),
    ``image.tif`` (two pages, the first 48x32 red).
    """
    return dict(_special_images())


@lru_cache(maxsize=1)
def _special_images() -> tuple[tuple[str, bytes], ...]:
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    noise = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    jpeg = save_image(Image.fromarray(noise), "JPEG", quality=90)
    files = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.png": b"",
        "text.png": "This is a text file, not an image — résumé.txt renamed to .png\n".encode(),
        "bomb.png": _bomb_png(16000, 16000),
        "gray16.png": save_image(Image.fromarray(_ramp16(512)[None, :].repeat(8, axis=0)), "PNG"),
        "cmyk.jpg": save_image(_cmyk_quadrants(), "JPEG", quality=95),
        "rgba.png": save_image(_rgba_bands(), "PNG"),
        "gray.png": save_image(
            Image.fromarray(np.arange(256, dtype=np.uint8)[None, :].repeat(8, axis=0)), "PNG"
        ),
        "exif_rotated.jpg": _exif_rotated(),
        "palette.gif": _palette_gif(),
        "image.webp": _two_frames("WEBP", Image.new("RGB", (30, 20), red), Image.new("RGB", (30, 20), blue)),
        "image.bmp": save_image(_halves((16, 24), green, blue), "BMP"),
        "image.tif": _two_frames("TIFF", Image.new("RGB", (48, 32), red), Image.new("RGB", (16, 16), blue)),
    }
    return tuple(files.items())


def _two_frames(fmt: str, first: Image.Image, second: Image.Image) -> bytes:
    options = {"lossless": True, "duration": 100} if fmt == "WEBP" else {}
    return save_image(first, fmt, save_all=True, append_images=[second], **options)


def _ramp16(n: int) -> np.ndarray:
    return np.rint(np.linspace(0, 65535, n)).astype(np.uint16)


def _halves(height_width: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...]) -> Image.Image:
    height, width = height_width
    pixels = np.empty((height, width, len(left)), dtype=np.uint8)
    pixels[:, : width // 2], pixels[:, width // 2 :] = left, right
    return Image.fromarray(pixels)


def _cmyk_quadrants() -> Image.Image:
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[:32, :32, 0] = pixels[:32, 32:, 1] = pixels[32:, :32, 2] = pixels[32:, 32:, 3] = 255
    return Image.fromarray(pixels, mode="CMYK")


def _rgba_bands() -> Image.Image:
    pixels = np.zeros((16, 48, 4), dtype=np.uint8)
    pixels[:, :16] = (255, 0, 0, 0)  # red that must not show through
    pixels[:, 16:32] = (0, 0, 0, 128)
    pixels[:, 32:] = (0, 0, 255, 255)
    return Image.fromarray(pixels)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image is displayed turned 90 degrees clockwise
    return save_image(_halves((20, 40), (255, 0, 0), (0, 0, 255)), "JPEG", quality=95, exif=exif.tobytes())


def _palette_gif() -> bytes:
    first = Image.new("P", (30, 20), 0)
    first.putpalette([255, 255, 0, 0, 160, 0, 0, 0, 255] + [0] * (3 * 253))  # 0 transparent, 1 green, 2 blue
    first.paste(1, (0, 0, 15, 20))
    second = first.copy()
    second.paste(2, (0, 0, 30, 20))
    return save_image(
        first, "GIF", save_all=True, append_images=[second], transparency=0, duration=100, disposal=2
    )


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of all-black rows, streamed through zlib so it never exists in memory."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then packed bits
    compressor = zlib.compressobj(9)
    block = row * 1000
    idat = b"".join(compressor.compress(block) for _ in range(height // 1000))
    idat += compressor.compress(row * (height % 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
