"""Volume readers: NIfTI and FreeSurfer MGH/MGZ (nibabel), MetaImage, NRRD and ``.npy`` stacks, one 2-D slice
per index along ``item.slice_axis``.

FreeSurfer's ``.mgh``/``.mgz`` (how brain MR of many public neuroimaging datasets is published once processed) are
read by nibabel like NIfTI, with their voxel-to-RAS affine: everything said of NIfTI below holds for them; their
slices record ``meta["format"]`` ``mgh``. FreeSurfer's conformed volumes are uint8 (normalised intensities), so
the value head abstains on those (:func:`modality.models.fusion.stored_as_8bit`).

MetaImage (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``) are parsed by :mod:`modality.readers.raw_volume` and
wrapped as in-memory NIfTI images, so everything said of NIfTI below holds for them (kind ``nifti``; their slices
record ``meta["format"]`` ``metaimage`` / ``nrrd``).

NIfTI: slices come from the array proxy one at a time (``scl_slope``/``scl_inter`` applied, as
``get_fdata`` would), so a slice costs one slice of I/O on uncompressed files. ``slice_axis`` counts in the
closest canonical RAS frame (0 sagittal, 1 coronal, 2 axial) whatever the on-disk voxel order, and each
slice is laid out the way a DICOM viewer shows it (anterior/superior up, patient's right on the left), so a
NIfTI brain looks like a DICOM brain to the network. A 4-D file contributes its first volume (later
volumes of a time or diffusion series repeat the same anatomy).

``.npy``: ``np.load(allow_pickle=False, mmap_mode="r")`` (untrusted files never reach pickle); 2-D is one
slice, 3-D is sliced along ``slice_axis`` as stored (no orientation is known).

``value_range``: NIfTI ``cal_min``/``cal_max`` when set, else the on-disk integer dtype's range through
the scaling; float data have no bit range, so the slice's own finite min/max is used.
"""

from __future__ import annotations

import gzip
import math
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modality.readers.raw_volume import (  # the reasons are shared: one wording for every volume format
    BAD_SHAPE,
    MALFORMED,
    METAIMAGE_SUFFIXES,
    NOT_VOLUME,
    NRRD_SUFFIXES,
    UNREADABLE,
    is_raw_volume,
    load_raw_volume,
    read_raw_volume_header,
)
from modality.records import DecodedSlice, InputItem, RejectedInput, SliceHeader, stored_peak

NO_SUCH_SLICE = "no such frame"

# nibabel and numpy raise these for bad bytes; caught only around their calls.
_LOAD_ERRORS = (OSError, ValueError, EOFError, TypeError, IndexError, KeyError, zlib.error, MemoryError)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _header(item: InputItem, index: int, n_slices: int) -> SliceHeader:
    return SliceHeader(
        item=item,
        index=index,
        n_slices=n_slices,
        modality=(item.modality or "").strip(),
        body_part_raw=item.body_part or "",
        patient_id=item.patient_id or Path(item.path).stem,
        study_uid=item.study_uid or "",
        series_uid=item.series_uid or item.path,
    )


def _check_axis(axis: int, ndim: int) -> int:
    if not 0 <= axis < ndim:
        raise RejectedInput(BAD_SHAPE, f"slice_axis {axis} for a {ndim}-D array")
    return axis


def _check_indices(indices: Sequence[int] | None, n_slices: int) -> list[int]:
    wanted = list(range(n_slices)) if indices is None else [int(i) for i in indices]
    missing = [i for i in wanted if not 0 <= i < n_slices]
    if missing:
        raise RejectedInput(NO_SUCH_SLICE, f"slices {missing} requested, volume has {n_slices}")
    return wanted


