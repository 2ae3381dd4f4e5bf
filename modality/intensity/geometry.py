"""Square geometry: fit a scaled slice into ``size x size`` with antialiasing, and store it as uint8.

Resizing runs in PIL's 32-bit float mode ('F') so no precision is lost before the final uint8 rounding.
Shrinking uses the BOX filter (exact area averaging: antialiased, and no ringing/overshoot outside [0, 1]
as LANCZOS would give); enlarging small images (64x64 thumbnails) uses BILINEAR, since BOX upsampling is
nearest-neighbour. 512x512 -> 224x224 takes ~0.7 ms on one core.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Aspect policies: pad to square (default; keeps anatomy proportions), stretch, or centre-crop.
ASPECTS = ("pad", "stretch", "crop")

#: Pad value: scaling maps background (air, empty field) to 0, so padding continues the background.
PAD_VALUE = 0.0


def resize_float(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased resize of a 2-D float image to ``height x width`` (float32 out)."""
    arr = np.ascontiguousarray(img, dtype=np.float32)
    if arr.shape == (height, width):
        return arr.copy()
    shrinking = height <= arr.shape[0] and width <= arr.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    resized = Image.fromarray(arr).resize((width, height), resample)  # float32 2-D -> mode "F"
    return np.asarray(resized, dtype=np.float32)


def padded_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where ``aspect="pad"`` puts a ``height x width`` image in its ``size x size`` square: ``(top, left,
    rows, columns)`` of the scaled content (long side ``size``, centred). Tools that read a stored slice back
    crop the padding with it."""
    scale = size / max(height, width)
    rows = min(size, max(1, round(height * scale)))
    columns = min(size, max(1, round(width * scale)))
    return (size - rows) // 2, (size - columns) // 2, rows, columns


def fit_to_square(img: np.ndarray, size: int, aspect: str = "pad") -> np.ndarray:
    """Fit a 2-D image into ``size x size``.

    ``pad``: scale the long side to ``size`` and centre on a ``PAD_VALUE`` background.
    ``stretch``: scale each axis independently (distorts anatomy).
    ``crop``: centre-crop the long side to a square first (loses the edges), then scale.
    """
    arr = np.asarray(img)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"fit_to_square needs a non-empty 2-D image, got shape {arr.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    height, width = arr.shape
    if aspect == "stretch":
        return resize_float(arr, size, size)
    if aspect == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return resize_float(arr[top : top + side, left : left + side], size, size)
    if aspect == "pad":
        top, left, new_h, new_w = padded_box(height, width, size)
        out = np.full((size, size), PAD_VALUE, dtype=np.float32)
        out[top : top + new_h, left : left + new_w] = resize_float(arr, new_h, new_w)
        return out
    raise ValueError(f"unknown aspect {aspect!r}; expected one of {', '.join(ASPECTS)}")


def to_uint8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 by rounding to the nearest of 256 levels (values outside are clipped)."""
    scaled = np.multiply(np.asarray(x01, dtype=np.float32), np.float32(255.0))  # one new array, then in place
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)  # +-inf land on 0 / 255; NaN passes through clip ...
    if np.isnan(scaled.max()):  # ... and NaN propagates through max: a reduction, no mask array
        np.nan_to_num(scaled, nan=0.0, copy=False)
    return scaled.astype(np.uint8)
