"""The records that flow between pipeline stages.

A *source* lists :class:`InputItem` objects (one per file on disk, with whatever the source knows about
it); a *reader* turns one item into :class:`SliceHeader` entries (cheap, header only) and later into
:class:`DecodedSlice` objects (pixels in modality units). Any input that cannot become a training image
raises :class:`RejectedInput` with a human-readable reason, which ``prepare`` records in ``rejects.csv``:
every input file is accounted for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: ``InputItem.extra`` key a source uses to pass on a rejection it already knows about
#: (``{"reason": ..., "detail": ...}``); prepare records it in rejects.csv without reading the file.
PRE_REJECTED = "rejected"


class RejectedInput(Exception):
    """An input that cannot yield a training image; ``reason`` is a short stable phrase for rejects.csv."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class InputItem:
    """One file a source offers.

    ``label`` is the class the source vouches for (a manifest or metadata CSV); when ``None`` the DICOM
    Modality tag decides through the class map. ``modality`` and ``body_part`` are what the source states
    for files without headers (PNG radiographs); DICOM headers take precedence where present.
    """

    path: str
    dataset: str
    kind: str
    label: str | None = None
    modality: str | None = None
    body_part: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    slice_axis: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceHeader:
    """What the header says about one 2-D slice of a file, read without decoding pixels.

    Used to apply caps and split guards before any expensive decode.
    """

    item: InputItem
    index: int  # frame (DICOM) or slice (volume) index within the file; 0 for 2-D images
    n_slices: int
    modality: str  # DICOM modality code (CT, MR, PT, CR, DX, MG...) or the source's stated code
    body_part_raw: str
    patient_id: str
    study_uid: str
    series_uid: str


@dataclass
class DecodedSlice:
    """One 2-D slice in modality units (modality LUT applied, MONOCHROME1 already inverted).

    ``value_range`` is the range the stored bits can express, mapped through the modality LUT: the
    reference study's ``dtype`` scaling needs it, and it must come from BitsStored and
    PixelRepresentation rather than from the numpy dtype.
    """

    pixels: np.ndarray  # 2-D, float32
    index: int
    value_range: tuple[float, float]
    meta: dict[str, Any]  # photometric, transfer_syntax, dtype, original_shape, bits_stored, window...


def stored_peak(frame: np.ndarray) -> int | None:
    """The largest magnitude among a frame's stored integers (before any rescale), None for float or
    boolean data: recorded as ``meta["stored_peak"]`` by the readers, for
    :func:`modality.intensity.value_stats.value_features`."""
    if frame.size == 0 or frame.dtype == np.bool_ or not np.issubdtype(frame.dtype, np.integer):
        return None
    return max(int(frame.max()), -int(frame.min()))


def printable(text: str | bytes | os.PathLike) -> str:
    """``text`` (a record's file name, a reject's detail) as valid UTF-8 for CSV, JSON and the console: a file
    name that is not UTF-8 (Linux allows any bytes but ``/`` and NUL) keeps its readable part, its odd bytes
    written ``\\xff``. Valid text is unchanged.

    Python holds such names with their bytes smuggled in as lone surrogates (``os.fsdecode``); writing one
    to a UTF-8 file raises, so every name goes through here before it is written.
    """
    text = os.fsdecode(text) if not isinstance(text, str) else text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that came from elsewhere than a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
