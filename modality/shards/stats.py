"""Exact mean and standard deviation of stored uint8 pixels, from an integer histogram.

Summing billions of float32 pixels drifts; a 256-bin int64 histogram per image, added up, and sums taken
over Python ints are exact, so the statistics the model standardises with do not depend on batch order or
on how many workers wrote the shards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def uint8_histogram(image: np.ndarray) -> np.ndarray:
    """Counts of each value 0..255 (int64)."""
    return np.asarray(uint8_histogram_counts(image), dtype=np.int64)


def uint8_histogram_counts(image: np.ndarray) -> list[int]:
    """Counts of each value 0..255 as Python ints (what a slice's work-cache entry records).

    Pillow counts a 2-D uint8 image in one C pass (25 us for 224x224) and returns the list itself;
    ``np.bincount`` first widens every pixel to int64 (57 us). Other shapes take the numpy path.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2 and image.size:
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(image)).histogram()
    return np.bincount(image.ravel(), minlength=256).tolist()


def histogram_stats(histogram: Sequence[int] | np.ndarray) -> dict[str, object]:
    """Mean/std in uint8 units and on the [0, 1] scale, plus the pixel count and the histogram itself.

    Population statistics (divide by N): what ``np.mean``/``np.std`` report, and what standardisation needs.
    """
    counts = [int(c) for c in histogram]
    if len(counts) != 256:
        raise ValueError(f"histogram must have 256 bins, got {len(counts)}")
    n = sum(counts)
    if n == 0:
        return {"mean": None, "std": None, "mean01": None, "std01": None, "pixels": 0, "histogram": counts}
    s1 = sum(v * c for v, c in enumerate(counts))
    s2 = sum(v * v * c for v, c in enumerate(counts))
    # n*s2 - s1^2 is exact in integers, so variance never goes negative through cancellation.
    var = (n * s2 - s1 * s1) / (n * n)
    mean = s1 / n
    std = math.sqrt(var)
    return {
        "mean": mean,
        "std": std,
        "mean01": mean / 255.0,
        "std01": std / 255.0,
        "pixels": n,
        "histogram": counts,
    }
