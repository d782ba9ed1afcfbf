"""Decoding in the model actor (annotate ``decode: actor``): JPEGs on the actor's device, nvJPEG on a GPU.

The read tasks then ship each file's encoded bytes (a 256 px JPEG is ~15 KB against 150 KB of decoded
224 px pixels), and the actor decodes a batch of baseline RGB or grayscale JPEGs in one call of
:func:`torchvision.io.decode_jpeg` on its device, then resizes there with antialiased bilinear
interpolation (within a level of Pillow's resize; the read tasks also decode large JPEGs at a reduced DCT
scale, which moves pixels by 0.1-0.25 level on average). Every other file goes the CPU way of the
read tasks (:func:`raycv.data.images.decode_reduced`, then :func:`raycv.data.images.resize_rgb`), and so
does a JPEG that needs more than the GPU decoder does: EXIF orientation (applied on CPU only), CMYK/YCCK,
or one nvJPEG refuses. A file Pillow cannot decode either gets that decode error, as in the read tasks.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from raycv.data.images import decode_reduced, resize_rgb
from raycv.errors import error_fields

_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112


@dataclass
class Decoded:
    """One image: [3, h, w] float in 0..1 on the device (None on failure), its original size, its error."""

    pixels: torch.Tensor | None
    width: int = -1
    height: int = -1
    error: tuple[str, str, str] | None = None


def device_decodable(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a JPEG the device decoder handles as Pillow would, else None.

    That is a baseline/progressive JPEG in RGB (YCbCr) or grayscale, without an EXIF rotation, within
    ``max_pixels``. Reads the header only.
    """
    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            if im.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
                return None
            width, height = im.size
    except Exception:
        return None  # the CPU path gives the file its decode error
    return (width, height) if width * height <= max_pixels else None


def _decode_jpegs(datas: list[bytes], device: str) -> list[torch.Tensor | None]:
    """[3, H, W] uint8 tensors on ``device``; one call for the batch, per file if that fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []  # decode_jpeg refuses an empty list
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():
        # Deprecated in torchvision 0.29 in favour of TorchCodec's decoders (not a dependency of raycv yet).
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except Exception:  # "no partial results": find the file(s) at fault
            out: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                except Exception:  # the CPU path decodes it, or gives it its decode error
                    out.append(None)
            return out


def _resized(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] uint8 -> [3, h, w] float in 0..1 (antialiased bilinear, as Pillow's resize)."""
    x = image.float().div_(255.0)
    if tuple(x.shape[1:]) != tuple(size_hw):
        x = F.interpolate(x[None], size=size_hw, mode="bilinear", antialias=True, align_corners=False)[0]
    return x.clamp_(0.0, 1.0)


def _on_cpu(data: bytes, uri: str, size_hw: tuple[int, int], device: str, max_pixels: int) -> Decoded:
    try:
        image, width, height = decode_reduced(data, uri, size_hw, max_pixels=max_pixels)
    except Exception as exc:
        return Decoded(None, error=error_fields("decode", exc))
    pixels = torch.from_numpy(resize_rgb(image, size_hw)).to(device).permute(2, 0, 1).float().div_(255.0)
    return Decoded(pixels, width, height)


def decode_batch(
    datas: list[bytes], uris: list[str], size_hw: tuple[int, int], device: str, *, max_pixels: int
) -> list[Decoded]:
    """Decode and resize a batch of encoded images on ``device`` (see the module docstring)."""
    out: list[Decoded | None] = [None] * len(datas)
    fast = {i: wh for i, d in enumerate(datas) if (wh := device_decodable(d, max_pixels)) is not None}
    order = sorted(fast)
    for i, image in zip(order, _decode_jpegs([datas[i] for i in order], device), strict=True):
        if image is not None:
            width, height = fast[i]
            out[i] = Decoded(_resized(image, size_hw), width, height)
    return [
        d if d is not None else _on_cpu(datas[i], uris[i], size_hw, device, max_pixels)
        for i, d in enumerate(out)
    ]
