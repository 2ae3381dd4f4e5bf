"""Shard member decoding round-trips, and rejects members that are not what the shard format promises."""

from __future__ import annotations

import io
import pickle
import zlib

import numpy as np
import pytest
from PIL import Image

from modality.shards.decode import (
    SampleDecodeError,
    decode_class,
    decode_npy_uint8,
    decode_sample,
    encode_npy_uint8,
    sample_image,
)
from modality.shards.png_codec import PngDecodeError, decode_png_grey, decode_png_with_pil, encode_png_up


def slice_like(height: int = 224, width: int = 224, seed: int = 0) -> np.ndarray:
    """A smooth anatomical-looking slice with noise, so every PNG filter type and wrap-around occurs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    body = 200.0 * np.exp(-(((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 3)) ** 2))
    return np.clip(body + rng.normal(0, 20, (height, width)), 0, 255).astype(np.uint8)


def pil_png(pixels: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("engine", ["zlib", "libdeflate"])
@pytest.mark.parametrize("shape", [(224, 224), (1, 5), (300, 17)])
def test_up_filtered_png_round_trips_and_is_a_valid_png(shape: tuple[int, int], engine: str) -> None:
    pixels = slice_like(*shape)
    data = encode_png_up(pixels, 1, engine=engine)
    decoded = decode_png_grey(data)
    assert decoded.dtype == np.uint8 and decoded.shape == shape
    np.testing.assert_array_equal(decoded, pixels)
    # Any PNG reader must see the same image: the encoder writes standard PNG, not a private format.
    np.testing.assert_array_equal(decode_png_with_pil(data), pixels)
    assert encode_png_up(pixels, 1, engine=engine) == data  # deterministic bytes, as reproducible shards need


@pytest.mark.parametrize("engine", ["zlib", "libdeflate"])
def test_up_filtered_png_is_the_chunks_of_the_png_spec_byte_for_byte(engine: str) -> None:
    """Signature, IHDR, one IDAT of the Up-filtered rows deflated by the engine, IEND, each chunk's CRC over
    its type and data: the file prepare's shard members are (assembled in one join, pinned here)."""
    import struct
    import zlib

    import deflate

    pixels = slice_like(37, 53)
    filtered = np.concatenate(
        [np.full((37, 1), 2, np.uint8), np.vstack([pixels[:1], pixels[1:] - pixels[:-1]])], axis=1
    )
    stream = (
        zlib.compress(filtered.tobytes(), 1)
        if engine == "zlib"
        else bytes(deflate.zlib_compress(filtered, 1))
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 53, 37, 8, 0, 0, 0, 0)
    expected = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
    data = encode_png_up(pixels, 1, engine=engine)
    assert type(data) is bytes and data == expected


def test_unknown_png_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="engine"):
        encode_png_up(slice_like(), 1, engine="brotli")


