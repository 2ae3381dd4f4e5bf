"""8-bit greyscale PNG for shard members, written so that reading it back costs little CPU.

PNG decoding dominates the PNG loader path. Measured here on 224x224 slices of the real corpus, a PNG
written by PIL (adaptive per-row filters, zlib level 6, 20.6 KB) decodes in 0.43 ms with PIL, 0.37 ms
with OpenCV or libpng; inflating the pixel data alone takes 0.15 ms. The rest is undoing the per-row
filters, which for Paeth and Average rows is a byte-by-byte dependency chain.

So shards can be written with the "Up" filter on every row (each row stored as its difference from the
row above; 22.5 KB, +9%): any PNG decoder reads them faster (PIL 0.29 ms), and this module's reader
undoes Up for the whole image in one numpy ``cumsum`` over rows after a single ``zlib.decompress``,
about 0.2 ms. Every other PNG (other filters, 16-bit, colour, interlaced) goes through PIL unchanged, so
the reader accepts any valid PNG and the fast path is only an optimisation.

Deflate goes through libdeflate (``deflate``) and inflate through ISA-L (``isal``, Intel's igzip), where
each pays. libdeflate's level 1 is faster than zlib's run-length strategy (0.26 vs 0.34 ms per slice,
about the same size), which matters because prepare encodes every slice; ISA-L's inflate is 2x faster than
zlib's (0.10 vs 0.20 ms), which matters because the loader decodes every slice every epoch. ISA-L's deflate
is faster still (0.12 ms) but not byte-deterministic: one prepare run of the real corpus out of about
fifteen wrote 5 of its 1,275 members as different (valid, same-length) streams of identical pixels, from
inside a worker, which reproducible shards cannot allow, so it is not offered. The streams are standard
zlib streams. Measured against PIL side by side: benchmarks/shard_io.py (benchmarks/README.md).
"""

from __future__ import annotations

import io
import struct
import zlib

import deflate
import numpy as np
from isal import isal_zlib
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2
_CHUNK_HEAD = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")
_GREY = 0  # IHDR colour type


class PngDecodeError(ValueError):
    """Bytes that are not a PNG this project can turn into an 8-bit grey slice."""


def _chunk(kind: bytes, payload: bytes | bytearray) -> tuple[bytes, bytes | bytearray, bytes]:
    """A chunk as (length and type, data, CRC): joined once with the rest of the file, not copied here."""
    crc = zlib.crc32(payload, zlib.crc32(kind))
    return _CHUNK_HEAD.pack(len(payload), kind), payload, struct.pack(">I", crc)


