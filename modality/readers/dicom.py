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

A Siemens mosaic (ImageType MOSAIC: the slices of an EPI/diffusion volume tiled into one frame, how Siemens
scanners store fMRI and DWI) is read as its slices, one per tile (:func:`mosaic_layout`), as dcm2niix and
nibabel read it: a grid of 35 small brains is neither a slice nor what any other vendor's EPI looks like.

Every failure an input file can cause surfaces as :class:`RejectedInput` with a short stable reason.
pydicom and its plugins raise many exception types for bad bytes, so their calls (and only those) are
wrapped; a bug in this module still raises.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.tag import BaseTag
from pydicom.uid import (
    JPEG2000,
    JPEG2000MC,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEG2000TransferSyntaxes,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from modality.readers import OVER_BUDGET, decode_budget
from modality.records import DecodedSlice, InputItem, RejectedInput, SliceHeader, stored_peak

# Stable reasons for rejects.csv.
NOT_DICOM = "not a DICOM file"
UNREADABLE = "unreadable file"
NON_IMAGE = "non-image object"
NO_PIXELS = "no pixel data"
UNDECODABLE = "undecodable transfer syntax"
MALFORMED = "truncated or malformed file"
DECODE_FAILED = "pixel decode failed"
CORRUPT_PIXELS = "truncated or corrupt pixel data"
BAD_RESCALE = "invalid rescale slope or intercept"
COLOUR_REJECTED = "colour image rejected"
NO_SUCH_FRAME = "no such frame"
TOO_LARGE = OVER_BUDGET

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
    zlib.error,  # a deflated dataset cut short
)


_PYDICOM_LOGGERS: tuple[int, list[logging.Logger]] = (-1, [])


