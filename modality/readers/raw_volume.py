"""MetaImage (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``): a text header and raw voxels, read without ITK.

Why here: public CT and MR collections are published in these formats as often as in NIfTI (LUNA16's CT in
``.mhd`` + ``.raw`` in Hounsfield units, most Grand Challenge sets in ``.mha``, 3D Slicer's exports in ``.nrrd``),
and a pool that rejected them would lose whole datasets. Both formats are a few lines of ``key = value`` text and
voxels stored first-index-fastest, exactly NIfTI's layout, so this module only parses the header and returns the
voxels with an RAS affine; :mod:`modality.readers.volume` then slices them the NIfTI way (canonical axes, viewer
layout, first volume of a 4-D file), so a CT read from ``.mha`` looks to the network like the same CT read from
``.nii``.

Untrusted headers are held to what they can name: the header text is at most :data:`MAX_HEADER_BYTES`; a detached
data file (``ElementDataFile``, ``data file``) must be a regular file in the header's own folder (no ``..``, no
absolute path, no device or FIFO that would block a read); multi-file lists and patterns are refused with a
reason; the data must hold exactly the bytes the header's shape needs (compressed data are inflated as a bounded
stream, so a small file cannot expand past them). Uncompressed voxels are memory-mapped, so a slice costs one
slice of I/O. The caller checks the header's shape against the decode budget before :func:`load_raw_volume`.

Coordinates: MetaImage (ITK) positions are LPS; NRRD names its ``space`` (RAS, LAS, LPS; anything else is taken as
RAS). Both become an RAS affine, NIfTI's convention.
"""

from __future__ import annotations

import bz2
import math
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from modality.records import RejectedInput

#: Suffixes of the two header formats (lower case). ``.mhd``/``.nhdr`` name a data file beside them.
METAIMAGE_SUFFIXES = (".mha", ".mhd")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
RAW_VOLUME_SUFFIXES = (*METAIMAGE_SUFFIXES, *NRRD_SUFFIXES)
#: Suffixes of detached voxel files: read with their header, never offered on their own.
DETACHED_DATA_SUFFIXES = (".raw", ".zraw")

#: The most header text read: real headers are under 2 KB; a file with no end of header is not one.
MAX_HEADER_BYTES = 64 * 1024
#: The most characters an ASCII voxel may take with its separator (a float64 in full is 24).
MAX_ASCII_CHARS = 64
#: Compressed voxels are read this much at a time.
_CHUNK_BYTES = 1 << 20

NOT_VOLUME = "not a volume file"
UNREADABLE = "unreadable file"
MALFORMED = "truncated or malformed file"
BAD_SHAPE = "unsupported array shape"
UNSUPPORTED = "unsupported volume encoding"

_METAIMAGE_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",  # MetaIO's MET_LONG is 4 bytes whatever the platform's long
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}

_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    **dict.fromkeys(
        (
            "longlong",
            "long long",
            "long long int",
            "signed long long",
            "signed long long int",
            "int64",
            "int64_t",
        ),
        "i8",
    ),
    **dict.fromkeys(
        ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"
    ),
    "float": "f4",
    "double": "f8",
}

#: NRRD ``space`` values and the signs that take their axes to RAS.
_NRRD_SPACES = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}
_LPS_TO_RAS = (-1.0, -1.0, 1.0)


@dataclass(frozen=True)
class RawVolumeHeader:
    """What a MetaImage or NRRD header says about its voxels.

    ``shape`` is in NIfTI order (first index fastest on disk), spatial axes first; ``dtype`` carries the byte
    order; ``affine`` maps voxel indices to RAS millimetres; ``offset`` is where the voxels start in
    ``data_path`` (-1: they end the file); ``encoding`` is ``raw``, ``zlib`` (zlib or gzip stream), ``bzip2``
    or ``ascii``.
    """

    format: str
    shape: tuple[int, ...]
    dtype: np.dtype
    affine: np.ndarray
    data_path: Path
    offset: int
    encoding: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def is_raw_volume(path: str | Path) -> bool:
    """Whether ``path`` names a MetaImage or NRRD header (by suffix)."""
    return Path(path).suffix.lower() in RAW_VOLUME_SUFFIXES


