"""Image bytes to RGB arrays, for every file an archive may hold, and label maps to and from PNG.

``Image.open(...).convert("RGB")`` goes wrong on real archives in ways that do not raise; each rule below
fixes one of them:

- EXIF orientation is applied, so height and width are the displayed ones (phone photos are stored sideways).
- 16-bit grayscale is scaled by its full range (``v * 255 / 65535``), not clipped to 255. 16-bit RGB(A)
  arrives from Pillow already reduced to its high byte, which keeps the full range too. 32-bit float
  images are stretched from their min..max.
- Transparent pixels (RGBA, LA, palette or colour-key transparency, 16-bit grayscale's key included) are
  composited over **white**: scanned documents, logos and product shots are drawn for a white page, and a
  model never sees the arbitrary colour stored under alpha 0.
- Multi-frame files (multipage TIFF, animated GIF/WebP) give their first frame.
- The pixel count is checked from the header before any pixel is decoded; the limit is a per-call argument.
  Pillow's own global limit is lifted while raycv decodes, so its warning and error never leak.
- Truncated files raise (Pillow's ``LOAD_TRUNCATED_IMAGES`` is left off): a half-grey image is worse than
  an error row.

Every failure is a :class:`~raycv.errors.DecodeError` naming the URI and the reason.
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from raycv.data.image_errors import failure_reason, unidentified_reason
from raycv.errors import DecodeError

DEFAULT_MAX_PIXELS = 178_956_970
"""Pillow's hard limit (twice its warning limit of 89,478,485 pixels); raise it per call for large scenes."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_LOSSY_FORMATS = ("JPEG", "MPO")


# -- Pillow's global pixel limit ---------------------------------------------------------------------------

_limit_lock = threading.Lock()
_limit_users = 0
_limit_saved: int | None = None


@contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    """Lift ``Image.MAX_IMAGE_PIXELS`` while at least one raycv decode runs in this process.

    Pillow reads that module global at every check (open, load, GIF frames, TIFF tiles), warns above it and
    raises above twice it. raycv checks the size itself with the caller's limit (``_check_pixels``) before
    any pixel is decoded, so Pillow's check is switched off meanwhile and restored when the last concurrent
    decode ends; threads share one count, so no decode ever restores the limit under another's feet.
    """
    global _limit_users, _limit_saved
    with _limit_lock:
        if _limit_users == 0:
            _limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            # Leave alone a value that other code set while we were decoding.
            if _limit_users == 0 and Image.MAX_IMAGE_PIXELS is None:
                Image.MAX_IMAGE_PIXELS = _limit_saved


# -- Public API ----------------------------------------------------------------------------------------------


