"""DICOM reader: headers without pixels, then pixels in modality units (pydicom 3 + pylibjpeg plugins).

Per frame, in this order (docs/readers.md):

1. decode only the requested frames, one at a time (``Decoder.as_array(index=...)``), with the plugin of
   :data:`PREFERRED_PLUGINS` first where one is installed (CharLS for JPEG-LS); YBR comes back as RGB;
2. colour: ``colour="reject"`` rejects RGB/YBR/PALETTE COLOR; ``colour="grey"`` maps palette indices
   through the palette, then takes ITU-R BT.601 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (the same Y that
   YBR_FULL stores, so YBR images keep their own luma);
3. modality LUT on greyscale data: the LUT sequence (pydicom's ``apply_modality_lut``) or RescaleSlope/
   Intercept, taken from the enhanced multi-frame functional groups when the top level has none;
4. MONOCHROME1 inversion inside ``value_range`` (``lo + hi - x``), so bright always means dense;
5. pixel padding (PixelPaddingValue, up to PixelPaddingRangeLimit) set to the darkest real pixel, so the
   area outside a CT reconstruction circle reads as background rather than a value far below air that
   would stretch every per-image scaling.

Every failure an input file can cause surfaces as :class:`RejectedInput` with a short stable reason.
pydicom and its plugins raise many exception types for bad bytes, so their calls (and only those) are
wrapped; a bug in this module still raises.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from modality.records import DecodedSlice, InputItem, RejectedInput, SliceHeader

# Stable reasons for rejects.csv.
NOT_DICOM = "not a DICOM file"
UNREADABLE = "unreadable file"
NON_IMAGE = "non-image object"
NO_PIXELS = "no pixel data"
UNDECODABLE = "undecodable transfer syntax"
MALFORMED = "truncated or malformed file"
DECODE_FAILED = "pixel decode failed"
COLOUR_REJECTED = "colour image rejected"
NO_SUCH_FRAME = "no such frame"

#: Modality codes of objects that carry no image of a patient (or only derived/overlay data).
NON_IMAGE_MODALITIES = frozenset(
    {
        "SEG", "RTSTRUCT", "SR", "PR", "RTDOSE", "RTPLAN", "RTRECORD", "RTTREAT", "KO", "REG", "RWV",
        "DOC", "ANN", "FID", "M3D", "PLAN", "AU", "ECG", "HD", "EPS", "RESP", "SMR", "IOL", "OPTENF",
    }
)  # fmt: skip

#: SOP Class UID prefixes of non-image storage classes (the Modality tag alone is not trustworthy).
NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key objects
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT dose (a dose grid, not anatomy)
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT structure set
    "1.2.840.10008.5.1.4.1.1.481.4",  # RT beams treatment record
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT plan
    "1.2.840.10008.5.1.4.1.1.481.",  # other RT objects except RT Image (481.1), checked below
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registrations, fiducials, segmentations, surfaces
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA/STL
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.68.",  # surface models
    "1.2.840.10008.5.1.4.1.1.91.",  # content assessment
)
RT_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.1"

#: Photometric interpretations that hold colour (or palette indices) rather than grey levels.
COLOUR_PHOTOMETRICS = frozenset(
    {
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_420",
        "YBR_PARTIAL_422",
        "YBR_ICT",
        "YBR_RCT",
        "PALETTE COLOR",
    }
)

#: ITU-R BT.601 luma weights.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: Decoding plugins tried first for a transfer syntax when installed, before pydicom's own order.
#: CharLS (``pyjpegls``) decodes JPEG-LS ~4x faster than libjpeg (0.16 vs 0.64 s for the 67 JPEG-LS files
#: of ``benchmarks/prepare.py``), and JPEG-LS decoding is exactly specified (lossless and near-lossless
#: alike), so the pixels are the same (tests/test_readers_dicom.py). CharLS refuses a few streams
#: libjpeg reads; those fall back to pydicom's order.
PREFERRED_PLUGINS: dict[str, str] = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}

#: Values above this are read lazily in the header pass, so a header read never loads pixel data.
_DEFER_SIZE = 2048

#: The single pass reads files up to this size whole (faster than a deferred read), bigger ones deferred.
FULL_READ_MAX_BYTES = 64 << 20

# What pydicom and the decoding plugins raise for bad bytes. Caught only around their calls.
_PYDICOM_ERRORS = (
    InvalidDicomError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    RuntimeError,
    EOFError,
    OSError,
    OverflowError,
    struct.error,
    UnicodeError,
)


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's per-file validation chatter (warnings and log lines) while we read.

    Odd-but-readable headers (invalid UI values, implicit VR under an explicit syntax, pixel padding)
    are normal in public data; over a million files they would bury real problems, which surface as
    RejectedInput instead.
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    mode = pydicom.config.settings.reading_validation_mode
    logger.setLevel(logging.CRITICAL)  # decode errors too: their text goes into RejectedInput.detail
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        pydicom.config.settings.reading_validation_mode = mode


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


# ---------------------------------------------------------------- opening


def _looks_like_dicom(ds: Dataset) -> bool:
    """A forced read of arbitrary bytes yields junk; a real preamble-less file has known group 8/28 tags."""
    return any(
        keyword in ds for keyword in ("SOPClassUID", "Modality", "StudyInstanceUID", "Rows", "PixelData")
    )


def _element_length(ds: Dataset, keyword: str) -> int:
    """Length of an element's value (0 when absent or empty), without loading a deferred value."""
    if keyword not in ds:
        return 0
    element = ds.get_item(keyword, keep_deferred=True)  # without it pydicom reads a deferred value in
    length = getattr(element, "length", None)
    if length is not None:  # a raw element straight from the file
        return int(length)
    value = getattr(element, "value", None)
    return len(value) if value is not None else 0


