"""Why an image could not be decoded, in words: the reason of a :class:`~raycv.errors.DecodeError` (truncated
data, a corrupt header, or what the bytes are instead: a PDF, HTML, a HEIC photo, ...)."""

from __future__ import annotations

# Magic numbers, to say what a file is when Pillow cannot open it.
_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
_OTHER_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000 data"),
    (b"\xff\x0a", "JPEG XL data, which Pillow cannot read"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL data, which Pillow cannot read"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1")


def failure_reason(exc: BaseException, data: bytes) -> str:
    """The reason for ``exc``, raised while Pillow parsed or decoded ``data``."""
    message = str(exc) or type(exc).__name__
    if "truncated" in message.lower() or isinstance(exc, EOFError) or _riff_is_short(data):
        return f"truncated image data ({len(data)} bytes): {message}"
    return f"{type(exc).__name__}: {message}"


def _riff_is_short(data: bytes) -> bool:
    """A WebP whose RIFF header declares more bytes than the file holds (libwebp only says it failed)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return len(data) < 8 + int.from_bytes(data[4:8], "little")


def unidentified_reason(data: bytes) -> str:
    """The reason Pillow could not identify ``data`` as an image."""
    for magic, name in _IMAGE_SIGNATURES:
        if data.startswith(magic):
            return (
                f"truncated image data or a corrupt {name} header ({len(data)} bytes); Pillow cannot parse it"
            )
    if _riff_is_short(data):
        return f"truncated image data ({len(data)} bytes): the WebP header declares more"
    return f"not a recognised image format: {_describe(data)}"


def _describe(data: bytes) -> str:
    """What the first bytes look like, in words."""
    for magic, name in _OTHER_SIGNATURES:
        if data.startswith(magic):
            return f"the file is {name}"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "the file is a HEIF/HEIC photo; install and register the pillow-heif plugin to read it"
    text = _as_text(data[:256])
    if text is not None:
        stripped = text.lstrip().lower()
        kind = "HTML" if stripped.startswith(("<!doctype html", "<html")) else "text"
        if stripped.startswith(("<?xml", "<svg")):
            kind = "XML/SVG (vector graphics are not decoded)"
        return f"the file looks like {kind}: {text[:40]!r}"
    return f"it starts with bytes {data[:8].hex(' ')}"


def _as_text(head: bytes) -> str | None:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # a real decoding error, not a character cut by the slice
            return None
        text = head[: e.start].decode("utf-8")
    printable = all(c.isprintable() or c in "\r\n\t" for c in text)
    return text if text and printable else None
