"""Fast decoding of shard samples: PNG / npy members to uint8 HxW arrays, ``.cls`` to int, ``.json`` to dict.

Replaces ``webdataset``'s ``.decode("l")`` for our shard format (docs/design.md, "Shards") because:

* ``np.load`` on a raw member goes through a file object and re-parses the header every time; the npy
  members of a shard all share one header, so it is parsed once, cached, and each member becomes an
  ``np.frombuffer`` view at the header offset (no copy).
* PNG members go through :func:`modality.shards.png_codec.decode_png_grey`: a zlib + numpy fast path for
  the Up-filtered PNGs that :func:`~modality.shards.png_codec.encode_png_up` writes, PIL for any other PNG.
* webdataset's default handlers unpickle ``.pyd``/``.pickle`` members and ``torch.load`` ``.pth`` ones;
  shards are untrusted input, so members we do not know are passed through as bytes, never unpickled.

PNG decoders measured here on 224x224 slices of the real corpus (PIL-written PNGs, ms per image): PIL
0.43, torchvision/libpng 0.40, OpenCV 0.37, libspng 0.41. None is worth a dependency; the file layout
is what matters (see png_codec).
"""

from __future__ import annotations

import ast
import io
import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from modality.shards.png_codec import PngDecodeError, decode_png_grey

NPY_MAGIC = b"\x93NUMPY"

#: Image member extensions of our shard format, in the order a sample is searched for its image.
IMAGE_EXTENSIONS = ("png", "npy")
_CLASS_EXTENSIONS = frozenset(("cls", "cls2", "class", "index", "inx", "id"))
_UINT8_DESCRS = frozenset(("|u1", "<u1", ">u1", "=u1", "u1", "|B", "B", "uint8"))


class SampleDecodeError(ValueError):
    """A member that is not what our shard format says it is (wrong dtype, shape, or corrupt data)."""


@lru_cache(maxsize=64)
def _parse_npy_header(header: bytes) -> tuple[int, tuple[int, ...], bool]:
    """(data offset, shape, fortran_order) of an npy header, validated as a uint8 2-D array.

    Cached on the exact header bytes: every member of a shard written by prepare has the same header.
    """
    if not header.startswith(NPY_MAGIC) or len(header) < 10:
        raise SampleDecodeError("not an npy member (bad magic)")
    major = header[6]
    if major == 1:
        length_size = 2
    elif major in (2, 3):
        length_size = 4
    else:
        raise SampleDecodeError(f"unsupported npy format version {major}")
    start = 8 + length_size
    text = header[start:].decode("latin1" if major < 3 else "utf-8")
    try:
        fields = ast.literal_eval(text)  # a dict of literals; never pickle
    except (ValueError, SyntaxError) as exn:
        raise SampleDecodeError(f"unreadable npy header {text!r}") from exn
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise SampleDecodeError(f"npy header has unexpected fields: {text!r}")
    descr, fortran_order, shape = fields["descr"], fields["fortran_order"], fields["shape"]
    if descr not in _UINT8_DESCRS:
        raise SampleDecodeError(f"npy member has dtype {descr!r}, the shard format stores uint8")
    if (
        not isinstance(shape, tuple)
        or len(shape) != 2
        or not all(isinstance(n, int) and n > 0 for n in shape)
    ):
        raise SampleDecodeError(f"npy member has shape {shape!r}, the shard format stores 2-D HxW slices")
    return len(header), shape, bool(fortran_order)


def _npy_header_bytes(data: bytes) -> bytes:
    if len(data) < 10 or data[:6] != NPY_MAGIC:
        raise SampleDecodeError("not an npy member (bad magic)")
    if data[6] == 1:
        header_length = 10 + int.from_bytes(data[8:10], "little")
    else:
        header_length = 12 + int.from_bytes(data[8:12], "little")
    if header_length > len(data):
        raise SampleDecodeError("npy member truncated inside its header")
    return bytes(data[:header_length])


def decode_npy_uint8(data: bytes) -> np.ndarray:
    """A uint8 HxW array from an npy member, as a read-only view on ``data`` (no copy).

    Raises :class:`SampleDecodeError` unless the member is a 2-D uint8 array whose byte count matches.
    """
    offset, shape, fortran_order = _parse_npy_header(_npy_header_bytes(data))
    count = shape[0] * shape[1]
    if len(data) - offset != count:
        raise SampleDecodeError(
            f"npy member holds {len(data) - offset} bytes of pixels, shape {shape} needs {count}"
        )
    pixels = np.frombuffer(data, dtype=np.uint8, count=count, offset=offset)
    if fortran_order:
        return pixels.reshape(shape[::-1]).T
    return pixels.reshape(shape)


def encode_npy_uint8(pixels: np.ndarray) -> bytes:
    """The npy bytes of a uint8 HxW slice, as ``np.save`` writes them (used by tests and benchmarks)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"expected a uint8 HxW array, got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
    return buffer.getvalue()


def decode_class(data: bytes) -> int:
    """The class index of a ``.cls`` member (ASCII decimal)."""
    try:
        return int(data)
    except ValueError as exn:
        raise SampleDecodeError(f"class member is not a decimal integer: {bytes(data[:32])!r}") from exn


def decode_json(data: bytes) -> Any:
    """The metadata of a ``.json`` member (UTF-8)."""
    try:
        return json.loads(data)
    except ValueError as exn:
        raise SampleDecodeError(f"unreadable JSON member: {exn}") from exn


_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "png": decode_png_grey,
    "npy": decode_npy_uint8,
    "json": decode_json,
    "txt": lambda data: bytes(data).decode("utf-8"),
    **{ext: decode_class for ext in _CLASS_EXTENSIONS},
}


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode every member of a sample we know; a drop-in for ``.decode("l")`` on our shards.

    Keys stay as they are (``png`` -> uint8 HxW array, ``npy`` -> uint8 HxW array, ``cls`` -> int,
    ``json`` -> dict), so ``.to_tuple("png;npy", "cls")`` works unchanged. ``__key__``-style entries and
    unknown members pass through untouched. Errors name the sample key.
    """
    decoded: dict[str, Any] = {}
    for ext, value in sample.items():
        decoder = None if ext.startswith("__") else _DECODERS.get(ext)
        if decoder is None:
            decoded[ext] = value
            continue
        try:
            decoded[ext] = decoder(value)
        except (SampleDecodeError, PngDecodeError) as exn:
            raise SampleDecodeError(f"sample {sample.get('__key__')!r} member {ext!r}: {exn}") from exn
    return decoded


def sample_image(sample: dict[str, Any]) -> np.ndarray:
    """The image of a decoded sample, whichever member format prepare wrote (png or npy)."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise SampleDecodeError(
        f"sample {sample.get('__key__')!r} has no image member ({', '.join(IMAGE_EXTENSIONS)})"
    )