def decode_image(data: bytes, uri: str = "", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image into the RGB pixels a viewer would display.

    Args:
        data: the file's bytes (JPEG, PNG, TIFF, BMP, WebP, GIF or any format Pillow reads).
        uri: where the bytes came from; only used in error messages.
        max_pixels: largest ``width * height`` accepted, checked from the header before decoding.

    Returns:
        [H, W, 3] uint8 RGB, C-contiguous and writeable, H and W after EXIF orientation.

    Raises:
        DecodeError: empty, not an image, truncated, corrupt, or over ``max_pixels``.
        ValueError: ``max_pixels`` is not positive.
    """
    return _decode(data, uri, max_pixels, None)[0]


def decode_reduced(
    data: bytes, uri: str, size_hw: tuple[int, int], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, int, int]:
    """:func:`decode_image` for a caller that resizes the image to ``size_hw`` next (with :func:`resize_rgb`).

    A JPEG at least four times ``size_hw`` in both dimensions is decoded at 1/2, 1/4 or 1/8 scale in the
    DCT domain (libjpeg's scaling, Pillow's ``draft``), never below twice ``size_hw``, as Pillow's
    ``thumbnail`` does: the antialiased resize that follows then gives the full decode's result within a
    level or two (mean difference 0.1-0.25 level on shapes of 512-3,000 px, tested) for 1.6x (512 px to
    112) to 4x (3,000 px to 224) less CPU. Other formats and smaller JPEGs decode in full.

    Returns:
        (the [H', W', 3] uint8 RGB pixels, the image's width, its height), the size as displayed at full
        resolution (after EXIF orientation), whatever scale was decoded.

    Raises:
        DecodeError: as :func:`decode_image` (``max_pixels`` applies to the full-resolution size).
    """
    return _decode(data, uri, max_pixels, (int(size_hw[0]), int(size_hw[1])))


def image_header(data: bytes, uri: str = "") -> tuple[int, int]:
    """``(width, height)`` as displayed (after EXIF orientation), read from the header without decoding.

    No pixel limit applies: this is how a planner learns that an image needs tiling. A PNG's eXIf chunk
    placed after the pixel data (rare; the PNG spec asks for it before) is only seen by :func:`decode_image`.

    Raises:
        DecodeError: empty, not an image, or a header Pillow cannot parse.
    """
    with _pillow_limit_lifted(), _open(data, uri) as im:
        width, height = _stored_size(im)
        if _header_orientation(im) in _ROTATED:
            width, height = height, width
    return int(width), int(height)


def resize_rgb(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8, Pillow's bilinear (antialiased when shrinking); [H, W, C] (the
    bands of a raster, :mod:`raycv.data.bands`) band by band, the same interpolation.

    The one resize of training, evaluation and annotation (through
    :func:`raycv.data.transforms.to_tensor_resized`), so all see the same pixels; it needs no torch, which
    keeps the annotation read tasks light to start (importing torch and torchvision costs a new worker
    ~4 CPU-seconds). It is within one level of torch's antialiased bilinear interpolation in float.
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] != 3:  # an N-band raster: each band as a grayscale image
        return np.stack([resize_rgb(image[:, :, c], (h, w)) for c in range(image.shape[2])], axis=2)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.Resampling.BILINEAR)
    return np.array(resized)  # writable (np.asarray of a Pillow image is read-only)


def encode_png(array: np.ndarray) -> bytes:
    """Encode [H, W] uint8 (a label map, saved as 8-bit grayscale) or [H, W, 3] uint8 RGB as PNG.

    Raises:
        ValueError: any other dtype or shape.
    """
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(
            f"encode_png expects a uint8 array, got {got}; cast label maps with .astype(np.uint8)."
        )
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"encode_png expects [H, W] or [H, W, 3], got shape {tuple(array.shape)}.")
    buffer = io.BytesIO()
    # Pillow's default level 6: on a 1024x1024 label map, 8 KB in 6.3 ms against level 1's 14 KB in 4.9 ms.
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png_mask(data: bytes, uri: str = "") -> np.ndarray:
    """Decode a label map: one class index per pixel.

    8-bit grayscale gives its values, palette images (Pascal VOC style) their palette indices, 1-bit
    images 0/1, 16-bit images their values when all fit in uint8.

    Returns:
        [H, W] uint8, C-contiguous.

    Raises:
        DecodeError: undecodable bytes, a lossy format, several channels, or labels above 255.
    """
    with _pillow_limit_lifted(), _open(data, uri) as im:
        if im.format in _LOSSY_FORMATS:
            raise DecodeError(
                uri, f"label maps must be stored losslessly (PNG); {im.format} changes label values"
            )
        try:
            im.load()
            labels = _label_values(im, uri)
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(uri, failure_reason(e, data)) from e
    return np.ascontiguousarray(labels)


# -- Decoding -------------------------------------------------------------------------------------------------


def _decode(
    data: bytes, uri: str, max_pixels: int, reduce_for: tuple[int, int] | None
) -> tuple[np.ndarray, int, int]:
    """(pixels, full width, full height) as displayed; JPEGs drafted down towards twice ``reduce_for``."""
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive pixel count, got {max_pixels}.")
    with _pillow_limit_lifted(), _open(data, uri) as im:
        _check_pixels(im, uri, max_pixels)
        width, height = im.size
        try:
            turned = _draft(im, reduce_for) if reduce_for is not None and im.format == "JPEG" else None
            stored = im.size  # the size the decoder delivers, before orientation
            im.load()  # Image.open leaves multi-frame files on frame 0: this decodes only the first frame
            _exif_transpose(im)
            rgb = _to_rgb(im)
        except MemoryError:
            raise
        except Exception as e:
            raise DecodeError(uri, failure_reason(e, data)) from e
    if stored == (width, height):  # decoded in full: the pixels have the displayed size
        return np.ascontiguousarray(rgb), rgb.shape[1], rgb.shape[0]
    if stored[0] != stored[1]:  # did the orientation turn it? the pixels say (a corrupt EXIF may not)
        turned = rgb.shape[:2] == stored
    return np.ascontiguousarray(rgb), *((height, width) if turned else (width, height))


def _draft(im: Image.Image, size_hw: tuple[int, int]) -> bool:
    """Ask the JPEG decoder for the smallest DCT scale that keeps twice ``size_hw`` (as displayed) in both
    dimensions; returns whether the EXIF orientation turns the image by 90 degrees."""
    turned = _header_orientation(im) in _ROTATED
    h, w = size_hw
    if turned:
        h, w = w, h  # the decoder works in the stored orientation
    im.draft(None, (2 * w, 2 * h))
    return turned


# -- Opening and checking -----------------------------------------------------------------------------------


def _open(data: bytes, uri: str) -> Image.Image:
    if not data:
        raise DecodeError(uri, "empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise DecodeError(uri, unidentified_reason(data)) from e
    except MemoryError:
        raise
    except Exception as e:  # plugins raise OSError, SyntaxError, ValueError, struct.error... on bad headers
        raise DecodeError(uri, failure_reason(e, data)) from e


def _check_pixels(im: Image.Image, uri: str, max_pixels: int) -> None:
    width, height = im.size
    if width * height > max_pixels:
        raise DecodeError(
            uri,
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
            "tile it or raise max_pixels",
        )


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """Width and height as stored, before any orientation.

    Recent Pillow already swaps a TIFF's ``size`` for orientations 5-8 at open (and rotates on load), older
    Pillow does not: the TIFF tags say what is stored whichever Pillow runs.
    """
    tags = getattr(im, "tag_v2", None)
    if im.format == "TIFF" and tags is not None and 256 in tags and 257 in tags:
        return int(tags[256]), int(tags[257])
    return im.size


def _header_orientation(im: Image.Image) -> int:
    """The EXIF (or XMP) orientation found in the header, 1 if none or unreadable."""
    try:
        # The base method reads only what open() parsed; PngImageFile.getexif would decode every pixel to
        # look for an eXIf chunk placed after the image data.
        return int(Image.Image.getexif(im).get(ExifTags.Base.Orientation, 1))
    except Exception:  # corrupt EXIF must not cost a decodable image
        return 1


def _exif_transpose(im: Image.Image) -> None:
    """Turn the loaded image as displayed, in place (a copy of a large image costs as much as its decode).

    Corrupt EXIF keeps the stored orientation, as :func:`_header_orientation` does: it must not cost a
    decodable image.
    """
    with suppress(SyntaxError, ValueError, KeyError, TypeError, IndexError, struct.error, OSError):
        ImageOps.exif_transpose(im, in_place=True)


# -- Modes to RGB ----------------------------------------------------------------------------------------------


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in (*_SIXTEEN_BIT_MODES, "I"):
        return _gray_to_rgb(_wide_gray(im))
    if mode == "F":
        return _gray_to_rgb(_scale_min_max(np.asarray(im, dtype=np.float64)))
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _over_white(np.asarray(im.convert("RGBA")))
    if mode == "RGB":
        return np.array(im)
    return np.array(im.convert("RGB"))  # L, 1, P, CMYK (naive, no ICC), YCbCr, LAB, HSV, RGBX


def _wide_gray(im: Image.Image) -> np.ndarray:
    """A 16-bit (or mode ``I``) grayscale image as 0..255; the pixels equal to its colour key (a PNG ``tRNS``,
    ``info["transparency"]``) are fully transparent, so white, as over a white page.

    Pillow's own ``convert("RGBA")`` cannot do it: it clips the values at 255 and drops the key.
    """
    values = np.asarray(im)
    gray = _scale_16bit(values) if im.mode in _SIXTEEN_BIT_MODES else _scale_int32(values)
    key = im.info.get("transparency")
    if isinstance(key, int):
        gray[values == key] = 255
    return gray


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 to 0..255 by the full range, rounded half up (integer arithmetic, exact)."""
    wide = values.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _scale_int32(values: np.ndarray) -> np.ndarray:
    """Mode ``I`` is how Pillow exposes 16-bit data in several formats: scale by 16 bits when the values fit,
    else (true 32-bit or signed data) stretch min..max."""
    if values.size and values.min() >= 0 and values.max() <= 65535:
        return _scale_16bit(values)
    return _scale_min_max(values.astype(np.float64))


def _scale_min_max(values: np.ndarray) -> np.ndarray:
    """Stretch the finite values' min..max to 0..255; a constant image gives 0, NaN gives 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    clean = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    return np.rint((clean - low) * (255.0 / (high - low))).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA over a white background, rounded: ``(c * a + 255 * (255 - a)) / 255``."""
    rgb = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _label_values(im: Image.Image, uri: str) -> np.ndarray:
    if im.mode in ("L", "P"):
        return np.array(im)  # palette images: the indices, not the colours
    if im.mode == "1":
        return np.array(im, dtype=np.uint8)
    if im.mode in (*_SIXTEEN_BIT_MODES, "I"):
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DecodeError(uri, f"label values span {values.min()}..{values.max()}, outside uint8 0..255")
        return values.astype(np.uint8)
    raise DecodeError(uri, f"expected a single-channel label map (mode L or P), got mode {im.mode}")
