"""Pure pixel functions: intensity scaling to [0, 1], square geometry, and the one slice -> uint8 pipeline.

Nothing here reads files: every function takes arrays (and small typed settings: :class:`Preprocess`, the
scaling strategies) and returns arrays, so each step is testable on hand-built inputs and the same code serves
``prepare`` and raw-file prediction.
"""

from modality.intensity.geometry import fit_to_square, to_uint8
from modality.intensity.pipeline import Preprocess, slice_to_uint8
from modality.intensity.scaling import (
    DtypeScaling,
    MinMaxScaling,
    PercentileScaling,
    Scaling,
    WindowScaling,
    apply_window,
    scale_by_dtype,
    scale_minmax,
    scale_percentile,
)

__all__ = [
    "DtypeScaling",
    "MinMaxScaling",
    "PercentileScaling",
    "Preprocess",
    "Scaling",
    "WindowScaling",
    "apply_window",
    "fit_to_square",
    "scale_by_dtype",
    "scale_minmax",
    "scale_percentile",
    "slice_to_uint8",
    "to_uint8",
]