def _fill_acr_nema_defaults(ds: Dataset) -> None:
    """ACR-NEMA 1.0/2.0 files predate (0028,0004) and (0028,0002); they are always one-sample greyscale."""
    if "SamplesPerPixel" not in ds:
        ds.SamplesPerPixel = 1
    if "PhotometricInterpretation" not in ds and _int(ds, "SamplesPerPixel", 1) == 1:
        ds.PhotometricInterpretation = "MONOCHROME2"


def _pixel_data_is_encapsulated(ds: Dataset) -> bool:
    """Undefined-length PixelData, read from the raw element so a deferred value is not loaded."""
    if "PixelData" not in ds:
        return False
    element = ds.get_item("PixelData", keep_deferred=True)
    length = getattr(element, "length", None)
    if length is None:  # an already converted DataElement
        return bool(getattr(element, "is_undefined_length", False))
    return length == 0xFFFFFFFF


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without a File Meta header still decode if their encoding is native: record what was read.

    pydicom 3 refuses to decode without (0002,0010); the dataset's own encoding (implicit/explicit VR,
    endianness) as detected while parsing tells which native syntax the pixel bytes use.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if _pixel_data_is_encapsulated(ds):
        return  # encapsulated pixel data with no syntax: left for the caller to reject
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit = True
    if little is None:
        little = True
    if meta is None:
        ds.file_meta = FileMetaDataset()
    if not little:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    elif implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _whole_file(path: str) -> io.BytesIO | str:
    """The file's bytes in memory when it is at most :data:`FULL_READ_MAX_BYTES` long, else its path.

    A full read loads every value anyway, and pydicom's element walk (two ``read`` calls and a ``tell`` per
    element) runs ~20% faster over an in-memory buffer than over a buffered file: 0.18 against 0.22 s for
    300 uncompressed files here. Bigger files keep the path, so a long multi-frame file is not held twice.
    """
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size > FULL_READ_MAX_BYTES:
            return path
        return io.BytesIO(handle.read())


