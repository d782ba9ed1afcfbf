"""Grad-CAM (Selvaraju et al., 2017): where in the image a classifier looked for the class it chose.

For a class score ``y_c`` and the feature maps ``A_k`` of the last convolution:

    alpha_k = mean over (i, j) of d y_c / d A_k[i, j]       (global-average-pooled gradients)
    cam     = ReLU(sum_k alpha_k * A_k)                      (only what speaks *for* the class)

upsampled (bilinear) to the model's input and scaled to 0..1 per image.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def find_target_layer(model: nn.Module) -> nn.Module:
    """The last ``nn.Conv2d`` in module order: the last feature maps that still have a spatial layout.

    Works for raycv's ``simple_cnn`` and ``test_classifier`` and torchvision's ResNets, VGG, DenseNet,
    MobileNets, EfficientNets (whose last conv precedes the global pool).

    Raises:
        ValueError: ``model`` has no ``nn.Conv2d`` (a ViT, for example).
    """
    last = None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            last = module
    if last is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d: Grad-CAM needs a convolutional classifier "
            "(explain: gradcam works with CNNs such as simple_cnn, resnet18, efficientnet_b0)."
        )
    return last


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    *,
    target_layer: nn.Module | None = None,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and Grad-CAM heatmaps of a batch, from one forward and one backward pass.

    Args:
        model: a classifier in eval mode (BatchNorm uses running statistics, so images stay independent).
        x: [N, C, H, W] normalised input.
        target_layer: the module whose output is ``A``; default :func:`find_target_layer`.
        classes: [N] class per image to explain; default each image's top class.

    Returns:
        (logits [N, K] float32, cams [N, H, W] float32 in 0..1 at the input's size; all zeros where
        nothing in the image speaks for the class).
    """
    layer = target_layer if target_layer is not None else find_target_layer(model)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        captured["a"] = output
        # Downstream gets a copy: an in-place ReLU after the conv would otherwise overwrite the kept maps.
        return output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # a graph even when every parameter is frozen
            logits = model(x)
            chosen = logits.argmax(dim=1) if classes is None else classes.to(logits.device)
            scores = logits.gather(1, chosen[:, None]).sum()  # images are independent: one backward for all
            (grads,) = torch.autograd.grad(scores, captured["a"])
    finally:
        handle.remove()
    acts = captured["a"].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return logits.detach().float(), (cam / peak).float().cpu()


def heatmap_png(cam: np.ndarray | torch.Tensor) -> bytes:
    """PNG (mode "L") of one heatmap: [H, W] floats in 0..1 -> uint8 0..255."""
    values = np.asarray(cam, dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def decode_heatmap(data: bytes) -> np.ndarray:
    """[H, W] float32 in 0..1 from a ``gradcam_png`` cell."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
