"""Readers: an :class:`InputItem` -> slice headers (cheap) -> decoded slices in modality units.

Dispatch is on ``item.kind`` (``dicom``, ``image``, ``nifti``, ``npy``); docs/readers.md says what each
reader does and which inputs it rejects. Every failure caused by the input raises
:class:`~modality.records.RejectedInput`.

Every reader checks the size a file would decode to against the :class:`DecodeBudget` *before* decoding,
from what the header claims (DICOM Rows x Columns x SamplesPerPixel per frame, x NumberOfFrames per file;
image dimensions from Pillow's lazy open; volume shapes), so a few kilobytes that claim 30000 x 30000
pixels are rejected without allocating them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from modality.records import DecodedSlice, InputItem, RejectedInput, SliceHeader

#: Colour policies: convert colour to grey (BT.601 luma) or reject colour inputs.
COLOUR_POLICIES = ("grey", "reject")

#: Reason (rejects.csv, unreadable.csv) for a file whose header claims more samples than the budget allows.
OVER_BUDGET = "decoded size over budget"

#: Default samples (pixels x samples per pixel) one frame or slice may decode to: 8192 x 8192 grey, or a
#: 4096 x 5461 RGB frame. Real scans are far below it (mammograms ~4096 x 5000 grey, large radiographs
#: ~4300 x 3500; the largest file of ../shared/data/real is 4664 x 3064); a 13000 x 13000 PNG is above it.
DEFAULT_MAX_FRAME_PIXELS = 64 * 2**20
#: Default samples a whole file may decode to: 1024 frames of 512 x 512 (a long enhanced CT/MR), 1 GiB once
#: the readers turn it into float32, which prepare and eval hold for a file's chosen frames at once.
DEFAULT_MAX_FILE_PIXELS = 256 * 2**20

#: Environment variables that carry the budget to the readers, in every process (prepare's pool workers
#: included). prepare and eval.py set them from their configs' ``decode_budget`` keys
#: (:class:`DecodeBudgetFromConfig`), so ``decode_budget.max_frame_pixels=...`` on the command line is what
#: changes it; code that calls the readers directly may set them itself.
MAX_FRAME_PIXELS_ENV = "MODALITY_MAX_FRAME_PIXELS"
MAX_FILE_PIXELS_ENV = "MODALITY_MAX_FILE_PIXELS"


@dataclass(frozen=True)
class DecodeBudget:
    """The most samples one frame (or 2-D slice) and one file may decode to."""

    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
    max_file_pixels: int = DEFAULT_MAX_FILE_PIXELS

    def check(self, rows: int, columns: int, *, frames: int = 1, samples: int = 1, what: str = "") -> None:
        """Raise :data:`OVER_BUDGET` when ``rows x columns x samples`` (per frame) or that times ``frames``
        (per file) is above the budget; ``what`` names where the numbers come from (e.g. "DICOM header")."""
        per_frame = int(rows) * int(columns) * max(1, int(samples))
        per_file = per_frame * max(1, int(frames))
        source = f"{what}: " if what else ""
        claim = f"{source}{rows} x {columns} x {samples} sample(s) x {frames} frame(s)"
        if per_frame > self.max_frame_pixels:
            raise RejectedInput(
                OVER_BUDGET,
                f"{claim} = {per_frame:,} samples per frame > decode_budget.max_frame_pixels "
                f"{self.max_frame_pixels:,}",
            )
        if per_file > self.max_file_pixels:
            raise RejectedInput(
                OVER_BUDGET,
                f"{claim} = {per_file:,} samples per file > decode_budget.max_file_pixels "
                f"{self.max_file_pixels:,}",
            )


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))  # "6.7e7" reads too
    except (ValueError, OverflowError):  # text, NaN, inf
        raise ValueError(f"{name}={raw!r}: the decode budget must be a positive number of samples") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}: the decode budget must be a positive number of samples")
    return value


def decode_budget() -> DecodeBudget:
    """The budget in force: the environment's (set from the run's config), else the defaults."""
    return DecodeBudget(
        max_frame_pixels=_positive_int(MAX_FRAME_PIXELS_ENV, DEFAULT_MAX_FRAME_PIXELS),
        max_file_pixels=_positive_int(MAX_FILE_PIXELS_ENV, DEFAULT_MAX_FILE_PIXELS),
    )


class DecodeBudgetFromConfig:
    """Hydra callback (``hydra.callbacks`` in configs/prepare.yaml and configs/eval.yaml): the run's
    ``decode_budget`` keys become :data:`MAX_FRAME_PIXELS_ENV` / :data:`MAX_FILE_PIXELS_ENV` when the job
    starts, so every reader sees them, in prepare's pool workers too (they inherit the environment).

    A callback because ``hydra.job.env_set`` cannot interpolate the job's own keys, and a key of the job
    config is what a user overrides (``decode_budget.max_frame_pixels=...``). Duck-typed to Hydra's
    ``Callback`` so reader workers need not import Hydra.
    """

    _KEYS = (("max_frame_pixels", MAX_FRAME_PIXELS_ENV), ("max_file_pixels", MAX_FILE_PIXELS_ENV))

    def __init__(self) -> None:
        self._previous: dict[str, str | None] = {}

    def on_job_start(self, config: Any = None, **kwargs: Any) -> None:
        budget = config.get("decode_budget") if config is not None else None
        if not budget:
            return
        for key, env in self._KEYS:
            value = budget.get(key)
            if value is not None:
                self._previous.setdefault(env, os.environ.get(env))
                os.environ[env] = str(value)
        try:
            decode_budget()
        except ValueError as error:
            # Hydra turns a callback's exceptions into warnings and runs the job anyway, where every file
            # would then fail the same way: end the run here instead, with the reason.
            raise SystemExit(f"decode_budget: {error}") from None

    def on_job_end(self, config: Any = None, **kwargs: Any) -> None:
        for env, value in self._previous.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value
        self._previous.clear()

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("on_"):  # Hydra's other hooks (on_run_start, on_multirun_end, ...)
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def _readers(kind: str) -> tuple[Callable[..., list[SliceHeader]], Callable[..., list[DecodedSlice]]]:
    # Imported lazily: a worker that only reads PNGs need not import pydicom or nibabel.
    if kind == "dicom":
        from modality.readers.dicom import read_dicom_headers, read_dicom_slices

        return read_dicom_headers, read_dicom_slices
    if kind == "image":
        from modality.readers.image import read_image_headers, read_image_slices

        return read_image_headers, read_image_slices
    if kind in ("nifti", "npy"):
        from modality.readers.volume import read_volume_headers, read_volume_slices

        return read_volume_headers, read_volume_slices
    raise RejectedInput("unsupported file kind", f"kind {kind!r}; readers exist for dicom, image, nifti, npy")


def _volume_shape(item: InputItem) -> tuple[int, ...] | None:
    """A NIfTI/Analyze/MetaImage/NRRD or .npy file's array shape from its header alone; None when the header
    cannot be read (the volume reader then words the rejection)."""
    from modality.readers.raw_volume import is_raw_volume, read_raw_volume_header

    try:
        if item.kind == "npy":
            import numpy as np

            with open(item.path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape = np.lib.format.read_array_header_1_0(handle)[0]
                else:
                    shape = np.lib.format.read_array_header_2_0(handle)[0]
        elif is_raw_volume(item.path):
            shape = read_raw_volume_header(item.path).shape
        else:
            import nibabel as nib

            shape = nib.load(item.path).shape  # the header only: data stay behind the array proxy
        return tuple(int(s) for s in shape)
    except Exception:
        return None


def check_volume_budget(item: InputItem) -> None:
    """Volumes (``nifti``, ``npy``): the shape their header claims against the decode budget, before the
    volume reader reads any voxel. A 3.5 MB .nii.gz of zeros claiming 20000 x 20000 decoded its slice at
    3.1 GB. Per frame: the largest plane of the first volume (whatever ``slice_axis`` picks); per file:
    the first volume (later volumes of a 4-D series are never read)."""
    if item.kind not in ("nifti", "npy"):
        return
    shape = _volume_shape(item)
    if shape is None or len(shape) < 2 or any(s <= 0 for s in shape):
        return
    spatial = sorted(shape[:3] if item.kind == "nifti" else shape, reverse=True)
    what = "npy header" if item.kind == "npy" else "volume header"
    decode_budget().check(spatial[0], spatial[1], frames=math.prod(spatial[2:]), what=what)


def read_headers(item: InputItem) -> list[SliceHeader]:
    """One header per 2-D slice (DICOM frame, volume slice, or the single image), without decoding pixels."""
    headers, _ = _readers(item.kind)
    check_volume_budget(item)
    return headers(item)


def read_slices(
    item: InputItem, indices: Sequence[int] | None = None, *, colour: str = "grey"
) -> list[DecodedSlice]:
    """Decode the slices at ``indices`` (all when None), in that order, in modality units."""
    if colour not in COLOUR_POLICIES:
        raise ValueError(f"colour must be one of {COLOUR_POLICIES}, got {colour!r}")
    _, slices = _readers(item.kind)
    check_volume_budget(item)
    return slices(item, indices, colour=colour)


def read_headers_keeping_file(
    item: InputItem,
) -> tuple[list[SliceHeader], Callable[[Sequence[int] | None, str], list[DecodedSlice]]]:
    """Headers, plus a function ``decode(indices, colour)`` that decodes slices of the same file.

    For DICOM the decoder reuses the dataset parsed for the headers (one parse per file, which is what
    makes prepare's single pass cheaper than a header pass plus a decode pass); other kinds simply call
    :func:`read_slices`. Header failures raise here, decode failures when ``decode`` is called.
    """
    if item.kind == "dicom":
        from modality.readers.dicom import read_dicom_headers_keeping_file

        return read_dicom_headers_keeping_file(item)
    headers = read_headers(item)

    def decode(indices: Sequence[int] | None, colour: str) -> list[DecodedSlice]:
        return read_slices(item, indices, colour=colour)

    return headers, decode


__all__ = [
    "COLOUR_POLICIES",
    "DEFAULT_MAX_FILE_PIXELS",
    "DEFAULT_MAX_FRAME_PIXELS",
    "OVER_BUDGET",
    "DecodeBudget",
    "DecodeBudgetFromConfig",
    "check_volume_budget",
    "decode_budget",
    "read_headers",
    "read_headers_keeping_file",
    "read_slices",
]