def _finite_or_none(value: Any) -> float | None:
    """NaN scaling fields mean "unset" in NIfTI; JSON metadata must not carry NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _float_range(pixels: np.ndarray) -> tuple[float, float]:
    finite = pixels[np.isfinite(pixels)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def _dtype_range(dtype: np.dtype) -> tuple[float, float] | None:
    if dtype == np.bool_:
        return 0.0, 1.0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return None


def _meta(kind: str, dtype: np.dtype, shape: tuple[int, ...], extra: dict[str, Any]) -> dict[str, Any]:
    bits = int(np.dtype(dtype).itemsize * 8)
    return {
        "photometric": "MONOCHROME2",
        "transfer_syntax": "",
        "format": kind,
        "dtype": str(np.dtype(dtype)),
        "original_shape": [int(s) for s in shape],
        "bits_stored": bits,
        "pixel_representation": 1 if np.issubdtype(dtype, np.signedinteger) else 0,
        "window_center": None,
        "window_width": None,
        "manufacturer": "",
        **extra,
    }


# ---------------------------------------------------------------- NIfTI


def _load_nifti(path: str) -> Any:
    """A nibabel image of a NIfTI/Analyze file, or of a MetaImage/NRRD file (:mod:`raw_volume`: its voxels
    and RAS affine wrapped as an in-memory NIfTI image, so every step below treats the formats alike)."""
    import nibabel as nib

    if is_raw_volume(path):
        header = read_raw_volume_header(path)
        voxels = load_raw_volume(header)
        try:
            return nib.Nifti1Image(voxels, header.affine, dtype=voxels.dtype.newbyteorder("="))
        except (ValueError, TypeError) as error:
            raise RejectedInput(BAD_SHAPE, _describe(error)) from None
    try:
        image = nib.load(path)
    except FileNotFoundError as error:
        raise RejectedInput(UNREADABLE, _describe(error)) from None
    except nib.filebasedimages.ImageFileError as error:
        raise RejectedInput(NOT_VOLUME, _describe(error)) from None
    except _LOAD_ERRORS as error:
        raise RejectedInput(MALFORMED, _describe(error)) from None
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 2 or (len(shape) > 4 and any(s != 1 for s in shape[4:])):
        raise RejectedInput(BAD_SHAPE, f"NIfTI shape {shape}")
    if any(s == 0 for s in shape):
        raise RejectedInput(BAD_SHAPE, f"NIfTI shape {shape}")
    return image


#: The first bytes of a gzip stream (``.nii.gz``, ``.mgz``, whatever the file is called).
_GZIP_MAGIC = b"\x1f\x8b"


def _first_volume_in_memory(image: Any, path: str) -> Any:
    """The same image over an in-memory copy of its header and first volume, for gzip-compressed files.

    Why: nibabel reads each slice of a ``.nii.gz``/``.mgz`` by opening the file again and inflating it from the
    start up to that slice, so reading all n slices inflates ~n/2 volumes: a 512x512x120 CT took 24 s slice by
    slice against 0.56 s this way (``benchmarks/volumes.py``, 2026-12-06), and a 300-slice one would take
    minutes. Here the stream is inflated once, only as far as the first volume ends (later volumes of a 4-D series are never read, and a gzip bomb
    stops there; the size was checked against the decode budget from the header before this runs), and the
    image is rebuilt from those bytes by its own class, so scaling and values are exactly what the file's
    proxy gives. A stream that ends early gives a short buffer, and reading a slice then fails as a malformed
    file, as before. Uncompressed files and arrays not stored in Fortran order keep the proxy.
    """
    proxy = image.dataobj
    offset, order = getattr(proxy, "offset", None), getattr(proxy, "order", None)
    if offset is None or order != "F" or not hasattr(type(image), "from_bytes"):
        return image
    with open(path, "rb") as handle:
        if handle.read(2) != _GZIP_MAGIC:
            return image
    nbytes = int(offset) + math.prod(_spatial_shape(image)) * np.dtype(proxy.dtype).itemsize
    try:
        with gzip.open(path, "rb") as stream:
            data = stream.read(nbytes)
        return type(image).from_bytes(data)
    except (*_LOAD_ERRORS, gzip.BadGzipFile) as error:
        raise RejectedInput(MALFORMED, _describe(error)) from None


def _spatial_shape(image: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in image.shape[:3])


def _canonical_axes(image: Any) -> tuple[list[int], list[bool]]:
    """For each canonical RAS axis: the stored array axis holding it, and whether it runs reversed."""
    import nibabel as nib

    ndim = min(3, len(image.shape))
    try:
        orientation = nib.orientations.io_orientation(image.affine)[:ndim]
    except (ValueError, np.linalg.LinAlgError):
        orientation = np.array([[axis, 1.0] for axis in range(ndim)])
    if np.isnan(orientation).any():  # degenerate affine: keep the stored order
        orientation = np.array([[axis, 1.0] for axis in range(ndim)])
    array_axis = [0] * ndim
    reversed_ = [False] * ndim
    for stored, (canonical, direction) in enumerate(orientation):
        array_axis[int(canonical)] = stored
        reversed_[int(canonical)] = direction < 0
    return array_axis, reversed_


def _nifti_slice(image: Any, canonical_axis: int, index: int) -> np.ndarray:
    """One slice, read through the proxy (scaled), laid out as a viewer shows it."""
    shape = _spatial_shape(image)
    if len(shape) == 2:
        plane = np.asarray(image.dataobj[:, :], dtype=np.float32)
        return np.ascontiguousarray(plane[::-1, ::-1].T)
    array_axis, reversed_ = _canonical_axes(image)
    stored_axis = array_axis[canonical_axis]
    stored_index = shape[stored_axis] - 1 - index if reversed_[canonical_axis] else index
    slicer: list[Any] = [slice(None)] * 3
    slicer[stored_axis] = stored_index
    if len(image.shape) >= 4:
        slicer += [0] * (len(image.shape) - 3)  # first volume of a 4-D series
    plane = np.asarray(image.dataobj[tuple(slicer)], dtype=np.float32)
    # Put the two remaining axes in canonical order, each running in the RAS+ direction.
    remaining = [c for c in range(3) if c != canonical_axis]
    stored_remaining = [array_axis[c] for c in remaining]
    if stored_remaining[0] > stored_remaining[1]:
        plane = plane.T
    for position, canonical in enumerate(remaining):
        if reversed_[canonical]:
            plane = np.flip(plane, axis=position)
    # RAS+ (u, v) -> viewer rows top-down along -v, columns along -u (patient's right on the left).
    return np.ascontiguousarray(plane[::-1, ::-1].T)


def _scaling(image: Any) -> tuple[float | None, float | None]:
    """scl_slope/scl_inter as the array proxy applies them (nibabel clears them on the loaded header)."""
    proxy = image.dataobj
    return _finite_or_none(getattr(proxy, "slope", None)), _finite_or_none(getattr(proxy, "inter", None))


def _nifti_value_range(image: Any, pixels: np.ndarray) -> tuple[float, float]:
    header = image.header
    try:
        cal_min, cal_max = float(header["cal_min"]), float(header["cal_max"])
    except (KeyError, TypeError, ValueError):
        cal_min = cal_max = 0.0
    if np.isfinite(cal_min) and np.isfinite(cal_max) and cal_max > cal_min:
        return cal_min, cal_max
    stored = _dtype_range(header.get_data_dtype())
    if stored is None:
        return _float_range(pixels)
    slope, intercept = _scaling(image)
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    low, high = sorted((stored[0] * slope + intercept, stored[1] * slope + intercept))
    return low, high


def _unscaled_peak(
    pixels: np.ndarray, dtype: np.dtype, slope: float | None, intercept: float | None
) -> int | None:
    """The largest stored integer magnitude of a slice read through ``scl_slope``/``scl_inter`` (the stored
    values are the scaled ones undone, to the nearest integer); None for float data on disk."""
    if not np.issubdtype(dtype, np.integer):
        return None
    finite = pixels[np.isfinite(pixels)]
    if finite.size == 0:
        return None
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    low, high = float(finite.min()), float(finite.max())
    return round(max(abs(low - intercept), abs(high - intercept)) / abs(slope))


def _nifti_slice_count(image: Any, axis: int) -> int:
    shape = _spatial_shape(image)
    if len(shape) == 2:
        return 1
    _check_axis(axis, 3)
    array_axis, _ = _canonical_axes(image)
    return shape[array_axis[axis]]


#: Files nibabel reads as one image with a voxel-to-RAS affine (Analyze ``.img`` is named by the folder sources,
#: which need its ``.hdr`` beside it).
NIFTI_FILE_SUFFIXES = (".nii", ".nii.gz")
FREESURFER_SUFFIXES = (".mgh", ".mgz")


def volume_format(path: str) -> str:
    """``meta["format"]`` of a slice read by this reader: ``nifti`` (NIfTI and Analyze), ``mgh``, ``metaimage``,
    ``nrrd``."""
    suffix = Path(path).suffix.lower()
    if suffix in FREESURFER_SUFFIXES:
        return "mgh"
    return "metaimage" if suffix in METAIMAGE_SUFFIXES else "nrrd" if suffix in NRRD_SUFFIXES else "nifti"


#: ``meta["format"]`` values of volume readers: data in the units the file stores (the value head reads them,
#: unless they are stored as 8-bit integers).
VOLUME_FORMATS = ("nifti", "mgh", "metaimage", "nrrd", "npy")


# ---------------------------------------------------------------- npy


def _load_npy(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError as error:
        raise RejectedInput(UNREADABLE, _describe(error)) from None
    except _LOAD_ERRORS as error:  # object arrays land here: pickle is refused
        raise RejectedInput(NOT_VOLUME, _describe(error)) from None
    if not isinstance(array, np.ndarray):
        raise RejectedInput(NOT_VOLUME, f"{type(array).__name__} instead of one array")
    if array.ndim not in (2, 3) or any(s == 0 for s in array.shape):
        raise RejectedInput(BAD_SHAPE, f"npy shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise RejectedInput(BAD_SHAPE, f"npy dtype {array.dtype}")
    return array


def _npy_slice_count(array: np.ndarray, axis: int) -> int:
    return 1 if array.ndim == 2 else array.shape[_check_axis(axis, 3)]


# ---------------------------------------------------------------- entry points


def read_volume_headers(item: InputItem) -> list[SliceHeader]:
    """One header per slice along ``item.slice_axis`` (one for 2-D data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if item.kind == "npy":
            n_slices = _npy_slice_count(_load_npy(item.path), item.slice_axis)
        else:
            n_slices = _nifti_slice_count(_load_nifti(item.path), item.slice_axis)
    return [_header(item, index, n_slices) for index in range(n_slices)]


def read_volume_slices(
    item: InputItem, indices: Sequence[int] | None = None, *, colour: str = "grey"
) -> list[DecodedSlice]:
    """Decode the requested slices; volumes are greyscale, so ``colour`` has nothing to do here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _npy_slices(item, indices) if item.kind == "npy" else _nifti_slices(item, indices)
        except RejectedInput:
            raise
        except _LOAD_ERRORS as error:  # a truncated file fails only when its data are read
            raise RejectedInput(MALFORMED, _describe(error)) from None


def _nifti_slices(item: InputItem, indices: Sequence[int] | None) -> list[DecodedSlice]:
    image = _first_volume_in_memory(_load_nifti(item.path), item.path)
    file_format = volume_format(item.path)
    wanted = _check_indices(indices, _nifti_slice_count(image, item.slice_axis))
    dtype = image.header.get_data_dtype()
    slope, intercept = _scaling(image)
    extra = {"rescale_slope": slope, "rescale_intercept": intercept}
    out = []
    for index in wanted:
        pixels = _nifti_slice(image, item.slice_axis, index)
        peak = _unscaled_peak(pixels, dtype, slope, intercept)
        meta = _meta(file_format, dtype, tuple(pixels.shape), {**extra, "stored_peak": peak})
        out.append(DecodedSlice(pixels, index, _nifti_value_range(image, pixels), meta))
    return out


def _npy_slices(item: InputItem, indices: Sequence[int] | None) -> list[DecodedSlice]:
    array = _load_npy(item.path)
    wanted = _check_indices(indices, _npy_slice_count(array, item.slice_axis))
    out = []
    for index in wanted:
        plane = array if array.ndim == 2 else np.take(array, index, axis=item.slice_axis)
        pixels = np.ascontiguousarray(plane, dtype=np.float32)
        value_range = _dtype_range(array.dtype) or _float_range(pixels)
        extra = {"rescale_slope": None, "rescale_intercept": None, "stored_peak": stored_peak(plane)}
        meta = _meta("npy", array.dtype, tuple(pixels.shape), extra)
        out.append(DecodedSlice(pixels, index, value_range, meta))
    return out
