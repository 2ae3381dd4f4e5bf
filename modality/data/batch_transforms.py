"""Per-batch pixel transforms run after the batch reaches the device (GPU when there is one).

Batches travel as uint8 and become float here: a quarter of the bytes through DataLoader workers and host
to device copies, and the resize/augment work lands on the accelerator instead of two CPU cores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("minus_one_one", "standardize")


def normalize_01(x01: torch.Tensor, normalize: str, mean01: float, std01: float) -> torch.Tensor:
    """Pixels in [0, 1] -> model input: ``minus_one_one`` maps them to [-1, 1]; ``standardize`` uses the
    train split's exact statistics from summary.json (``mean01``/``std01`` are in [0, 1] units)."""
    if normalize == "minus_one_one":
        return x01 * 2.0 - 1.0
    if normalize == "standardize":
        if std01 <= 0:
            raise ValueError(f"cannot standardise with std01={std01}")
        return (x01 - mean01) / std01
    raise ValueError(f"unknown normalize '{normalize}', expected one of {NORMALIZATIONS}")


def resize_batch(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Antialiased bilinear resize of a float batch to ``size`` x ``size`` (no-op when already there)."""
    if size is None or (images.shape[-1] == size and images.shape[-2] == size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def augment_batch(images: torch.Tensor, augment: Mapping[str, Any], generator: torch.Generator | None = None):
    """Light, label-preserving augmentation on a float batch in [0, 1] units.

    Keys (all optional, 0 = off): ``hflip``/``vflip`` (probabilities), ``rotate_deg`` (max absolute angle),
    ``scale`` (max relative zoom in or out), ``translate`` (max shift, fraction of the side),
    ``brightness``/``contrast`` (max relative change), ``gamma`` (max absolute log-gamma: ``x ** g`` with
    ``ln g`` uniform in [-gamma, gamma], the non-linear part of a different window or display curve),
    ``blur`` (probability of a 3x3 Gaussian blur: coarser reconstruction kernels and low matrices, e.g. 64x64
    EPI upsampled; with ``blur_sigma`` > 0 a Gaussian of per-image sigma uniform in [0.3, blur_sigma] pixels
    instead, for the spread of post-reconstruction filters, e.g. smoothed clinical PET vs raw iterative;
    measured worse on the real corpus at 1.5 px, see docs/results.md) and ``noise`` (max std of additive
    Gaussian noise, per image uniform in [0, noise]: low-dose CT, low-field MR). Geometry uses one affine grid per batch so the cost stays one ``grid_sample`` whatever
    is enabled.
    """
    batch = images.shape[0]
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(batch, device="cpu", generator=generator).mul(high - low).add(low).to(device)

    out = images
    rotate = math.radians(float(augment.get("rotate_deg", 0.0)))
    scale = float(augment.get("scale", 0.0))
    translate = float(augment.get("translate", 0.0))
    hflip = float(augment.get("hflip", 0.0))
    vflip = float(augment.get("vflip", 0.0))
    if rotate or scale or translate or hflip or vflip:
        angle = uniform(-rotate, rotate)
        zoom = uniform(1.0 - scale, 1.0 + scale)
        sign_x = torch.where(uniform(0.0, 1.0) < hflip, -1.0, 1.0)
        sign_y = torch.where(uniform(0.0, 1.0) < vflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 1] = cos * sign_x, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos * sign_y
        theta[:, 0, 2], theta[:, 1, 2] = (
            uniform(-translate, translate) * 2,
            uniform(-translate, translate) * 2,
        )
        grid = F.affine_grid(theta.to(out.dtype), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = _intensity_curve(out, augment, uniform, generator)
    brightness = float(augment.get("brightness", 0.0))
    contrast = float(augment.get("contrast", 0.0))
    if contrast:
        factor = uniform(1.0 - contrast, 1.0 + contrast).view(-1, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * factor + mean
    if brightness:
        out = out + uniform(-brightness, brightness).view(-1, 1, 1, 1)
    if contrast or brightness:
        out = out.clamp(0.0, 1.0)
    return out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image of a NCHW batch with its own ``sigma`` (pixels), replicate edges.

    One grouped convolution per axis for the whole batch: the images become channels of a single sample.
    """
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets[None, :] / sigma.to(images.device, torch.float32)[:, None]) ** 2)
    weights = (weights / weights.sum(dim=1, keepdim=True)).to(images.dtype)
    weights = weights.repeat_interleave(channels, dim=0)  # (batch * channels, 2 * radius + 1)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="replicate")
    flat = F.conv2d(flat, weights[:, None, None, :], groups=batch * channels)
    flat = F.pad(flat, (0, 0, radius, radius), mode="replicate")
    flat = F.conv2d(flat, weights[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def _intensity_curve(
    out: torch.Tensor, augment: Mapping[str, Any], uniform: Any, generator: torch.Generator | None
) -> torch.Tensor:
    """Gamma, blur and noise (see ``augment_batch``); each is skipped at 0 so older configs are unchanged."""
    gamma = float(augment.get("gamma", 0.0))
    blur = float(augment.get("blur", 0.0))
    noise = float(augment.get("noise", 0.0))
    view = (-1, 1, 1, 1)
    if gamma:
        exponent = torch.exp(uniform(-gamma, gamma)).view(view).to(out.dtype)
        out = out.clamp(min=0.0).pow(exponent)
    blur_sigma = float(augment.get("blur_sigma", 0.0))
    if blur and blur_sigma:
        sigma = uniform(0.3, max(0.3, blur_sigma))
        blurred = gaussian_blur(out, sigma)
        out = torch.where((uniform(0.0, 1.0) < blur).view(view), blurred, out)
    elif blur:
        kernel = torch.tensor([0.25, 0.5, 0.25], device=out.device, dtype=out.dtype)
        kernel = (kernel[:, None] * kernel[None, :]).view(1, 1, 3, 3).expand(out.shape[1], 1, 3, 3)
        blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), kernel, groups=out.shape[1])
        out = torch.where((uniform(0.0, 1.0) < blur).view(view), blurred, out)
    if noise:
        sigma = uniform(0.0, noise).view(view).to(out.dtype)
        draws = torch.randn(out.shape, generator=generator).to(device=out.device, dtype=out.dtype)
        out = (out + draws * sigma).clamp(0.0, 1.0)
    return out


def prepare_batch(
    images: torch.Tensor,
    *,
    normalize: str,
    mean01: float,
    std01: float,
    image_size: int | None,
    augment: Mapping[str, Any] | None,
) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> model input: optional augmentation, resize, then normalisation."""
    x01 = images.float().div(255.0)
    if augment:
        x01 = augment_batch(x01, augment)
    x01 = resize_batch(x01, image_size)
    return normalize_01(x01, normalize, mean01, std01)
