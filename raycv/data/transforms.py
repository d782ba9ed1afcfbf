"""Tensor transforms shared by training, evaluation and annotation, so all three see the same pixels.

torchvision's functional transforms are imported by the augmentations that use them (rotation, colour
jitter), not here: importing torchvision costs a worker ~1.5 s, which the default augmentation (flips) skips.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from raycv.data.images import resize_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def per_band(values: tuple[float, ...] | list[float], bands: int) -> tuple[float, ...]:
    """RGB statistics (a mean or std) for ``bands`` input channels: repeated cyclically (R, G, B, R, ...), or
    their average for one band.

    This matches :func:`raycv.models.transfer.adapt_input_conv`, which repeats the RGB kernels the same way:
    an image whose bands repeat R, G, B, normalised so, gives an adapted model the RGB model's output.
    """
    if bands == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(bands))


def to_tensor_resized(image: np.ndarray, size_hw: tuple[int, int]) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, h, w] float in 0..1, resized to ``size_hw`` by :func:`resize_rgb` (the same
    uint8 pixels the annotation read stage ships to the model actors)."""
    return torch.from_numpy(resize_rgb(image, size_hw)).permute(2, 0, 1).float().div_(255.0)


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[N, C, H, W] or [C, H, W] float in 0..1 -> normalised by per-channel ``mean`` and ``std``."""
    shape = (-1, 1, 1)
    m = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(shape)
    s = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(shape)
    return (batch - m) / s


def augment(
    image: torch.Tensor,
    rng: np.random.Generator,
    *,
    hflip: float = 0.0,
    vflip: float = 0.0,
    rotate: float = 0.0,
    color_jitter: float = 0.0,
) -> torch.Tensor:
    """Random flips, rotation (degrees, uniform in [-rotate, rotate]) and colour jitter of one [3, H, W] image.

    ``color_jitter`` is the strength s: brightness, contrast and saturation factors in [1-s, 1+s] and a hue
    shift in [-s/2, s/2] (capped at 0.5). Rotation fills the corners with the image mean.
    """
    if hflip and rng.random() < hflip:
        image = image.flip(-1)
    if vflip and rng.random() < vflip:
        image = image.flip(-2)
    if rotate or color_jitter:
        import torchvision.transforms.v2.functional as TF
    if rotate:
        angle = float(rng.uniform(-rotate, rotate))
        fill = [float(v) for v in image.mean(dim=(1, 2))]
        image = TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=fill)
    if color_jitter:
        s = color_jitter
        image = TF.adjust_brightness(image, float(rng.uniform(max(0.0, 1 - s), 1 + s)))
        image = TF.adjust_contrast(image, float(rng.uniform(max(0.0, 1 - s), 1 + s)))
        image = TF.adjust_saturation(image, float(rng.uniform(max(0.0, 1 - s), 1 + s)))
        image = TF.adjust_hue(image, float(rng.uniform(-min(0.5, s / 2), min(0.5, s / 2))))
    return image.clamp_(0.0, 1.0)


def resize_mask(mask: np.ndarray | torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """[H, W] label map -> [h, w] int64, nearest neighbour (labels are never blended)."""
    t = torch.as_tensor(np.ascontiguousarray(mask) if isinstance(mask, np.ndarray) else mask)
    if tuple(t.shape) != tuple(size_hw):
        t = F.interpolate(t[None, None].float(), size=size_hw, mode="nearest-exact")[0, 0]
    return t.to(torch.int64)


def random_crop_box(h: int, w: int, rng: np.random.Generator, min_scale: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``min_scale``..1 of the area, aspect 3/4..4/3."""
    area = float(rng.uniform(min_scale, 1.0)) * h * w
    ratio = math.exp(float(rng.uniform(math.log(3 / 4), math.log(4 / 3))))
    ch = min(h, max(1, round(math.sqrt(area / ratio))))
    cw = min(w, max(1, round(math.sqrt(area * ratio))))
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray,
    size_hw: tuple[int, int],
    rng: np.random.Generator,
    *,
    hflip: float = 0.0,
    vflip: float = 0.0,
    rotate: float = 0.0,
    color_jitter: float = 0.0,
    crop_scale: float = 1.0,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same geometric augmentation on an image and its label map; colour on the image only.

    Args:
        image: [H, W, 3] uint8.
        mask: [H, W] uint8 label map.
        crop_scale: the smallest area fraction of the random crop taken before resizing (1 = no crop).

    Returns:
        [3, h, w] float image in 0..1 and [h, w] int64 labels; pixels rotated in from outside are ignore_index.
    """
    if crop_scale < 1.0:
        top, left, ch, cw = random_crop_box(image.shape[0], image.shape[1], rng, crop_scale)
        image, mask = image[top : top + ch, left : left + cw], mask[top : top + ch, left : left + cw]
    t = to_tensor_resized(image, size_hw)
    m = resize_mask(mask, size_hw)
    if hflip and rng.random() < hflip:
        t, m = t.flip(-1), m.flip(-1)
    if vflip and rng.random() < vflip:
        t, m = t.flip(-2), m.flip(-2)
    if rotate:
        import torchvision.transforms.v2.functional as TF

        angle = float(rng.uniform(-rotate, rotate))
        fill = [float(v) for v in t.mean(dim=(1, 2))]
        t = TF.rotate(t, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=fill)
        m = TF.rotate(m[None], angle, interpolation=TF.InterpolationMode.NEAREST, fill=[ignore_index])[0]
    if color_jitter:
        t = augment(t, rng, color_jitter=color_jitter)
    return t, m