def _pydicom_loggers() -> list[logging.Logger]:
    """The ``pydicom`` logger and its descendants (``pydicom.pixels.decoders.base`` logs decode trouble)."""
    global _PYDICOM_LOGGERS
    known = logging.Logger.manager.loggerDict
    if _PYDICOM_LOGGERS[0] != len(known):  # a logger was created since: list them again
        loggers = [logging.getLogger("pydicom")]
        loggers += [
            logger
            for name, logger in list(known.items())
            if name.startswith("pydicom.") and isinstance(logger, logging.Logger)
        ]
        _PYDICOM_LOGGERS = (len(known), loggers)
    return _PYDICOM_LOGGERS[1]


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's per-file validation chatter (warnings and log lines) while we read.

    Odd-but-readable headers (invalid UI values, implicit VR under an explicit syntax, pixel padding)
    are normal in public data; over a million files they would bury real problems, which surface as
    RejectedInput instead. pydicom's loggers are disabled (``Logger.disabled``: no record is even made)
    rather than raised to CRITICAL: ``Logger.setLevel`` clears the level cache of every logger in the
    process (~5 us with torch's loggers loaded, twice per use, and prepare enters this twice per file).
    """
    # only the loggers not quiet already: a nested use must not wake the outer one's
    loggers = [logger for logger in _pydicom_loggers() if not logger.disabled]
    mode = pydicom.config.settings.reading_validation_mode
    for logger in loggers:  # decode errors too: their text goes into RejectedInput.detail
        logger.disabled = True
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger in loggers:
            logger.disabled = False
        pydicom.config.settings.reading_validation_mode = mode


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


# ---------------------------------------------------------------- truncation and deflate bombs

#: pydicom's words when a file ends inside an element. It does not raise: it warns and returns the elements
#: read so far, which at the top level is none at all, so a cut file looked like one with no pixel data.
_EOF_WARNINGS = ("End of file reached before delimiter", "Unexpected end of file")


def _ended_early(caught: Sequence[warnings.WarningMessage]) -> str | None:
    """pydicom's end-of-file warning among those recorded during a read, or None."""
    for warning in caught:
        text = str(warning.message)
        if text.startswith(_EOF_WARNINGS):
            return text[:300]
    return None


def _has_pixel_element(ds: Dataset) -> bool:
    return any(tag in ds for tag in _PIXEL_TAGS)


#: Set on a dataset whose file ends inside its pixel data element: its headers are fine (the header pass
#: keeps them, as it always did for a file cut inside its pixels); decoding it is refused.
_PIXELS_CUT = "_modality_pixels_cut"


def _last_element_cut(ds: Dataset, source: io.BytesIO | str) -> tuple[int, str] | None:
    """(tag, why) when the file ends inside its last element's value; None when that element is whole.
    pydicom reads a short value without a word: a file cut before its pixel data read as one that has none,
    and a pixel data length field claiming 4 GB was not noticed when the bytes present filled the image."""
    if not len(ds) or transfer_syntax_of(ds) == DeflatedExplicitVRLittleEndian:
        return None  # positions in a deflated dataset are in the inflated bytes, which zlib checked whole
    tag = next(reversed(ds.keys()))  # the last element read (datasets keep file order)
    element = ds.get_item(tag, keep_deferred=True)
    tell, length = getattr(element, "value_tell", None), getattr(element, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return None
    if isinstance(source, io.BytesIO):
        size = len(source.getvalue())  # the bytes the buffer was made from: no copy
    else:
        try:
            size = os.stat(source).st_size
        except OSError:
            return None
    if tell + length <= size:
        return None
    return int(tag), f"the file ends inside element {tag} ({size - tell} of its {length} bytes)"


def _truncation(source: io.BytesIO | str, eof: str) -> RejectedInput:
    """Why a read ended early: inside the pixel data (its header, read up to the pixel data, is whole) or
    before it (or not DICOM at all: forced reads of random bytes end early too)."""
    if isinstance(source, io.BytesIO):
        source.seek(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            head = pydicom.dcmread(source, stop_before_pixels=True, force=True)
        except _PYDICOM_ERRORS as error:
            return RejectedInput(MALFORMED, f"{eof}; {_describe(error)}")
    if not _looks_like_dicom(head):
        return RejectedInput(NOT_DICOM, f"no recognisable DICOM elements before the end of the file ({eof})")
    if _ended_early(caught) is None and "Rows" in head:
        return RejectedInput(CORRUPT_PIXELS, f"the file ends inside the pixel data: {eof}")
    return RejectedInput(MALFORMED, eof)


#: Inflated bytes of a deflated dataset parsed for its header before the rest may inflate.
_DEFLATED_HEAD_BYTES = 1 << 20
#: A deflated dataset may inflate to its pixel data plus this much (overlays, icons, private blobs).
_DEFLATED_SLACK_BYTES = 64 << 20
_DEFLATED_UID_BYTES = DeflatedExplicitVRLittleEndian.encode("ascii")
#: Where the File Meta's Transfer Syntax UID is looked for (meta groups are a few hundred bytes).
_META_SEARCH_BYTES = 8192


def _after_pixel_module(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) > 0x0028FFFF


def _deflated_limit(head: bytes) -> int:
    """Inflated bytes allowed for a deflated dataset whose first inflated bytes are ``head``; raises
    :data:`OVER_BUDGET` when its header claims more samples than the decode budget."""
    budget = decode_budget()
    fallback = budget.max_file_pixels * 4 + _DEFLATED_SLACK_BYTES  # no readable header: float32 per sample
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(io.BytesIO(head), False, True, stop_when=_after_pixel_module)
    except Exception:  # any parse failure: the fallback bounds it, pydicom's full read words the rejection
        return fallback
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows <= 0 or columns <= 0:
        return fallback
    samples, frames = max(1, _int(ds, "SamplesPerPixel", 1)), frame_count(ds)
    budget.check(rows, columns, frames=frames, samples=samples, what="deflated DICOM header")
    bytes_per_sample = (max(8, _int(ds, "BitsAllocated", 16)) + 7) // 8
    return rows * columns * samples * frames * bytes_per_sample + _DEFLATED_SLACK_BYTES


def check_deflated(path: str) -> None:
    """Bound a Deflated Explicit VR Little Endian file before pydicom inflates it.

    pydicom inflates the whole dataset in memory before it parses a single element, so a 5 MB file of
    zeros that claims 20000 x 20000 pixels became 800 MB (and 4 GB downstream) before its Rows were seen.
    Here the stream is inflated chunk by chunk, keeping only the first MB: its header is checked against
    the decode budget, and a stream that inflates past its own pixel data plus 64 MB is refused, so
    the read that follows is bounded. Files that are not deflated return at once.
    """
    with open(path, "rb") as handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_preamble(handle, True)
                meta = _read_file_meta_info(handle)
        except Exception:  # no readable File Meta: pydicom's own read decides and words the rejection
            return
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        head = bytearray()
        limit: int | None = None
        total = 0
        while not inflater.eof and (pending := handle.read(1 << 16)):
            while pending and not inflater.eof:
                try:
                    out = inflater.decompress(pending, 1 << 20)
                except zlib.error:
                    return  # pydicom's read fails the same way and the caller rejects the file
                pending = inflater.unconsumed_tail
                total += len(out)
                if limit is None:
                    head += out[: _DEFLATED_HEAD_BYTES - len(head)]
                    if len(head) >= _DEFLATED_HEAD_BYTES:
                        limit = _deflated_limit(bytes(head))
                if limit is not None and total > limit:
                    raise RejectedInput(
                        OVER_BUDGET,
                        f"deflated dataset inflates past {limit:,} bytes, more than its header's pixel "
                        "data (plus 64 MB)",
                    )
        if limit is None:
            _deflated_limit(bytes(head))  # the whole dataset fitted in the head: its header still counts


def _may_be_deflated(source: io.BytesIO | str) -> bool:
    """The deflated syntax's UID near the start of the file (a cheap byte search before the real check)."""
    if isinstance(source, io.BytesIO):
        return _DEFLATED_UID_BYTES in source.getvalue()[:_META_SEARCH_BYTES]
    with open(source, "rb") as handle:
        return _DEFLATED_UID_BYTES in handle.read(_META_SEARCH_BYTES)


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
    # pydicom warns on every odd-but-readable header: recorded, never shown; only an early end matters.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            source = str(path) if header_only else _whole_file(str(path))
            if _may_be_deflated(source):
                check_deflated(str(path))
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
    if not _has_pixel_element(ds):
        eof = _ended_early(caught)
        if eof is not None:
            raise _truncation(source, eof)
        if not _looks_like_dicom(ds):  # e.g. little-endian bytes read under a big-endian syntax
            syntax = transfer_syntax_of(ds) or "none"
            raise RejectedInput(MALFORMED, f"no recognisable DICOM elements under transfer syntax {syntax}")
    cut = _last_element_cut(ds, source)
    if cut is not None and cut[0] not in _PIXEL_TAGS:
        raise RejectedInput(MALFORMED, cut[1])
    if cut is not None:
        setattr(ds, _PIXELS_CUT, cut[1])  # checked by slices_of
    return ds


# ---------------------------------------------------------------- checks shared by both passes


# ---- header values read from their bytes
# A value pydicom has not converted yet costs ~9 us to convert (a DataElement, hooks, three dataset
# lookups), and prepare reads a dozen per file that the pixel decoder never touches: ~0.1 ms a file, a
# tenth of an uncompressed slice's decode. The common case, a short value of plain printable ASCII
# under its dictionary VR, is read here from the raw element for exactly the value pydicom would give;
# anything else (another VR, other bytes, empty, deferred, already converted) asks pydicom.

#: VRs whose pydicom value is the decoded text less trailing spaces and NULs (``str`` or ``UID``).
_TEXT_VRS = frozenset({"CS", "UI", "LO", "SH"})
#: Printable ASCII without the backslash (the value delimiter): decodes alike in every DICOM character set.
_PLAIN_TEXT = re.compile(rb"[\x20-\x5b\x5d-\x7e]+")
#: One DS value that ``float`` reads as pydicom's DSfloat does (no inf, nan or underscores).
_PLAIN_DS = re.compile(rb" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")


@cache
def _tag_and_vr(keyword: str) -> tuple[BaseTag, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return BaseTag(tag), str(dictionary_VR(tag))


def _unconverted(ds: Dataset, keyword: str) -> bytes | None:
    """The value bytes of ``keyword`` when pydicom holds it unconverted, read under its dictionary VR and
    non-empty; None when pydicom must be asked (absent elements too)."""
    raw = _unconverted_element(ds, keyword)
    return None if raw is None else raw.value


def _unconverted_element(ds: Dataset, keyword: str) -> RawDataElement | None:
    """:func:`_unconverted`'s element (its bytes and their byte order), or None."""
    tag, vr = _tag_and_vr(keyword)
    raw = ds.get_item(tag, keep_deferred=True)
    if type(raw) is not RawDataElement or not raw.length or raw.value is None:
        return None
    # No VR (implicit VR files) reads as the dictionary's; UN does too (pydicom's replace_un_with_known_vr)
    read_as_dictionary = raw.VR is None or (
        raw.VR == "UN" and pydicom.config.replace_un_with_known_vr and len(raw.value) < 0xFFFF
    )
    if vr != raw.VR and not read_as_dictionary:
        return None
    if pydicom.config.data_element_callback is not None:
        return None
    return raw


def _plain_text(ds: Dataset, keyword: str) -> str | None:
    """``str(ds.<keyword>).strip()`` when read from the bytes, else None."""
    data = _unconverted(ds, keyword)
    if data is None or _tag_and_vr(keyword)[1] not in _TEXT_VRS:
        return None
    data = data.rstrip(b"\x00 ")  # pydicom's own padding strip (UIDs are padded with a NUL)
    return data.decode("ascii").strip() if _PLAIN_TEXT.fullmatch(data) else None


def _plain_numbers(source: Dataset, keyword: str) -> list[float] | None:
    """The values of a DS element as floats when read from the bytes, else None."""
    data = _unconverted(source, keyword)
    if data is None or _tag_and_vr(keyword)[1] != "DS":
        return None
    parts = data.split(b"\\")
    if not all(_PLAIN_DS.fullmatch(part) for part in parts):
        return None
    return [float(part) for part in parts]


def _text(ds: Dataset, keyword: str, default: str = "") -> str:
    plain = _plain_text(ds, keyword)
    if plain is not None:
        return plain
    try:
        value = ds.get(keyword, default)
    except _PYDICOM_ERRORS:  # a malformed element raises only when read
        return default
    if value is None:
        return default
    return str(value).strip()


#: One IS value that ``int`` reads as pydicom's IS does (an integer in decimal, spaces around it).
_PLAIN_IS = re.compile(rb" *[+-]?[0-9]{1,11} *")


def _plain_int(ds: Dataset, keyword: str) -> int | None:
    """A single US or IS value read from its bytes, else None (absent, converted, several values, other
    bytes): Rows, Columns, BitsAllocated and the like are read about nine times a file."""
    raw = _unconverted_element(ds, keyword)
    if raw is None:
        return None
    data, vr = raw.value, _tag_and_vr(keyword)[1]
    if vr == "US" and len(data) == 2:
        return int.from_bytes(data, "little" if raw.is_little_endian else "big")
    if vr == "IS" and _PLAIN_IS.fullmatch(data):
        return int(data)
    return None


def _int(ds: Dataset, keyword: str, default: int) -> int:
    plain = _plain_int(ds, keyword)
    if plain is not None:
        return plain
    try:
        value = ds.get(keyword, default)
        return int(value) if value not in (None, "") else default
    except (*_PYDICOM_ERRORS,):
        return default


_TRANSFER_SYNTAX_UID = BaseTag(0x00020010)


def transfer_syntax_of(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    if meta is None or _TRANSFER_SYNTAX_UID not in meta:
        return ""
    return str(meta[_TRANSFER_SYNTAX_UID].value)


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
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows <= 0 or columns <= 0:
        raise RejectedInput(MALFORMED, f"image size Rows={ds.get('Rows')} Columns={ds.get('Columns')}")
    check_budget(ds, rows, columns)
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


#: Private creator and element of Siemens' NumberOfImagesInMosaic, (0019,xx0A).
_SIEMENS_MR_HEADER = "SIEMENS MR HEADER"
_MOSAIC_COUNT_ELEMENT = 0x0A
#: Smallest tile side a mosaic is split into: a header claiming thousands of images in a 512 px frame is
#: not a mosaic of slices anyone acquired, and is read as the one image it is.
MIN_MOSAIC_TILE = 16


def _image_type_has(ds: Dataset, value: str) -> bool:
    image_type = ds.get("ImageType")
    if image_type is None:
        return False
    values = (
        image_type if isinstance(image_type, (list, tuple, pydicom.multival.MultiValue)) else [image_type]
    )
    return any(str(v).strip().upper() == value for v in values)


def _mosaic_images(ds: Dataset) -> int | None:
    """NumberOfImagesInMosaic: Siemens' private (0019,xx0A), else the CSA image header's (nibabel parses it)."""
    try:
        value = ds.get_private_item(0x0019, _MOSAIC_COUNT_ELEMENT, _SIEMENS_MR_HEADER).value
    except (KeyError, ValueError, TypeError, AttributeError):
        value = None
    if isinstance(value, bytes) and len(value) >= 2:  # VR UN: an unsigned short, little-endian
        value = struct.unpack("<H", value[:2])[0]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        from nibabel.nicom import csareader

        return int(csareader.get_n_mosaic(csareader.get_csa_header(ds, "image")))
    except Exception:  # no CSA header, or one nibabel cannot parse: not split
        return None


def mosaic_layout(ds: Dataset) -> tuple[int, int] | None:
    """``(images, grid)`` of a Siemens mosaic, or None for every other dataset.

    A mosaic is one stored frame holding ``images`` slices as tiles of a ``grid x grid`` array, row by row
    (``grid = ceil(sqrt(images))``; the tiles after the last image are empty), so tile ``i`` is at grid row
    ``i // grid``, column ``i % grid``: dcm2niix's and nibabel's reading. Split only when the frame divides
    into tiles of at least :data:`MIN_MOSAIC_TILE` pixels a side; anything else is read as one image.
    """
    if frame_count(ds) != 1 or not _image_type_has(ds, "MOSAIC"):
        return None
    images = _mosaic_images(ds)
    if images is None or images < 2:
        return None
    grid = math.ceil(math.sqrt(images))
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows % grid or columns % grid or min(rows, columns) // grid < MIN_MOSAIC_TILE:
        return None
    return images, grid


def slice_count(ds: Dataset) -> int:
    """2-D slices a dataset holds: its frames, or the tiles of a mosaic."""
    layout = mosaic_layout(ds)
    return layout[0] if layout is not None else frame_count(ds)


def check_budget(ds: Dataset, rows: int, columns: int) -> None:
    """Reject a file whose header claims more samples (per frame, per file) than the decode budget allows:
    checked before any decode, so a few KB claiming 30000 x 30000 pixels never reach a decoder."""
    decode_budget().check(
        rows,
        columns,
        frames=frame_count(ds),
        samples=_int(ds, "SamplesPerPixel", 1),
        what="DICOM header",
    )


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
        if _DEFLATED_UID_BYTES in head[:_META_SEARCH_BYTES]:
            return None  # pydicom would inflate it unchecked: open_dicom bounds it first
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(head), defer_size=_DEFER_SIZE)
    except Exception:  # any failure: the full read decides, and words the rejection
        return None
    if len(head) == size:  # a cut file or one without pixels: the full read says which
        whole = not _ended_early(caught) and _has_pixel_element(ds)
        cut = _last_element_cut(ds, io.BytesIO(head)) if whole else None
        return ds if whole and (cut is None or cut[0] in _PIXEL_TAGS) else None
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
        return os.stat(path).st_size > FULL_READ_MAX_BYTES
    except OSError:
        return False  # open_dicom turns the failure into a rejection


def headers_of(ds: Dataset, item: InputItem) -> list[SliceHeader]:
    """One :class:`SliceHeader` per frame (per tile of a mosaic) of a dataset that passed :func:`check_is_image`."""
    n_frames = slice_count(ds)
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
    source: Dataset | None = ds if _RESCALE_SLOPE in ds or _RESCALE_INTERCEPT in ds else None
    if source is None:
        source = _frame_item(ds, index, "PixelValueTransformationSequence")
    if source is None:
        return None
    try:
        slope = _rescale_number(source, "RescaleSlope", _RESCALE_SLOPE, 1.0)
        intercept = _rescale_number(source, "RescaleIntercept", _RESCALE_INTERCEPT, 0.0)
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        # NaN/Inf would turn every pixel into NaN/Inf, or (treated as absent) give stored values in place
        # of modality units without a word: neither is a usable image.
        raise RejectedInput(BAD_RESCALE, f"frame {index}: RescaleSlope {slope}, RescaleIntercept {intercept}")
    if slope == 0.0:
        return None  # a zero slope would erase the image; treat as absent
    return slope, intercept


_RESCALE_INTERCEPT = 0x00281052
_RESCALE_SLOPE = 0x00281053


def _rescale_number(source: Dataset, keyword: str, tag: int, default: float) -> float:
    """``float(source.get(keyword, default) or default)``: absent, empty or zero reads as ``default``."""
    if tag not in source:
        return default
    plain = _plain_numbers(source, keyword)
    if plain is not None and len(plain) == 1:
        return plain[0] or default
    return float(source.get(keyword, default) or default)


def stored_range(bits_stored: int, pixel_representation: int) -> tuple[float, float]:
    """The values ``bits_stored`` bits can hold, signed or not (never the numpy container's range)."""
    if pixel_representation == 1:
        return -float(2 ** (bits_stored - 1)), float(2 ** (bits_stored - 1) - 1)
    return 0.0, float(2**bits_stored - 1)


def _window(ds: Dataset, keyword: str, index: int) -> float | None:
    tag = _tag_and_vr(keyword)[0]
    source: Dataset | None = ds if tag in ds else _frame_item(ds, index, "FrameVOILUTSequence")
    if source is None or tag not in source:
        return None
    plain = _plain_numbers(source, keyword)
    if plain is not None:
        return plain[0]
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


#: JPEG 2000 Part 1 syntaxes: their packet data never holds a marker code (checked by ``j2k_problem``).
_J2K_PART1 = frozenset({JPEG2000Lossless, JPEG2000, JPEG2000MCLossless, JPEG2000MC})
#: Marker codes that stand alone (no length field): SOC, SOD, EOC, EPH and the reserved FF30-FF3F.
_J2K_NO_SEGMENT = frozenset({0x4F, 0x93, 0xD9, 0x92, *range(0x30, 0x40)})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _j2k_segments(data: bytes, pos: int, end: int, stop: int, where: str) -> tuple[int, str | None]:
    """Walk marker segments from ``pos`` up to the marker ``stop`` (FF``stop``); (its position, problem)."""
    while True:
        if pos + 2 > end:
            return pos, f"codestream ends inside the {where}"
        if data[pos] != 0xFF:
            return pos, f"no marker at byte {pos} of the {where}"
        code = data[pos + 1]
        if code == stop:
            return pos, None
        if code in _J2K_NO_SEGMENT or pos + 4 > end:
            return pos, f"marker FF{code:02X} misplaced in the {where}"
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]


def j2k_problem(data: bytes, *, scan_packets: bool = True) -> str | None:
    """What is structurally wrong with a JPEG 2000 codestream, or None when it is complete.

    JPEG 2000 carries no checksum, and OpenJPEG decodes damaged packet data without a word (a stream
    with bytes flipped in its middle came out as a "valid" CT slice), so the structure is checked
    before decoding: SOC and SIZ first, every tile-part (SOT) whole within the stream, its header ended
    by SOD, the stream ended by EOC; and, for Part 1 streams (``scan_packets``), no marker code
    (0xFF followed by 0x90 or more, except SOP/EPH) inside packet data, which the standard's bit
    stuffing rules out and corrupt or misaligned bytes produce. Damage that keeps all of this intact (a
    few changed bytes inside one code-block) cannot be seen and still decodes wrong.
    """
    if data[:12] == _JP2_SIGNATURE:  # a JP2 file wrapped in the fragment (non-conformant but decoded)
        box = data.find(b"jp2c")
        data = data[box + 4 :] if box >= 0 else b""
    if data[-1:] == b"\x00" and data[-3:-1] == b"\xff\xd9":
        data = data[:-1]  # the even-length pad of a DICOM fragment
    n = len(data)
    if data[:4] != b"\xff\x4f\xff\x51":
        return "no SOC and SIZ markers at the start of the codestream"
    pos, problem = _j2k_segments(data, 2, n, 0x90, "main header")
    if problem:
        return problem
    tile_parts = 0
    while data[pos : pos + 2] != b"\xff\xd9":
        if data[pos : pos + 2] != b"\xff\x90":
            return f"codestream ends after {tile_parts} tile-part(s) without EOC"
        if pos + 12 > n:
            return "codestream ends inside a tile-part header"
        length, _, psot = struct.unpack_from(">HHI", data, pos + 2)
        if length != 10:
            return f"SOT marker with length {length}"
        if psot == 0:  # the last tile-part runs to EOC
            if data[n - 2 :] != b"\xff\xd9":
                return "the last tile-part is not ended by EOC"
            end = n - 2
        elif pos + psot > n:
            return f"tile-part {tile_parts} claims {psot} bytes, {n - pos} are left"
        else:
            end = pos + psot
        body, problem = _j2k_segments(data, pos + 12, end, 0x93, "tile-part header")
        if problem:
            return problem
        if scan_packets:
            at = data.find(b"\xff", body + 2, end - 1)
            while at != -1:
                if data[at + 1] >= 0x90 and data[at + 1] not in (0x91, 0x92):  # SOP, EPH may appear
                    return f"marker code FF{data[at + 1]:02X} inside packet data at byte {at}"
                at = data.find(b"\xff", at + 1, end - 1)
        tile_parts += 1
        pos = end
    return None


#: Markers that may follow entropy-coded data: EOI, another scan, tables, restart interval, DNL,
#: hierarchical-mode markers, comments, APPn, and JPEG-LS's LSE.
_JPEG_AFTER_SCAN = frozenset(
    {0xD9, 0xDA, 0xC4, 0xCC, 0xDB, 0xDD, 0xDC, 0xDE, 0xDF, 0xFE, 0xF8, *range(0xE0, 0xF0)}
)


def _jpeg_scan_end(data: bytes, pos: int, ls: bool) -> int:
    """Where the entropy-coded data starting at ``pos`` ends (the 0xFF of the next marker), or -1.

    JPEG stuffs 0x00 after a data 0xFF and allows RSTn (FFD0-FFD7) and fill bytes (FFFF); JPEG-LS stuffs a
    zero bit, so a 0xFF followed by a byte below 0x80 is data there, and FF80 or above is a marker.
    """
    n = len(data)
    at = data.find(b"\xff", pos)
    while at != -1 and at + 1 < n:
        following = data[at + 1]
        if 0xD0 <= following <= 0xD7:  # RSTn
            at = data.find(b"\xff", at + 2)
        elif ls and following < 0x80:
            at = data.find(b"\xff", at + 1)
        elif not ls and following == 0x00:
            at = data.find(b"\xff", at + 2)
        elif not ls and following == 0xFF:
            at += 1
        else:
            return at
    return -1


def jpeg_problem(data: bytes, *, ls: bool = False) -> str | None:
    """What is structurally wrong with a JPEG (ISO 10918) or JPEG-LS (``ls``, ISO 14495) codestream, or
    None when it is complete.

    libjpeg and CharLS decode damaged entropy-coded data without a word (half the pixels of a real JPEG
    Lossless CT slice wrong after 16 changed bytes), so the structure is checked before decoding: SOI
    first, every marker segment whole, entropy-coded data holding only what its byte stuffing allows
    (bytes changed there mostly turn into impossible markers), and the stream ended by EOI with at most
    padding after it. Like :func:`j2k_problem` it cannot see damage that keeps all of this intact.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return "no SOI marker at the start of the codestream"
    pos, scans = 2, 0
    while True:
        if pos + 2 > n:
            return "codestream ends without EOI"
        if data[pos] != 0xFF:
            return f"no marker at byte {pos}"
        code = data[pos + 1]
        if code == 0xFF:  # fill byte
            pos += 1
            continue
        if scans and code not in _JPEG_AFTER_SCAN:
            return f"marker FF{code:02X} inside or after entropy-coded data at byte {pos}"
        if code == 0xD9:
            if not scans:
                return "EOI before any scan"
            tail = data[pos + 2 :]
            if len(tail) > 1 and tail.strip(b"\x00\xff"):  # one odd pad byte, or 00/FF padding, only
                return f"EOI at byte {pos} with {len(tail)} bytes of data after it"
            return None
        if code in (0x01, 0xD8) or 0xD0 <= code <= 0xD7:
            return f"marker FF{code:02X} out of place at byte {pos}"
        if pos + 4 > n:
            return "codestream ends inside a marker segment"
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if length < 2 or pos + 2 + length > n:
            return f"marker FF{code:02X} segment of {length} bytes runs past the end"
        pos += 2 + length
        if code == 0xDA:  # SOS: entropy-coded data up to the next marker
            scans += 1
            pos = _jpeg_scan_end(data, pos, ls)
            if pos == -1:
                return "codestream ends inside entropy-coded data"


def _j2k_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SIZ marker of a JPEG 2000 codestream."""
    at = data.find(b"\xff\x51", 0, 4096)
    if at < 0 or at + 40 > len(data):
        return None
    x, y, x0, y0 = struct.unpack_from(">IIII", data, at + 6)
    (components,) = struct.unpack_from(">H", data, at + 38)
    return y - y0, x - x0, components


def _encapsulated_frame(ds: Dataset, index: int, n_frames: int) -> bytes | None:
    """One frame's codestream, as pydicom's decoder will find it; None when the fragments cannot be
    split (the decoder then raises and words the rejection)."""
    try:
        offsets = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        return get_frame(ds.PixelData, index, extended_offsets=offsets, number_of_frames=n_frames)
    except Exception:
        return None


def check_codestream(ds: Dataset, index: int, n_frames: int, syntax: str) -> None:
    """Before a JPEG-family frame is decoded: its codestream must be structurally whole
    (:func:`j2k_problem`, :func:`jpeg_problem`), and the size it declares must be the header's (the
    decoder allocates what the codestream says, so this holds the decode budget on the decoder path too)."""
    is_j2k = syntax in JPEG2000TransferSyntaxes
    if not (is_j2k or syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes):
        return
    data = _encapsulated_frame(ds, index, n_frames)
    if data is None:
        return
    if is_j2k:
        problem = j2k_problem(data, scan_packets=syntax in _J2K_PART1)
        if problem is not None:
            raise RejectedInput(CORRUPT_PIXELS, f"frame {index}: JPEG 2000 codestream: {problem}")
        size = _j2k_size(data)
    else:
        ls = syntax in JPEGLSTransferSyntaxes
        problem = jpeg_problem(data, ls=ls)
        if problem is not None:
            kind = "JPEG-LS" if ls else "JPEG"
            raise RejectedInput(CORRUPT_PIXELS, f"frame {index}: {kind} codestream: {problem}")
        info = _get_jpg_parameters(data)
        size = (info["height"], info["width"], info["components"]) if "height" in info else None
    if size is None:
        return  # no size to compare: the decoder reads its own header and words any refusal
    rows, columns, components = size
    if (rows, columns) != (_int(ds, "Rows", 0), _int(ds, "Columns", 0)) and rows != 0:  # JPEG rows 0: DNL
        raise RejectedInput(
            DECODE_FAILED,
            f"frame {index}: the codestream is {rows} x {columns}, the header says "
            f"{_int(ds, 'Rows', 0)} x {_int(ds, 'Columns', 0)}",
        )
    # Same size as the header, which passed the budget: only the component count can still exceed it.
    decode_budget().check(rows, columns, samples=components, what=f"frame {index} codestream")


def _decode_frame(ds: Dataset, index: int | None, n_frames: int, syntax: str) -> np.ndarray:
    """Decode one frame (every frame, stacked, for ``index`` None); YBR comes back as RGB; bad codestreams
    become RejectedInput.

    Frame by frame, so a long multi-frame file never holds more than one decoded raw frame beside the
    float32 slices already made (pydicom finds the frame via the offset table or the fragments). Only
    uncompressed frames are decoded all at once (:func:`slices_of`): their bytes are in memory already.
    """
    if index is not None:
        check_codestream(ds, index, n_frames, syntax)
    decoder = get_decoder(syntax)
    options: dict[str, Any] = (
        {"as_rgb": True} if n_frames == 1 or index is None else {"as_rgb": True, "index": index}
    )
    if decoder.is_native:
        # A read-only view of the bytes in memory instead of a writeable copy: nothing here writes into
        # a decoded frame (every step makes a new float32 array), so the copy was a pass for nothing.
        options["view_only"] = True
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
    return _padding_mask(frame, ds.get("PixelPaddingValue"), lambda: ds.get("PixelPaddingRangeLimit"))


def _padding_mask(frame: np.ndarray, value: Any, limit_of: Callable[[], Any]) -> np.ndarray | None:
    if value is None or frame.ndim != 2 or not np.issubdtype(frame.dtype, np.integer):
        return None
    limit = limit_of()
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


class FrameHeader:
    """The header values :func:`_frame_to_slice` reads for each frame (rescale, window, padding), read once
    per dataset: a long multi-frame file asked for the same values once per frame (~70 us a frame).

    Values an enhanced object's functional groups can set per frame are read per frame when it has them;
    every value is read on first use, where the frame-by-frame reads read it, so a malformed element fails
    the same frame with the same words.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.per_frame = _PER_FRAME_GROUPS in ds or _SHARED_GROUPS in ds
        self._read: dict[str, Any] = {}

    def get(self, keyword: str) -> Any:
        """``ds.get(keyword)`` of the top level."""
        if keyword not in self._read:
            self._read[keyword] = self.ds.get(keyword)
        return self._read[keyword]

    def rescale(self, index: int) -> tuple[float, float] | None:
        return self._by_frame("rescale", index, lambda: rescale_of(self.ds, index))

    def window(self, keyword: str, index: int) -> float | None:
        return self._by_frame(keyword, index, lambda: _window(self.ds, keyword, index))

    def _by_frame(self, name: str, index: int, read: Callable[[], Any]) -> Any:
        if self.per_frame:
            return read()
        if name not in self._read:
            self._read[name] = read()
        return self._read[name]


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
    frame: np.ndarray, index: int, colour: str, facts: PixelFacts, header: FrameHeader
) -> DecodedSlice:
    ds = header.ds
    photometric, bits_stored, representation = facts.photometric, facts.bits_stored, facts.representation
    low, high = stored_range(bits_stored, representation)
    rescale = None
    is_colour = photometric in COLOUR_PHOTOMETRICS or frame.ndim == 3
    padding = None
    if not is_colour:
        padding = _padding_mask(
            frame, header.get("PixelPaddingValue"), lambda: header.get("PixelPaddingRangeLimit")
        )
    if is_colour:
        pixels = _to_grey(frame, photometric, ds, colour)
        if photometric == "PALETTE COLOR":
            low, high = _palette_range(ds)
    elif facts.lut_sequence:
        pixels, (low, high) = _apply_lut_sequence(frame, ds, low, high)
    else:
        rescale = header.rescale(index)
        pixels = _rescaled(frame, rescale)
        if rescale is not None:
            slope, intercept = rescale
            low, high = sorted((low * slope + intercept, high * slope + intercept))
    if photometric == "MONOCHROME1":
        if pixels.dtype == np.float32 and pixels.base is None and pixels is not frame:
            np.subtract(np.float32(low + high), pixels, out=pixels)  # our own array: in place
        else:
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
        "window_center": header.window("WindowCenter", index),
        "window_width": header.window("WindowWidth", index),
        "manufacturer": facts.manufacturer,
        "padding_pixels": int(padding.sum()) if padding is not None else 0,
        "stored_peak": None if is_colour else stored_peak(frame),
    }
    return DecodedSlice(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32), index=index, value_range=(low, high), meta=meta
    )


def _mosaic_slices(
    ds: Dataset, wanted: Sequence[int], grid: int, colour: str, facts: PixelFacts, header: FrameHeader
) -> list[DecodedSlice]:
    """The tiles ``wanted`` of a mosaic's one frame (:func:`mosaic_layout`), each a slice of its own."""
    mosaic = _decode_frame(ds, 0, 1, facts.transfer_syntax)
    if mosaic.ndim != 2 or mosaic.shape[0] % grid or mosaic.shape[1] % grid:
        raise RejectedInput(MALFORMED, f"mosaic decoded to shape {mosaic.shape}, not a {grid} x {grid} grid")
    return [
        _frame_to_slice(mosaic_tile(mosaic, index, grid), index, colour, facts, header) for index in wanted
    ]


def mosaic_tile(mosaic: np.ndarray, index: int, grid: int) -> np.ndarray:
    """Tile ``index`` (row-major) of a ``grid x grid`` mosaic: a view, nothing copied."""
    rows, columns = mosaic.shape[0] // grid, mosaic.shape[1] // grid
    top, left = (index // grid) * rows, (index % grid) * columns
    return mosaic[top : top + rows, left : left + columns]


def _rescaled(frame: np.ndarray, rescale: tuple[float, float] | None) -> np.ndarray:
    """``frame`` as float32 times the slope plus the intercept, each step in float32 (a new array).

    The conversion rides on the first arithmetic step (numpy casts each element to float32 exactly as
    ``astype`` does), which saves a pass over the frame.
    """
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    if slope != 1.0:
        pixels = np.multiply(frame, np.float32(slope), dtype=np.float32)
        if intercept != 0.0:
            pixels += np.float32(intercept)
        return pixels
    if intercept != 0.0:
        return np.add(frame, np.float32(intercept), dtype=np.float32)
    return frame.astype(np.float32)


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
    cut = getattr(ds, _PIXELS_CUT, None)
    if cut is not None:
        raise RejectedInput(MALFORMED, cut)
    layout = mosaic_layout(ds)
    n_frames = layout[0] if layout is not None else frame_count(ds)
    wanted = list(range(n_frames)) if indices is None else [int(i) for i in indices]
    missing = [i for i in wanted if not 0 <= i < n_frames]
    if missing:
        raise RejectedInput(NO_SUCH_FRAME, f"frames {missing} requested, file has {n_frames}")
    facts = PixelFacts.of(ds)
    photometric = facts.photometric
    if colour == "reject" and (photometric in COLOUR_PHOTOMETRICS or _int(ds, "SamplesPerPixel", 1) > 1):
        raise RejectedInput(COLOUR_REJECTED, f"photometric {photometric}")
    header = FrameHeader(ds)
    if layout is not None:
        return _mosaic_slices(ds, wanted, layout[1], colour, facts, header)
    # Uncompressed frames are bytes already in memory: one decode call for all of them costs one call's
    # overhead instead of one per frame (~80 us each), for the same values.
    every: np.ndarray | None = None
    if n_frames > 1 and len(wanted) > 1 and get_decoder(facts.transfer_syntax).is_native:
        every = _decode_frame(ds, None, n_frames, facts.transfer_syntax)
    slices = []
    for index in wanted:
        frame = (
            every[index] if every is not None else _decode_frame(ds, index, n_frames, facts.transfer_syntax)
        )
        if frame.ndim not in (2, 3) or frame.shape[0] == 0 or frame.shape[1] == 0:
            raise RejectedInput(MALFORMED, f"frame {index} decoded to shape {frame.shape}")
        slices.append(_frame_to_slice(frame, index, colour, facts, header))
    return slices
