"""How an image becomes a model's input size: torchvision's ``Resize`` (an int: the shorter side) and
``CenterCrop`` semantics over :func:`~raycv.data.images.resize_rgb`, without torch (the read tasks)."""

from __future__ import annotations

import numpy as np

from raycv.data.images import resize_rgb

Resize = int | tuple[int, int] | list[int] | None


def resized_size(height: int, width: int, resize: Resize) -> tuple[int, int]:
    """The size ``resize`` gives an image: an int sets the shorter side (the longer one scaled and truncated,
    as torchvision's ``Resize(int)``), ``[h, w]`` is exact, None keeps the size."""
    if resize is None:
        return height, width
    if isinstance(resize, int):
        if height <= width:
            return resize, int(resize * width / height)
        return int(resize * height / width), resize
    return int(resize[0]), int(resize[1])


def prepare_rgb(image: np.ndarray, resize: Resize, crop: Resize = None) -> np.ndarray:
    """[H, W, C] uint8 resized (:func:`resized_size`, :func:`resize_rgb`), then centre-cropped to ``crop``
    (an int: a square) as torchvision's ``CenterCrop``."""
    out = resize_rgb(image, resized_size(image.shape[0], image.shape[1], resize))
    if crop is None:
        return out
    ch, cw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    h, w = out.shape[:2]
    if ch > h or cw > w:  # as CenterCrop: pad with zeros first
        padded = np.zeros((max(h, ch), max(w, cw), out.shape[2]), np.uint8)
        top, left = (max(h, ch) - h) // 2, (max(w, cw) - w) // 2
        padded[top : top + h, left : left + w] = out
        out = padded
        h, w = int(out.shape[0]), int(out.shape[1])
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    return np.ascontiguousarray(out[top : top + ch, left : left + cw])
