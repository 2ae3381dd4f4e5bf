"""THE one place a decoded slice becomes a stored ``size x size`` uint8 slice.

``prepare`` calls it to write shards and raw-file prediction calls it with the ``preprocess`` block copied
from ``summary.json`` into the checkpoint, so training and prediction see identically prepared pixels.
Order: intensity scaling (in modality units, full resolution) -> geometry (antialiased, in float) -> uint8.
Scaling runs before resizing because percentiles and windows are defined on the original pixels, and the
pad background must be the scaled background (0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from modality.intensity.geometry import ASPECTS, fit_to_square, to_uint8
from modality.intensity.scaling import PercentileScaling, Scaling
from modality.readers import COLOUR_POLICIES
from modality.records import DecodedSlice


@dataclass(frozen=True)
class Preprocess:
    """How every slice was (or is to be) stored: ``summary.json["preprocess"]``'s core, which the DataModule
    copies into the checkpoint's ``data_info["preprocess"]``.

    Checked once, when built: by ``prepare`` from its config (``scaling`` instantiated from
    ``configs/scaling/*.yaml``), or by :meth:`from_dict` from a stored form. The defaults here are the only
    ones: a stored form missing a key (hand-written, or older) reads as these.
    """

    image_size: int = 224
    aspect: str = "pad"
    scaling: Scaling = field(default_factory=PercentileScaling)
    colour: str = "grey"  # applied by the reader (read_slices(colour=...)), not by slice_to_uint8

    def __post_init__(self) -> None:
        if isinstance(self.scaling, Mapping):  # a stored form (or a config without _target_)
            object.__setattr__(self, "scaling", Scaling.from_dict(self.scaling))
        if not isinstance(self.scaling, Scaling):
            raise ValueError(f"scaling must be a Scaling or its stored dict, got {self.scaling!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {self.aspect!r}")
        if self.colour not in COLOUR_POLICIES:
            raise ValueError(f"colour must be one of {', '.join(COLOUR_POLICIES)}, got {self.colour!r}")

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> Preprocess:
        """A stored ``preprocess`` block (``summary.json``, checkpoint); keys it does not own (``class_map``,
        ``body_part_map``) are left to their readers."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in stored.items() if key in names})

    def to_dict(self) -> dict[str, Any]:
        """The stored form: plain JSON types, the same keys and order earlier prepare runs wrote."""
        return {
            "image_size": self.image_size,
            "aspect": self.aspect,
            "scaling": self.scaling.to_dict(),
            "colour": self.colour,
        }


def slice_to_uint8(
    decoded: DecodedSlice, modality_code: str | None, preprocess: Preprocess | Mapping[str, Any]
) -> np.ndarray:
    """Scale, fit and quantise one slice per ``preprocess``.

    ``modality_code`` is the header's code (or the source's stated one); only window scaling uses it.
    A stored dict (a checkpoint's ``data_info["preprocess"]``) is read with :meth:`Preprocess.from_dict`;
    callers that loop should convert it once.
    """
    if not isinstance(preprocess, Preprocess):
        preprocess = Preprocess.from_dict(preprocess)
    scaled = preprocess.scaling(decoded, modality_code)
    return to_uint8(fit_to_square(scaled, preprocess.image_size, preprocess.aspect))