def encode_png_up(pixels: np.ndarray, compress_level: int = 6, *, engine: str = "zlib") -> bytes:
    """A valid 8-bit greyscale PNG of a uint8 HxW slice, every row Up-filtered (fast to decode).

    The one PNG encoder of the project: prepare writes shard members with it (``engine="libdeflate"``)
    and the loader's fast path reads what it writes. Engines: ``zlib`` or ``libdeflate`` at
    ``compress_level``. Measured on 400 real 224x224 slices (ms per slice, KB): zlib level 1 0.50, 24.9;
    libdeflate level 1 0.26, 23.9 (zlib's run-length strategy 0.34, 23.7; ISA-L level 1 0.12, 24.1 but
    not byte-deterministic, see the module docstring). Level 0 is stored (no compression) with either
    engine. Both write the same bytes for given pixels, settings and library version (no timestamps or
    text chunks).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or min(pixels.shape) == 0:
        raise ValueError(f"expected a non-empty uint8 HxW array, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape
    filtered = np.empty((height, width + 1), dtype=np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = pixels[0]  # the row above the first is all zeros
    np.subtract(pixels[1:], pixels[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps mod 256, as PNG wants
    header = _IHDR.pack(width, height, 8, _GREY, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            *_chunk(b"IHDR", header),
            *_chunk(b"IDAT", _deflate(filtered, compress_level, engine)),
            *_chunk(b"IEND", b""),
        )
    )


#: Deflate engines :func:`encode_png_up` knows.
PNG_ENGINES = ("zlib", "libdeflate")


def _deflate(data: np.ndarray, level: int, engine: str) -> bytes | bytearray:
    if engine not in PNG_ENGINES:
        raise ValueError(f"engine must be one of {PNG_ENGINES}, got {engine!r}")
    if engine == "zlib" or level == 0:
        return zlib.compress(data, level)
    return deflate.zlib_compress(data, level)  # a bytearray: the PNG's one join copies it


def _read_grey8_chunks(data: bytes) -> tuple[int, int, bytes] | None:
    """(width, height, concatenated IDAT) of a non-interlaced 8-bit grey PNG, or None for any other PNG.

    Raises :class:`PngDecodeError` for bytes that are not a well-formed PNG (bad signature, CRC, truncation).
    """
    if data[:8] != PNG_SIGNATURE:
        raise PngDecodeError("not a PNG (bad signature)")
    pos, end = 8, len(data)
    size: tuple[int, int] | None = None
    idat: list[bytes] = []
    while True:
        if pos + 12 > end:
            raise PngDecodeError("PNG truncated (no IEND chunk)")
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        payload_end = pos + 8 + length
        if payload_end + 4 > end:
            raise PngDecodeError(f"PNG truncated inside chunk {kind!r}")
        # Pixel data is guarded by zlib's own Adler-32 on inflate; checking its CRC too would cost 3%.
        if kind != b"IDAT":
            (crc,) = struct.unpack_from(">I", data, payload_end)
            if zlib.crc32(data[pos + 4 : payload_end]) != crc:
                raise PngDecodeError(f"PNG chunk {kind!r} fails its CRC")
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = _IHDR.unpack_from(data, pos + 8)
            if depth != 8 or colour != _GREY or interlace != 0:
                return None
            size = (width, height)
        elif kind == b"IDAT":
            idat.append(data[pos + 8 : payload_end])
        elif kind == b"IEND":
            break
        elif kind == b"PLTE" or kind == b"tRNS":
            return None
        pos = payload_end + 4
    if size is None or not idat:
        raise PngDecodeError("PNG without IHDR or IDAT")
    return size[0], size[1], b"".join(idat)


def decode_png_with_pil(data: bytes) -> np.ndarray:
    """Any PNG through PIL, converted to 8-bit grey: the general path, and the baseline the benchmarks print."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.mode != "L":
            if image.mode not in ("1", "P", "LA", "RGB", "RGBA", "PA"):
                raise PngDecodeError(f"PNG has mode {image.mode!r}; the shard format stores 8-bit grey")
            image = image.convert("L")
        return np.asarray(image)
    except PngDecodeError:
        raise
    except Exception as exn:  # PIL raises a zoo of exception types for corrupt data
        raise PngDecodeError(f"unreadable PNG: {exn}") from exn


def decode_png_grey(data: bytes) -> np.ndarray:
    """A uint8 HxW array from a PNG member (read-only when it came through the fast path).

    Up-filtered 8-bit grey PNGs (:func:`encode_png_up`) are decoded here with zlib + numpy; any other
    PNG by PIL.
    A colour or palette PNG becomes grey (luma), as the reference study's loader did; a 16-bit image
    raises :class:`PngDecodeError`, because squeezing it to 8 bits here would silently change the
    intensity scaling that prepare recorded in summary.json.
    """
    parsed = _read_grey8_chunks(data)
    if parsed is None:
        return decode_png_with_pil(data)
    width, height, compressed = parsed
    stride = width + 1
    # Adaptive-filter encoders (PIL, libpng) break the tie on the first row in favour of None, so an Up
    # first row marks encode_png_up's layout; anything else goes to PIL. Peeking at that byte through a
    # streaming inflater first would save foreign PNGs a second inflate, but costs every shard member.
    try:
        raw = isal_zlib.decompress(compressed)
    except (isal_zlib.error, zlib.error) as exn:
        raise PngDecodeError(f"PNG pixel data does not inflate: {exn}") from exn
    if raw[:1] != bytes((_FILTER_UP,)):
        return decode_png_with_pil(data)
    if len(raw) != height * stride:
        raise PngDecodeError(
            f"PNG pixel data holds {len(raw)} bytes, {width}x{height} needs {height * stride}"
        )
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride)
    if not (rows[:, 0] == _FILTER_UP).all():
        return decode_png_with_pil(data)
    # Up on every row: each pixel is the sum (mod 256) of the filtered bytes above it in its column.
    return np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8)
