"""Image-file reader (PNG, JPEG, PGM and whatever else Pillow identifies): one greyscale slice per file.

These files carry no DICOM tags, so the header comes from the :class:`InputItem` (the source's stated
modality, body part and patient), with the file stem as patient id and the path as series id when the
source knows none. Pixel values stay in their stored units; ``value_range`` is what the bit depth can hold.

Colour: a 3-channel image whose channels are identical is grey stored as RGB (most radiograph JPEGs), so it
is read as grey under either policy. Real colour (and palette images with colour entries) becomes
BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` with ``colour="grey"`` and is rejected with ``colour="reject"``.
Alpha channels are dropped.

Size: the dimensions Pillow reads from the header (lazily, nothing decoded) times the bands must fit the
decode budget (:func:`modality.readers.decode_budget`) before ``load``; Pillow's own decompression-bomb
limit is set to the same budget and its warning is a rejection too, so a 13000 x 13000 PNG of a few
hundred KB is refused before it takes 3.6 GB.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from modality.readers import OVER_BUDGET, decode_budget
from modality.records import DecodedSlice, InputItem, RejectedInput, SliceHeader

NOT_IMAGE = "not an image file"
UNREADABLE = "unreadable file"
MALFORMED = "truncated or malformed file"
TOO_LARGE = OVER_BUDGET
COLOUR_REJECTED = "colour image rejected"
NO_SUCH_FRAME = "no such frame"

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: Modes whose samples are grey levels, with the range their bit depth can hold ('I' and 'F' are decided
#: from the data, see ``_grey_range``).
_GREY_RANGES: dict[str, tuple[float, float]] = {
    "1": (0.0, 1.0),
    "L": (0.0, 255.0),
    "LA": (0.0, 255.0),
    "I;16": (0.0, 65535.0),
    "I;16B": (0.0, 65535.0),
    "I;16L": (0.0, 65535.0),
    "I;16N": (0.0, 65535.0),
}

# Pillow raises these for bad bytes; caught only around Pillow calls.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _open(path: str) -> Image.Image:
    """Open lazily (header only) and check the decode budget; call inside ``_quiet_pillow``."""
    budget = decode_budget()
    # Pillow's own bomb check (pixels, not samples; its warning is an error in _quiet_pillow) agrees with
    # ours, and covers formats whose size Pillow only settles while loading.
    Image.MAX_IMAGE_PIXELS = budget.max_frame_pixels
    try:
        image = Image.open(path)
    except FileNotFoundError as error:
        raise RejectedInput(UNREADABLE, _describe(error)) from None
    except UnidentifiedImageError as error:
        raise RejectedInput(NOT_IMAGE, _describe(error)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RejectedInput(TOO_LARGE, _describe(error)) from None
    except _PIL_ERRORS as error:
        raise RejectedInput(MALFORMED, _describe(error)) from None
    try:
        width, height = image.size
        budget.check(height, width, samples=len(image.getbands()), what=f"{image.format or 'image'} header")
    except BaseException:
        image.close()
        raise
    return image


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Pillow's warnings off (odd-but-readable files), except its decompression-bomb warning: an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def read_image_headers(item: InputItem) -> list[SliceHeader]:
    """One header per file (Pillow reads only the file header here)."""
    with _quiet_pillow(), _open(item.path) as image:
        width, height = image.size
    if width <= 0 or height <= 0:
        raise RejectedInput(MALFORMED, f"image size {width}x{height}")
    return [
        SliceHeader(
            item=item,
            index=0,
            n_slices=1,
            modality=(item.modality or "").strip(),
            body_part_raw=item.body_part or "",
            patient_id=item.patient_id or Path(item.path).stem,
            study_uid=item.study_uid or "",
            series_uid=item.series_uid or item.path,
        )
    ]


def _grey_range(mode: str, pixels: np.ndarray) -> tuple[float, float]:
    """Range the stored bits can hold. 32-bit 'I' PNG/PGM data are 16-bit samples widened by Pillow."""
    if mode in _GREY_RANGES:
        return _GREY_RANGES[mode]
    if mode == "I":
        if pixels.size and pixels.min() >= 0 and pixels.max() <= 65535:
            return 0.0, 65535.0
        return float(np.iinfo(np.int32).min), float(np.iinfo(np.int32).max)
    finite = pixels[np.isfinite(pixels)]  # 'F': floats have no bit range
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def _is_grey_rgb(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def _decode(image: Image.Image, colour: str) -> tuple[np.ndarray, tuple[float, float], str, int]:
    """Pixels as float32 grey, their value range, the original mode and the bits per sample."""
    mode = image.mode
    if mode in _GREY_RANGES or mode in ("I", "F"):
        if mode == "LA":
            image = image.getchannel("L")
        raw = np.asarray(image)
        if raw.dtype == bool:
            raw = raw.astype(np.uint8)
        bits = 16 if mode.startswith("I;16") or (mode == "I" and _grey_range(mode, raw)[1] == 65535.0) else 8
        return raw.astype(np.float32), _grey_range(mode, raw), mode, bits if mode != "F" else 32
    rgb = np.asarray(image.convert("RGB"))  # RGB, RGBA, P, CMYK, YCbCr, ...
    if not _is_grey_rgb(rgb):
        if colour == "reject":
            raise RejectedInput(COLOUR_REJECTED, f"mode {mode} with distinct colour channels")
        return rgb.astype(np.float32) @ LUMA_WEIGHTS, (0.0, 255.0), mode, 8
    return rgb[..., 0].astype(np.float32), (0.0, 255.0), mode, 8


def read_image_slices(
    item: InputItem, indices: Sequence[int] | None = None, *, colour: str = "grey"
) -> list[DecodedSlice]:
    """Decode the file's single slice (index 0)."""
    wanted = [0] if indices is None else [int(i) for i in indices]
    if any(i != 0 for i in wanted):
        raise RejectedInput(NO_SUCH_FRAME, f"slices {wanted} requested, an image file has only slice 0")
    with _quiet_pillow(), _open(item.path) as image:
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image)  # phone/scanner JPEGs store rotation in EXIF
            pixels, value_range, mode, bits = _decode(oriented, colour)
        except RejectedInput:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise RejectedInput(TOO_LARGE, _describe(error)) from None
        except _PIL_ERRORS as error:
            raise RejectedInput(MALFORMED, _describe(error)) from None
        file_format = image.format or ""
    if pixels.ndim != 2 or pixels.size == 0:
        raise RejectedInput(MALFORMED, f"decoded to shape {pixels.shape}")
    meta = {
        "photometric": mode,
        "transfer_syntax": "",
        "format": file_format,
        "dtype": f"uint{bits}" if bits in (8, 16) else "float32",
        "original_shape": [int(pixels.shape[0]), int(pixels.shape[1])],
        "bits_stored": bits,
        "pixel_representation": 0,
        "rescale_slope": None,
        "rescale_intercept": None,
        "window_center": None,
        "window_width": None,
        "manufacturer": "",
    }
    decoded = DecodedSlice(pixels=np.ascontiguousarray(pixels), index=0, value_range=value_range, meta=meta)
    return [decoded for _ in wanted]
