"""Tensor transforms shared by training, evaluation and annotation, so all three see the same pixels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor_resized(image: np.ndarray, size_hw: tuple[int, int]) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, h, w] float in 0..1, resized (antialiased bilinear) to ``size_hw``."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    if tuple(t.shape[1:]) != tuple(size_hw):
        t = F.interpolate(t[None], size=size_hw, mode="bilinear", antialias=True, align_corners=False)[0]
    return t.clamp_(0.0, 1.0)


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
