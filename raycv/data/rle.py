"""COCO compressed RLE: how instance masks are stored (``mask_rle_size``, ``mask_rle_counts`` of ``objects``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> tuple[list[int], str]:
    """COCO compressed RLE of one binary mask.

    Args:
        mask: [H, W] bool (or 0/1 integers).

    Returns:
        ``([h, w], counts)``: the ``mask_rle_size`` and ``mask_rle_counts`` of the ``objects`` table; ``counts``
        is the compressed string pycocotools and every COCO evaluator read.
    """
    if mask.ndim != 2:
        raise ValueError(
            f"encode_rle takes one [H, W] mask, got shape {mask.shape}; encode masks one by one."
        )
    # pycocotools walks the pixels column by column: it needs a Fortran-ordered uint8 array.
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return [int(v) for v in rle["size"]], rle["counts"].decode("ascii")


def decode_rle(size: Sequence[int], counts: str | bytes) -> np.ndarray:
    """[H, W] bool mask from a COCO compressed RLE (``size = [h, w]``), the inverse of :func:`encode_rle`."""
    raw = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_utils.decode({"size": [int(size[0]), int(size[1])], "counts": raw}).astype(bool)