def open_dicom(path: str | Path, *, header_only: bool) -> Dataset:
    """Read a DICOM file (with or without the 128-byte preamble); reject anything that is not DICOM.

    ``header_only`` defers large values (the pixel data) so the header pass stays cheap but still sees
    whether PixelData is present, which ``stop_before_pixels`` would hide.
    """
    kwargs: dict[str, Any] = {"defer_size": _DEFER_SIZE} if header_only else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on every odd-but-readable header
        try:
            source = str(path) if header_only else _whole_file(str(path))
            ds = pydicom.dcmread(source, **kwargs)
        except InvalidDicomError:
            if isinstance(source, io.BytesIO):
                source.seek(0)
            try:
                ds = pydicom.dcmread(source, force=True, **kwargs)
            except FileNotFoundError as error:
                raise RejectedInput(UNREADABLE, _describe(error)) from None
            except _PYDICOM_ERRORS as error:
                raise RejectedInput(NOT_DICOM, _describe(error)) from None
            if not _looks_like_dicom(ds):
                raise RejectedInput(NOT_DICOM, "no DICM prefix and no recognisable DICOM elements") from None
        except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
            raise RejectedInput(UNREADABLE, _describe(error)) from None
        except _PYDICOM_ERRORS as error:
            raise RejectedInput(MALFORMED, _describe(error)) from None
    return ds


# ---------------------------------------------------------------- checks shared by both passes


def _text(ds: Dataset, keyword: str, default: str = "") -> str:
    try:
        value = ds.get(keyword, default)
    except _PYDICOM_ERRORS:  # a malformed element raises only when read
        return default
    if value is None:
        return default
    return str(value).strip()


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword, default)
        return int(value) if value not in (None, "") else default
    except (*_PYDICOM_ERRORS,):
        return default