def test_png_whose_pixel_stream_is_cut_short_is_rejected() -> None:
    """A well-formed chunk whose zlib stream stops early (a writer killed mid-stream, then re-chunked)."""
    good = encode_png_up(slice_like(), 1, engine="libdeflate")
    start = good.index(b"IDAT") + 4
    length = int.from_bytes(good[start - 8 : start - 4], "big")
    idat = good[start : start + length][: length // 2]
    patched = good[: start - 8] + len(idat).to_bytes(4, "big") + b"IDAT" + idat
    patched += zlib.crc32(b"IDAT" + idat).to_bytes(4, "big") + good[start + length + 4 :]
    with pytest.raises(PngDecodeError, match="inflate"):
        decode_png_grey(patched)


def test_png_written_by_pil_decodes_through_the_general_path() -> None:
    pixels = slice_like()
    np.testing.assert_array_equal(decode_png_grey(pil_png(pixels)), pixels)
    rgb = decode_png_grey(pil_png(pixels, "RGB"))  # colour becomes grey (luma of equal channels)
    np.testing.assert_array_equal(rgb, pixels)


def test_png_that_is_not_8bit_grey_or_is_damaged_is_rejected() -> None:
    deep = io.BytesIO()
    Image.fromarray(slice_like().astype(np.uint16) * 200).save(deep, format="PNG")
    with pytest.raises(PngDecodeError, match="mode"):
        decode_png_grey(deep.getvalue())
    data = bytearray(encode_png_up(slice_like()))
    with pytest.raises(PngDecodeError, match="truncated"):
        decode_png_grey(bytes(data[: len(data) // 2]))
    header_damaged = bytearray(data)
    header_damaged[20] ^= 0xFF  # inside IHDR (the image height)
    with pytest.raises(PngDecodeError, match="CRC"):
        decode_png_grey(bytes(header_damaged))
    for offset in (60, len(data) - 30):  # inside the compressed pixels: zlib's Adler-32 or stream check
        pixels_damaged = bytearray(data)
        pixels_damaged[offset] ^= 0xFF
        with pytest.raises(PngDecodeError):
            decode_png_grey(bytes(pixels_damaged))
    with pytest.raises(PngDecodeError, match="signature"):
        decode_png_grey(b"GIF89a" + bytes(100))


def test_png_with_wrong_pixel_count_is_rejected() -> None:
    pixels = slice_like(8, 8)
    good = encode_png_up(pixels)
    short = np.zeros((7, 9), dtype=np.uint8)  # 7 rows of filter byte + 8 pixels: one row missing
    short[:, 0] = 2
    idat = zlib.compress(short.tobytes())
    patched = good[: good.index(b"IDAT") - 4] + len(idat).to_bytes(4, "big") + b"IDAT" + idat
    patched += zlib.crc32(b"IDAT" + idat).to_bytes(4, "big") + good[good.index(b"IEND") - 4 :]
    with pytest.raises(PngDecodeError, match="needs"):
        decode_png_grey(patched)


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_round_trips_as_a_view(order: str) -> None:
    pixels = np.asfortranarray(slice_like(20, 30)) if order == "F" else slice_like(20, 30)
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    decoded = decode_npy_uint8(buffer.getvalue())
    np.testing.assert_array_equal(decoded, pixels)
    assert decoded.shape == (20, 30)
    assert decode_npy_uint8(encode_npy_uint8(pixels)).tolist() == pixels.tolist()


def test_npy_that_is_not_a_2d_uint8_slice_is_rejected_without_unpickling() -> None:
    def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=allow_pickle)
        return buffer.getvalue()

    with pytest.raises(SampleDecodeError, match="dtype"):
        decode_npy_uint8(npy(np.zeros((4, 4), dtype=np.uint16)))
    with pytest.raises(SampleDecodeError, match="shape"):
        decode_npy_uint8(npy(np.zeros((2, 4, 4), dtype=np.uint8)))
    with pytest.raises(SampleDecodeError, match="dtype"):
        decode_npy_uint8(npy(np.array([{"a": 1}], dtype=object), allow_pickle=True))
    with pytest.raises(SampleDecodeError, match="bytes"):
        decode_npy_uint8(npy(np.zeros((4, 4), dtype=np.uint8))[:-3])
    with pytest.raises(SampleDecodeError, match="magic"):
        decode_npy_uint8(b"not an npy member at all")


def test_decode_sample_decodes_known_members_and_never_unpickles() -> None:
    pixels = slice_like(16, 16)
    payload = pickle.dumps({"would": "run code"})
    sample = {
        "__key__": "0123456789abcdef0123",
        "__url__": "train-000000.tar",
        "png": encode_png_up(pixels),
        "cls": b"3",
        "json": b'{"dataset": "site_a", "class": "XR"}',
        "pyd": payload,
    }
    decoded = decode_sample(sample)
    np.testing.assert_array_equal(sample_image(decoded), pixels)
    assert decoded["cls"] == 3
    assert decoded["json"] == {"dataset": "site_a", "class": "XR"}
    assert decoded["pyd"] == payload and decoded["__key__"] == sample["__key__"]
    with pytest.raises(SampleDecodeError, match="0123456789abcdef0123"):
        decode_sample({**sample, "cls": b"three"})
    with pytest.raises(SampleDecodeError, match="no image member"):
        sample_image({"__key__": "k", "cls": 1})
    assert decode_class(b" 2\n") == 2
