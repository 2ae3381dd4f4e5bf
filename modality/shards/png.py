"""8-bit greyscale PNG members for shards, every row "Up"-filtered (difference from the row above).

Why not PIL: its adaptive per-row filters cost 3.4 ms per 224x224 slice at zlib level 1 against 1.5 ms
here (measured on the demo's slices), for +1% size; and Up-filtered rows are what the loader's fast PNG path
(:func:`modality.data.png_codec.decode_png_grey`) undoes with one numpy cumsum, twice as fast as PIL. The
bytes equal :func:`modality.data.png_codec.encode_png_up`'s (tested); this copy lives with the writer so that
prepare does not import the training stack (``modality.data`` pulls in torch and Lightning).
No timestamps or text chunks: the same pixels and level always give the same bytes.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2
_GREY = 0  # IHDR colour type


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", len(payload), kind) + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_grey_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """A valid PNG of a non-empty uint8 HxW slice; the row above the first counts as zeros (PNG spec)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or min(pixels.shape) == 0:
        raise ValueError(f"expected a non-empty uint8 HxW array, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = _FILTER_UP
    rows[0, 1:] = pixels[0]
    np.subtract(pixels[1:], pixels[:-1], out=rows[1:, 1:])  # wraps mod 256, as the Up filter is defined
    header = struct.pack(">IIBBBBB", width, height, 8, _GREY, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)),
            _chunk(b"IEND", b""),
        )
    )