def transfer_syntax_of(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        return ""
    return str(meta.TransferSyntaxUID)


def check_is_image(ds: Dataset) -> None:
    """Reject non-image objects, files without pixels, and syntaxes no installed plugin decodes."""
    modality = _text(ds, "Modality").upper()
    sop_class = _text(ds, "SOPClassUID")
    if modality in NON_IMAGE_MODALITIES:
        raise RejectedInput(NON_IMAGE, f"Modality {modality}, SOP class {sop_class or '?'}")
    if sop_class.startswith(NON_IMAGE_SOP_CLASS_PREFIXES) and not sop_class.startswith(RT_IMAGE_SOP_CLASS):
        name = UID(sop_class).name if sop_class else "?"
        raise RejectedInput(NON_IMAGE, f"SOP class {sop_class} ({name}), Modality {modality or '?'}")
    if not any(_element_length(ds, k) for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise RejectedInput(NO_PIXELS, f"Modality {modality or '?'}, SOP class {sop_class or '?'}")
    _fill_acr_nema_defaults(ds)
    if _int(ds, "Rows", 0) <= 0 or _int(ds, "Columns", 0) <= 0:
        raise RejectedInput(MALFORMED, f"image size Rows={ds.get('Rows')} Columns={ds.get('Columns')}")
    _ensure_transfer_syntax(ds)
    syntax = transfer_syntax_of(ds)
    if not syntax:
        raise RejectedInput(UNDECODABLE, "encapsulated pixel data but no Transfer Syntax UID")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise RejectedInput(UNDECODABLE, f"{syntax} ({UID(syntax).name}): no decoder exists") from None
    if not decoder.is_available:
        raise RejectedInput(UNDECODABLE, f"{syntax} ({UID(syntax).name}): no installed plugin decodes it")


def frame_count(ds: Dataset) -> int:
    return max(1, _int(ds, "NumberOfFrames", 1))


# ---------------------------------------------------------------- headers


def read_dicom_headers(item: InputItem) -> list[SliceHeader]:
    """One :class:`SliceHeader` per frame, without decoding pixels."""
    with quiet_pydicom():  # odd header values warn when first read; they are not errors
        return _read_dicom_headers(item)


def _read_dicom_headers(item: InputItem) -> list[SliceHeader]:
    ds = _header_from_head(item.path) or open_dicom(item.path, header_only=True)
    check_is_image(ds)
    return headers_of(ds, item)


#: The header pass first parses this many leading bytes from memory (see :func:`_header_from_head`).
HEAD_BYTES = 1 << 16

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
#: The file meta's Transfer Syntax UID of JPEG, JPEG-LS, JPEG 2000 and HTJ2K starts so (RLE, 1.2.5, is
#: rare): a byte search that only saves a wasted parse; what is read never depends on it.
_ENCAPSULATED_SYNTAX_PREFIX = b"1.2.840.10008.1.2.4."


def _header_from_head(path: str) -> Dataset | None:
    """The header dataset parsed from the file's first :data:`HEAD_BYTES` in memory, or None when that
    cannot be shown to hold every element (the caller then reads the file the usual way).

    pydicom walks an in-memory buffer ~25% faster than a file (0.16 against 0.21 s for the headers of 300
    uncompressed files). The head is enough when it is the whole file, or when it holds the header of a
    defined-length pixel element whose value ends exactly at the end of the file: then every element lies
    before the pixel data, inside the head. Anything else (encapsulated pixel data, trailing elements, no
    pixel data, a parse error) returns None, so rejections and headers are exactly those of the full read.
    Only for a dataset that is thrown away after its headers: the pixel data is not in the head.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
            size = os.fstat(handle.fileno()).st_size
        if len(head) < size and _ENCAPSULATED_SYNTAX_PREFIX in head[:1024]:
            return None  # compressed pixel data has no defined length: the head would be parsed for nothing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(head), defer_size=_DEFER_SIZE)
    except Exception:  # any failure: the full read decides, and words the rejection
        return None
    if len(head) == size:
        return ds
    for tag in _PIXEL_TAGS:
        element = ds.get_item(tag, keep_deferred=True)
        if element is None:
            continue
        tell, length = getattr(element, "value_tell", None), getattr(element, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            return None
        return ds if tell + length == size else None
    return None


def read_dicom_headers_keeping_file(
    item: InputItem,
) -> tuple[list[SliceHeader], Callable[[Sequence[int] | None, str], list[DecodedSlice]]]:
    """Headers, and a function that decodes frames from the dataset already parsed for them.

    Prepare's single pass uses it: one parse per file instead of a header parse and a second full parse.
    The file is read whole, as the decode pass reads it (a full read is also faster than the header
    pass's deferred one: 2.0 vs 2.5-3.6 ms per file on the real corpus). A file the full read refuses
    (truncated pixel data) but the header read accepts gets its headers and a decoder that raises that
    refusal, so the rejections are exactly those of the two passes: header failures raise here, decode
    failures when ``decode`` is called.
    """
    failure: RejectedInput | None = None
    with quiet_pydicom():
        try:
            ds = open_dicom(item.path, header_only=_is_big(item.path))
        except RejectedInput as exc:
            failure = exc
            ds = open_dicom(item.path, header_only=True)
        check_is_image(ds)
        headers = headers_of(ds, item)

    def decode(indices: Sequence[int] | None, colour: str) -> list[DecodedSlice]:
        if colour not in ("grey", "reject"):
            raise ValueError(f"colour must be 'grey' or 'reject', got {colour!r}")
        if failure is not None:
            raise failure
        with quiet_pydicom():
            return slices_of(ds, indices, colour)

    return headers, decode


def _is_big(path: str | Path) -> bool:
    """Files above :data:`FULL_READ_MAX_BYTES` are read with deferred values: a long multi-frame file whose
    frames will be capped first should not be loaded whole just for its headers."""
    try:
        return Path(path).stat().st_size > FULL_READ_MAX_BYTES
    except OSError:
        return False  # open_dicom turns the failure into a rejection


def headers_of(ds: Dataset, item: InputItem) -> list[SliceHeader]:
    """One :class:`SliceHeader` per frame of a dataset that passed :func:`check_is_image`."""
    n_frames = frame_count(ds)
    modality = _text(ds, "Modality").upper() or (item.modality or "")
    body_part = _text(ds, "BodyPartExamined") or (item.body_part or "")
    patient_id = _text(ds, "PatientID") or item.patient_id or Path(item.path).stem
    study_uid = _text(ds, "StudyInstanceUID") or item.study_uid or ""
    series_uid = _text(ds, "SeriesInstanceUID") or item.series_uid or item.path
    return [
        SliceHeader(
            item=item,
            index=index,
            n_slices=n_frames,
            modality=modality,
            body_part_raw=body_part,
            patient_id=patient_id,
            study_uid=study_uid,
            series_uid=series_uid,
        )
        for index in range(n_frames)
    ]


# ---------------------------------------------------------------- pixels


_PER_FRAME_GROUPS = 0x52009230  # PerFrameFunctionalGroupsSequence
_SHARED_GROUPS = 0x52009229  # SharedFunctionalGroupsSequence


def _frame_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The functional group item for ``sequence`` (per-frame first, then shared) of an enhanced object."""
    for group_tag, position in ((_PER_FRAME_GROUPS, index), (_SHARED_GROUPS, 0)):
        if group_tag not in ds:  # classic objects: a dict probe, not a keyword lookup
            continue
        groups = ds[group_tag].value
        if not groups or position >= len(groups):
            continue
        inner = groups[position].get(sequence)
        if inner:
            return inner[0]
    return None


def rescale_of(ds: Dataset, index: int) -> tuple[float, float] | None:
    """(slope, intercept) for a frame: top level, else the enhanced Pixel Value Transformation group."""
    source: Dataset | None = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else None
    if source is None:
        source = _frame_item(ds, index, "PixelValueTransformationSequence")
    if source is None:
        return None
    try:
        slope = float(source.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(source.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0.0:
        return None  # a zero slope would erase the image; treat as absent
    return slope, intercept


def stored_range(bits_stored: int, pixel_representation: int) -> tuple[float, float]:
    """The values ``bits_stored`` bits can hold, signed or not (never the numpy container's range)."""
    if pixel_representation == 1:
        return -float(2 ** (bits_stored - 1)), float(2 ** (bits_stored - 1) - 1)
    return 0.0, float(2**bits_stored - 1)


def _window(ds: Dataset, keyword: str, index: int) -> float | None:
    source: Dataset | None = ds if keyword in ds else _frame_item(ds, index, "FrameVOILUTSequence")
    if source is None or keyword not in source:
        return None
    try:
        value = source[keyword].value
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0] if len(value) else None
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError, IndexError):
        return None


def _has_modality_lut(ds: Dataset) -> bool:
    sequence = ds.get("ModalityLUTSequence")
    return bool(sequence) and "LUTData" in sequence[0] and _element_length(sequence[0], "LUTData") > 0


def _apply_lut_sequence(
    frame: np.ndarray, ds: Dataset, low: float, high: float
) -> tuple[np.ndarray, tuple[float, float]]:
    """Modality LUT sequence via pydicom; the value range is the LUT's output over every storable input.

    The LUT need not be monotonic, so mapping the two endpoints is not enough: the whole stored range
    (at most 2**16 values) goes through it once.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pixels = np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)
            if high - low <= 2**16:
                dtype = np.int32 if low < 0 else np.uint32
                mapped = apply_modality_lut(np.arange(low, high + 1).astype(dtype), ds)
                return pixels, (float(np.min(mapped)), float(np.max(mapped)))
        except _PYDICOM_ERRORS as error:
            raise RejectedInput(MALFORMED, f"modality LUT: {_describe(error)}") from None
    return pixels, (float(np.nanmin(pixels)), float(np.nanmax(pixels)))


def _to_grey(frame: np.ndarray, photometric: str, ds: Dataset, colour: str) -> np.ndarray:
    if colour == "reject":
        raise RejectedInput(
            COLOUR_REJECTED, f"photometric {photometric}, SamplesPerPixel {_int(ds, 'SamplesPerPixel', 1)}"
        )
    if colour != "grey":
        raise ValueError(f"colour must be 'grey' or 'reject', got {colour!r}")
    if photometric == "PALETTE COLOR":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                frame = apply_color_lut(frame, ds)
            except _PYDICOM_ERRORS as error:
                raise RejectedInput(MALFORMED, f"palette: {_describe(error)}") from None
    if frame.ndim == 3 and frame.shape[-1] >= 3:
        return frame[..., :3].astype(np.float32) @ LUMA_WEIGHTS
    if frame.ndim == 3:
        return frame[..., 0].astype(np.float32)
    return frame.astype(np.float32)


def _palette_range(ds: Dataset) -> tuple[float, float]:
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    bits = int(descriptor[2]) if descriptor is not None and len(descriptor) == 3 else 16
    return 0.0, float(2 ** (8 if bits == 8 else 16) - 1)


def _decode_frame(ds: Dataset, index: int, n_frames: int, syntax: str) -> np.ndarray:
    """Decode one frame (YBR comes back as RGB); bad codestreams become RejectedInput.

    Frame by frame, so a long multi-frame file never holds more than one decoded raw frame beside the
    float32 slices already made (pydicom finds the frame via the offset table or the fragments).
    """
    decoder = get_decoder(syntax)
    options: dict[str, Any] = {"as_rgb": True} if n_frames == 1 else {"as_rgb": True, "index": index}
    preferred = PREFERRED_PLUGINS.get(syntax)
    if preferred is not None and preferred in decoder.available_plugins:
        try:
            return decoder.as_array(ds, decoding_plugin=preferred, **options)[0]
        except Exception:  # any refusal: the default order below decides (and reports)
            pass
    try:
        return decoder.as_array(ds, **options)[0]
    except (NotImplementedError, ImportError) as error:
        raise RejectedInput(UNDECODABLE, _describe(error)) from None
    except (EOFError, struct.error) as error:
        raise RejectedInput(MALFORMED, _describe(error)) from None
    except _PYDICOM_ERRORS as error:
        message = str(error).lower()
        if any(
            word in message
            for word in ("length", "truncat", "expected", "insufficient", "end of", "fragment")
        ):
            raise RejectedInput(MALFORMED, _describe(error)) from None
        raise RejectedInput(DECODE_FAILED, _describe(error)) from None


def padding_mask(frame: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Stored pixels that are padding, not anatomy; None when the file declares no padding.

    PixelPaddingValue's VR (US or SS) follows PixelRepresentation, and files written with the wrong VR
    carry e.g. -2000 as 63536, so the value is wrapped into the frame's stored integer range first.
    """
    value = ds.get("PixelPaddingValue")
    if value is None or frame.ndim != 2 or not np.issubdtype(frame.dtype, np.integer):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    bits = 8 * frame.dtype.itemsize
    signed = np.issubdtype(frame.dtype, np.signedinteger)

    def wrap(v: Any) -> int:
        v = int(v[0] if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else v)
        if signed and v >= 2 ** (bits - 1):
            v -= 2**bits
        elif not signed and v < 0:
            v += 2**bits
        return v

    try:
        low = wrap(value)
        high = wrap(limit) if limit is not None else low
    except (TypeError, ValueError):
        return None
    low, high = min(low, high), max(low, high)
    mask = (frame >= low) & (frame <= high)
    return mask if mask.any() and not mask.all() else None


@dataclass(frozen=True)
class PixelFacts:
    """Header values every frame of a dataset needs, read once per dataset rather than once per frame
    (a pydicom keyword lookup costs ~5-10 us, and a frame needed about twenty)."""

    photometric: str
    bits_stored: int
    representation: int
    transfer_syntax: str
    manufacturer: str
    lut_sequence: bool

    @classmethod
    def of(cls, ds: Dataset) -> PixelFacts:
        return cls(
            photometric=_text(ds, "PhotometricInterpretation").upper(),
            bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated", 16)),
            representation=_int(ds, "PixelRepresentation", 0),
            transfer_syntax=transfer_syntax_of(ds),
            manufacturer=_text(ds, "Manufacturer"),
            lut_sequence=_has_modality_lut(ds),
        )


def _frame_to_slice(
    frame: np.ndarray, ds: Dataset, index: int, colour: str, facts: PixelFacts
) -> DecodedSlice:
    photometric, bits_stored, representation = facts.photometric, facts.bits_stored, facts.representation
    low, high = stored_range(bits_stored, representation)
    rescale = None
    is_colour = photometric in COLOUR_PHOTOMETRICS or frame.ndim == 3
    padding = None if is_colour else padding_mask(frame, ds)
    if is_colour:
        pixels = _to_grey(frame, photometric, ds, colour)
        if photometric == "PALETTE COLOR":
            low, high = _palette_range(ds)
    elif facts.lut_sequence:
        pixels, (low, high) = _apply_lut_sequence(frame, ds, low, high)
    else:
        pixels = frame.astype(np.float32)
        rescale = rescale_of(ds, index)
        if rescale is not None:
            slope, intercept = rescale
            if slope != 1.0:
                pixels *= np.float32(slope)
            if intercept != 0.0:
                pixels += np.float32(intercept)
            low, high = sorted((low * slope + intercept, high * slope + intercept))
    if photometric == "MONOCHROME1":
        pixels = np.float32(low + high) - pixels
    if padding is not None:
        pixels[padding] = pixels[~padding].min()
    if np.issubdtype(frame.dtype, np.floating):  # Float Pixel Data has no BitsStored range
        finite = pixels[np.isfinite(pixels)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    meta = {
        "photometric": photometric,
        "transfer_syntax": facts.transfer_syntax,
        "dtype": str(frame.dtype),
        "original_shape": [int(frame.shape[0]), int(frame.shape[1])],
        "bits_stored": bits_stored,
        "pixel_representation": representation,
        "rescale_slope": rescale[0] if rescale else None,
        "rescale_intercept": rescale[1] if rescale else None,
        "window_center": _window(ds, "WindowCenter", index),
        "window_width": _window(ds, "WindowWidth", index),
        "manufacturer": facts.manufacturer,
        "padding_pixels": int(padding.sum()) if padding is not None else 0,
    }
    return DecodedSlice(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32), index=index, value_range=(low, high), meta=meta
    )


def read_dicom_slices(
    item: InputItem, indices: Sequence[int] | None = None, *, colour: str = "grey"
) -> list[DecodedSlice]:
    """Decode the requested frames (all when ``indices`` is None) into modality units."""
    if colour not in ("grey", "reject"):
        raise ValueError(f"colour must be 'grey' or 'reject', got {colour!r}")
    with quiet_pydicom():
        return _read_dicom_slices(item, indices, colour)


def _read_dicom_slices(item: InputItem, indices: Sequence[int] | None, colour: str) -> list[DecodedSlice]:
    ds = open_dicom(item.path, header_only=False)
    check_is_image(ds)
    return slices_of(ds, indices, colour)


def slices_of(ds: Dataset, indices: Sequence[int] | None, colour: str) -> list[DecodedSlice]:
    """Decode frames of a dataset that passed :func:`check_is_image` (deferred values load on use)."""
    n_frames = frame_count(ds)
    wanted = list(range(n_frames)) if indices is None else [int(i) for i in indices]
    missing = [i for i in wanted if not 0 <= i < n_frames]
    if missing:
        raise RejectedInput(NO_SUCH_FRAME, f"frames {missing} requested, file has {n_frames}")
    facts = PixelFacts.of(ds)
    photometric = facts.photometric
    if colour == "reject" and (photometric in COLOUR_PHOTOMETRICS or _int(ds, "SamplesPerPixel", 1) > 1):
        raise RejectedInput(COLOUR_REJECTED, f"photometric {photometric}")
    slices = []
    for index in wanted:
        frame = _decode_frame(ds, index, n_frames, facts.transfer_syntax)
        if frame.ndim not in (2, 3) or frame.shape[0] == 0 or frame.shape[1] == 0:
            raise RejectedInput(MALFORMED, f"frame {index} decoded to shape {frame.shape}")
        slices.append(_frame_to_slice(frame, ds, index, colour, facts))
    return slices