def read_raw_volume_header(path: str | Path) -> RawVolumeHeader:
    """The header of a MetaImage or NRRD file; :class:`RejectedInput` for anything it cannot describe."""
    path = Path(path)
    text, data_start = _header_text(path)
    if path.suffix.lower() in METAIMAGE_SUFFIXES:
        return _metaimage_header(path, text, data_start)
    if path.suffix.lower() in NRRD_SUFFIXES:
        return _nrrd_header(path, text, data_start)
    raise RejectedInput(NOT_VOLUME, f"{path.suffix!r} is neither MetaImage nor NRRD")


def load_raw_volume(header: RawVolumeHeader) -> np.ndarray:
    """The voxels, ``header.shape`` in NIfTI order: a read-only memory map for raw data, else decoded once."""
    path = header.data_path
    size = _regular_file_size(path)
    needed = header.nbytes
    if header.encoding == "raw":
        offset = size - needed if header.offset < 0 else header.offset
        if offset < 0 or offset + needed > size:
            raise RejectedInput(
                MALFORMED,
                f"{path.name} holds {size} bytes; the header needs {needed} from byte {header.offset}",
            )
        if needed == 0:
            raise RejectedInput(BAD_SHAPE, f"shape {header.shape}")
        flat = np.memmap(path, dtype=header.dtype, mode="r", offset=offset, shape=(math.prod(header.shape),))
    else:
        with path.open("rb") as handle:
            handle.seek(max(header.offset, 0))
            flat = _decoded(handle, header, needed)
    # Stored first-index-fastest: C order over the reversed shape, transposed (a view, nothing copied).
    return flat.reshape(header.shape[::-1]).T


def _decoded(handle: BinaryIO, header: RawVolumeHeader, needed: int) -> np.ndarray:
    """Encoded voxels read from ``handle``; no more of the file is read than the header's shape can use."""
    if header.encoding == "ascii":
        count = math.prod(header.shape)
        payload = handle.read(count * MAX_ASCII_CHARS + 1)
        if len(payload) > count * MAX_ASCII_CHARS:
            raise RejectedInput(MALFORMED, f"ASCII voxels longer than {MAX_ASCII_CHARS} characters a value")
        try:
            values = np.array(payload.split(), dtype=np.float64)
        except ValueError as error:
            raise RejectedInput(MALFORMED, f"ASCII voxels: {error}"[:300]) from None
        if values.size != count:
            raise RejectedInput(MALFORMED, f"{values.size} ASCII values; the header needs {count}")
        return values.astype(header.dtype.newbyteorder("="))
    if header.encoding not in ("zlib", "bzip2"):
        raise RejectedInput(UNSUPPORTED, f"encoding {header.encoding!r}")
    try:
        data = _inflated(handle, header.encoding, needed + 1)
    except (zlib.error, OSError, ValueError, EOFError) as error:
        raise RejectedInput(MALFORMED, f"compressed voxels do not inflate: {error}"[:300]) from None
    if len(data) != needed:
        raise RejectedInput(MALFORMED, f"voxels decompress to {len(data)}+ bytes; the header needs {needed}")
    return np.frombuffer(data, dtype=header.dtype)


def _inflated(handle: BinaryIO, encoding: str, limit: int) -> bytes:
    """At most ``limit`` bytes inflated from a zlib/gzip or bzip2 stream, read in chunks: neither the
    expansion (a bomb) nor the compressed file (however large) is taken past what the caller can use."""
    out = bytearray()
    if encoding == "zlib":
        inflater = zlib.decompressobj(wbits=47)  # zlib or gzip header, detected
        pending = b""
        while len(out) < limit and not inflater.eof:
            chunk = pending or handle.read(_CHUNK_BYTES)
            if not chunk:
                break
            out += inflater.decompress(chunk, limit - len(out))
            pending = inflater.unconsumed_tail
        return bytes(out)
    decompressor = bz2.BZ2Decompressor()
    while len(out) < limit and not decompressor.eof:
        chunk = handle.read(_CHUNK_BYTES) if decompressor.needs_input else b""
        if decompressor.needs_input and not chunk:
            break
        out += decompressor.decompress(chunk, limit - len(out))
    return bytes(out)


