"""THE one place a decoded slice becomes a stored ``size x size`` uint8 slice.

``prepare`` calls it to write shards and raw-file prediction calls it with the ``preprocess`` block copied
from ``summary.json`` into the checkpoint, so training and prediction see identically prepared pixels.
Order: intensity scaling (in modality units, full resolution) -> geometry (antialiased, in float) -> uint8.
Scaling runs before resizing because percentiles and windows are defined on the original pixels, and the
pad background must be the scaled background (0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from modality.intensity.geometry import fit_to_square, to_uint8
from modality.intensity.scaling import scale_intensity
from modality.records import DecodedSlice

#: The defaults ``prepare`` records in ``summary.json["preprocess"]`` unless configured otherwise.
DEFAULT_PREPROCESS: dict[str, Any] = {
    "image_size": 224,
    "aspect": "pad",
    "scaling": {"method": "percentile", "low": 0.5, "high": 99.5},
    "colour": "grey",
}


def slice_to_uint8(
    decoded: DecodedSlice, modality_code: str | None, preprocess: Mapping[str, Any]
) -> np.ndarray:
    """Scale, fit and quantise one slice per ``preprocess`` (``summary.json["preprocess"]``).

    ``modality_code`` is the header's code (or the source's stated one); only ``window`` scaling uses it.
    Missing keys take ``DEFAULT_PREPROCESS`` values. ``colour`` is applied by the reader, not here.
    """
    size = int(preprocess.get("image_size", DEFAULT_PREPROCESS["image_size"]))
    aspect = str(preprocess.get("aspect", DEFAULT_PREPROCESS["aspect"]))
    scaling = preprocess.get("scaling") or DEFAULT_PREPROCESS["scaling"]
    scaled = scale_intensity(decoded, modality_code, scaling)
    return to_uint8(fit_to_square(scaled, size, aspect))