# ---------------------------------------------------------------- shared pieces


def _regular_file_size(path: Path) -> int:
    try:
        info = path.stat()
    except OSError as error:
        raise RejectedInput(UNREADABLE, f"{type(error).__name__}: {error}"[:300]) from None
    if not stat.S_ISREG(info.st_mode):
        raise RejectedInput(UNREADABLE, f"{path.name} is not a regular file")
    return info.st_size


def _header_text(path: Path) -> tuple[str, int]:
    """The header's text up to its end (NRRD: the first blank line; MetaImage: the ``ElementDataFile`` line)
    and the byte where attached data start (the file's end when nothing follows)."""
    _regular_file_size(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(MAX_HEADER_BYTES)
    except OSError as error:
        raise RejectedInput(UNREADABLE, f"{type(error).__name__}: {error}"[:300]) from None
    if path.suffix.lower() in NRRD_SUFFIXES:
        found = re.search(rb"\r?\n\r?\n", head)
        end = found.end() if found else None
        if end is None and path.suffix.lower() == ".nrrd":
            raise RejectedInput(NOT_VOLUME, f"no end of NRRD header in the first {MAX_HEADER_BYTES} bytes")
        header_bytes = head[: found.start()] if found else head
        data_start = end if end is not None else len(head)
    else:
        found = re.search(rb"(?m)^[ \t]*ElementDataFile[ \t]*=[^\n]*\n?", head)
        if found is None:
            raise RejectedInput(NOT_VOLUME, f"no ElementDataFile line in the first {MAX_HEADER_BYTES} bytes")
        header_bytes, data_start = head[: found.end()], found.end()
    try:
        return header_bytes.decode("ascii"), data_start
    except UnicodeDecodeError:
        raise RejectedInput(NOT_VOLUME, "header is not ASCII text") from None


def _data_file(header_path: Path, name: str) -> Path:
    """A detached data file named by a header: a plain file name in the header's own folder."""
    name = name.strip()
    if not name or "%" in name or name.upper().startswith("LIST"):
        raise RejectedInput(UNSUPPORTED, f"data split over several files ({name[:80]!r})")
    candidate = Path(name)
    if candidate.is_absolute() or len(candidate.parts) != 1 or name in (".", ".."):
        raise RejectedInput(UNREADABLE, f"data file {name[:80]!r} is not a file name beside the header")
    return header_path.parent / candidate


def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in re.split(r"[\s,()]+", text.strip()) if v]
    except ValueError:
        raise RejectedInput(MALFORMED, f"{what}: {text[:80]!r} is not a list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise RejectedInput(MALFORMED, f"{what}: {text[:80]!r} holds a non-finite number")
    return values


def _sizes(text: str, what: str) -> list[int]:
    values = _numbers(text, what)
    if not values or any(v != int(v) or v < 1 for v in values):
        raise RejectedInput(BAD_SHAPE, f"{what} {text[:80]!r}")
    return [int(v) for v in values]


def _affine(directions: np.ndarray, origin: np.ndarray, signs: tuple[float, float, float]) -> np.ndarray:
    """4x4 voxel -> RAS affine from per-axis direction vectors scaled by spacing (columns) and an origin."""
    affine = np.eye(4)
    flip = np.diag(signs)
    affine[:3, : directions.shape[1]] = flip @ directions
    affine[:3, 3] = flip @ origin
    return affine


def _spatial(values: list[float], n: int, default: float) -> np.ndarray:
    """The first ``n`` (at most 3) of ``values`` as a 3-vector, ``default`` where they run short."""
    out = np.full(3, default, dtype=np.float64)
    used = values[: min(n, 3, len(values))]
    out[: len(used)] = used
    return out


# ---------------------------------------------------------------- MetaImage


def _metaimage_header(path: Path, text: str, data_start: int) -> RawVolumeHeader:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if "ndims" not in fields or "dimsize" not in fields or "elementtype" not in fields:
        raise RejectedInput(NOT_VOLUME, "MetaImage header without NDims, DimSize or ElementType")
    ndims = _sizes(fields["ndims"], "NDims")[0]
    shape = _sizes(fields["dimsize"], "DimSize")
    if len(shape) != ndims or not 2 <= ndims <= 4:
        raise RejectedInput(BAD_SHAPE, f"MetaImage NDims {ndims}, DimSize {fields['dimsize'][:80]!r}")
    channels = _sizes(fields.get("elementnumberofchannels", "1"), "ElementNumberOfChannels")[0]
    if channels != 1:
        raise RejectedInput(BAD_SHAPE, f"{channels} channels per voxel (vector or colour volume)")
    code = _METAIMAGE_TYPES.get(fields["elementtype"].upper())
    if code is None:
        raise RejectedInput(UNSUPPORTED, f"ElementType {fields['elementtype'][:40]!r}")
    msb = (
        fields.get("binarydatabyteordermsb") or fields.get("elementbyteordermsb") or "false"
    ).lower() == "true"
    dtype = np.dtype(code).newbyteorder(">" if msb else "<")
    spatial = min(ndims, 3)
    spacing = _numbers(fields.get("elementspacing") or fields.get("elementsize") or "", "ElementSpacing")
    spacing = spacing if len(spacing) >= spatial else [1.0] * ndims
    origin = _numbers(fields.get("offset") or fields.get("position") or fields.get("origin") or "", "Offset")
    matrix_text = fields.get("transformmatrix") or fields.get("rotation") or fields.get("orientation") or ""
    matrix = _numbers(matrix_text, "TransformMatrix")
    directions = np.zeros((3, spatial))
    for axis in range(spatial):
        # Row ``axis`` of TransformMatrix is that image axis's direction (ITK's MetaImageIO reads it so).
        row = matrix[axis * ndims : axis * ndims + spatial] if len(matrix) == ndims * ndims else None
        vector = _spatial(row, spatial, 0.0) if row else np.eye(3)[axis]
        directions[:, axis] = vector * spacing[axis]
    affine = _affine(directions, _spatial(origin, spatial, 0.0), _LPS_TO_RAS)
    data_name = fields.get("elementdatafile", "")
    compressed = (fields.get("compresseddata") or "false").lower() == "true"
    if data_name.upper() == "LOCAL":
        data_path, offset = path, data_start
    else:
        data_path = _data_file(path, data_name)
        offset = int(_numbers(fields.get("headersize", "0"), "HeaderSize")[0])
        if offset < -1:
            raise RejectedInput(MALFORMED, f"HeaderSize {offset}")
        if offset == -1 and compressed:
            raise RejectedInput(UNSUPPORTED, "HeaderSize -1 with compressed data")
    return RawVolumeHeader(
        "metaimage", tuple(shape), dtype, affine, data_path, offset, "zlib" if compressed else "raw"
    )


# ---------------------------------------------------------------- NRRD


def _nrrd_header(path: Path, text: str, data_start: int) -> RawVolumeHeader:
    lines = text.splitlines()
    if not lines or not re.fullmatch(r"NRRD000[1-5]", lines[0].strip()):
        raise RejectedInput(NOT_VOLUME, "no NRRD magic line (NRRD0001-NRRD0005)")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("#") or ":=" in line.partition(": ")[0]:
            continue  # comments and key/value pairs
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip().lower()] = value.strip()
    for required in ("type", "dimension", "sizes", "encoding"):
        if required not in fields:
            raise RejectedInput(NOT_VOLUME, f"NRRD header without {required!r}")
    code = _NRRD_TYPES.get(fields["type"].lower())
    if code is None:
        raise RejectedInput(UNSUPPORTED, f"NRRD type {fields['type'][:40]!r}")
    dimension = _sizes(fields["dimension"], "dimension")[0]
    sizes = _sizes(fields["sizes"], "sizes")
    if len(sizes) != dimension:
        raise RejectedInput(BAD_SHAPE, f"NRRD dimension {dimension}, sizes {fields['sizes'][:80]!r}")
    endian = fields.get("endian", "little").lower()
    dtype = np.dtype(code).newbyteorder(">" if endian == "big" else "<")
    encoding = {"raw": "raw", "gzip": "zlib", "gz": "zlib", "bzip2": "bzip2", "bz2": "bzip2"}.get(
        fields["encoding"].lower(), "ascii" if fields["encoding"].lower() in ("txt", "text", "ascii") else ""
    )
    if not encoding:
        raise RejectedInput(UNSUPPORTED, f"NRRD encoding {fields['encoding'][:40]!r}")
    spatial_axes, directions = _nrrd_axes(fields, sizes)
    if len(spatial_axes) != dimension:
        raise RejectedInput(
            BAD_SHAPE, f"NRRD axes that are not spatial, sizes {sizes} (vector or colour data)"
        )
    if not 2 <= dimension <= 4:
        raise RejectedInput(BAD_SHAPE, f"NRRD dimension {dimension}")
    space = fields.get("space", "").lower()
    signs = _NRRD_SPACES.get(space, (1.0, 1.0, 1.0))
    origin = _numbers(fields.get("space origin", ""), "space origin")
    affine = _affine(directions, _spatial(origin, 3, 0.0), signs)
    name = fields.get("data file") or fields.get("datafile")
    if name:
        data_path = _data_file(path, name)
        offset = int(_numbers(fields.get("byte skip", "0"), "byte skip")[0])
        skip_lines = int(_numbers(fields.get("line skip", "0"), "line skip")[0])
        if skip_lines:
            raise RejectedInput(UNSUPPORTED, f"line skip {skip_lines}")
    elif path.suffix.lower() == ".nhdr":
        raise RejectedInput(MALFORMED, "detached NRRD header (.nhdr) without a data file")
    else:
        data_path, offset = path, data_start
    if offset < -1 or (offset == -1 and encoding != "raw"):
        raise RejectedInput(UNSUPPORTED, f"byte skip {offset} with {encoding} data")
    return RawVolumeHeader("nrrd", tuple(sizes), dtype, affine, data_path, offset, encoding)


def _nrrd_axes(fields: dict[str, str], sizes: list[int]) -> tuple[list[int], np.ndarray]:
    """Indices of the spatial axes and their direction vectors (columns, spacing included)."""
    n = len(sizes)
    if "space directions" in fields:
        vectors = re.findall(r"\(([^)]*)\)|(none)", fields["space directions"])
        if len(vectors) != n:
            raise RejectedInput(MALFORMED, f"space directions {fields['space directions'][:80]!r}")
        spatial = [axis for axis, (vector, none) in enumerate(vectors) if not none]
        directions = np.zeros((3, min(len(spatial), 3)))
        for column, axis in enumerate(spatial[:3]):
            directions[:, column] = _spatial(_numbers(vectors[axis][0], "space directions"), 3, 0.0)
        # A 4-D time series: the fourth (non-spatial, "none") axis is accepted when it comes last.
        if len(spatial) == 3 and n == 4 and spatial == [0, 1, 2]:
            return [0, 1, 2, 3], directions
        return spatial, directions
    try:  # "nan" marks a non-spatial axis here
        spacings = [float(v) for v in fields.get("spacings", "").split()]
    except ValueError:
        raise RejectedInput(MALFORMED, f"spacings {fields['spacings'][:80]!r}") from None
    spacings = (
        [s if math.isfinite(s) and s > 0 else 1.0 for s in spacings] if len(spacings) == n else [1.0] * n
    )
    directions = np.zeros((3, min(n, 3)))
    for axis in range(min(n, 3)):
        directions[axis, axis] = spacings[axis]
    return list(range(n)), directions
