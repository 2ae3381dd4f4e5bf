"""The per-file decode job (runs in worker processes) and its resumable on-disk cache.

One job = one input file and the slice indices sampling chose from it. The worker decodes them, hashes the
decoded pixels (before any intensity step, so the same image stored by two repositories in two lossless
encodings gets the same hash), turns them into stored uint8 slices with the shared preprocessing
(:func:`modality.intensity.pipeline.slice_to_uint8`, the same function raw-file prediction uses), encodes
the shard member and counts a uint8 histogram for the exact dataset statistics.

Each result is cached under ``out_dir/work/`` as ``<key>.work`` (JSON result + encoded members, see
:class:`WorkCache`), written to a temporary name and renamed: an entry means the job finished. A killed
run therefore resumes with every finished file reused, and no pickle is ever involved. The key hashes the
job and the preprocessing, so a config change never reuses stale work.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from modality.data.png_codec import encode_png_up
from modality.labels import ClassMap
from modality.records import DecodedSlice, InputItem, RejectedInput, SliceHeader
from modality.shards.stats import uint8_histogram

CACHE_VERSION = 3  # 3: one .work file per entry, run-length deflated PNG members, single-pass entries
IMAGE_FORMATS = ("png", "npy")

#: ``decode(indices, colour) -> slices`` of one file (see :func:`modality.readers.read_headers_keeping_file`).
SliceDecoder = Callable[[Sequence[int] | None, str], list[DecodedSlice]]


@dataclass(frozen=True)
class DecodeJob:
    """Decode ``indices`` of ``item`` and store them as shard members."""

    item: InputItem
    indices: tuple[int, ...]
    modality_code: str | None
    preprocess: Mapping[str, Any]
    image_format: str = "png"
    png_compress_level: int = 1


def file_fingerprint(path: str) -> list[int] | None:
    """Size and mtime of an input file, so an edited or replaced file never reuses stale cached work."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def job_key(job: DecodeJob) -> str:
    """Hash of everything that determines the job's output, including the input file's size and mtime."""
    fingerprint = file_fingerprint(job.item.path)
    spec = {
        "v": CACHE_VERSION,
        "path": job.item.path,
        "dataset": job.item.dataset,
        "kind": job.item.kind,
        "slice_axis": job.item.slice_axis,
        "indices": list(job.indices),
        "modality": job.modality_code,
        "preprocess": job.preprocess,
        "format": job.image_format,
        "png": job.png_compress_level,
        "file": fingerprint,
    }
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def pixel_sha1(pixels: np.ndarray) -> str:
    """Hash of decoded pixel values and shape (float32, C order): identical images, whatever the encoding."""
    data = np.ascontiguousarray(pixels, dtype=np.float32)
    digest = hashlib.sha1(repr(data.shape).encode())
    digest.update(memoryview(data).cast("B"))  # the buffer itself: no 1 MB bytes copy per slice
    return digest.hexdigest()


def encode_member(image: np.ndarray, image_format: str, png_compress_level: int = 1) -> bytes:
    """A stored uint8 slice as member bytes: 8-bit greyscale PNG (Up-filtered rows, run-length deflate),
    or ``.npy`` (no pickle)."""
    if image_format == "png":
        return encode_png_up(image, png_compress_level, rle=True)
    buffer = io.BytesIO()
    if image_format == "npy":
        np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    """JSON-safe copy of reader metadata (tuples, numpy scalars and arrays become plain types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _reject(reason: str, detail: str) -> dict[str, str]:
    return {"reason": reason, "detail": detail}


def _finite_range(pixels: np.ndarray) -> tuple[float | None, float | None]:
    """Min and max of the finite pixels; (None, None) when there are none.

    Plain min/max first (no copy): NaN or inf are rare, and masking a 1 MB slice costs a millisecond.
    """
    if pixels.size == 0:
        return None, None
    low, high = float(pixels.min()), float(pixels.max())
    if np.isfinite(low) and np.isfinite(high):
        return low, high
    finite = pixels[np.isfinite(pixels)]
    if finite.size == 0:
        return None, None
    return float(finite.min()), float(finite.max())


def _slice_result(
    decoded: DecodedSlice, job: DecodeJob, payload: bytearray
) -> dict[str, Any]:  # pragma: no branch - small
    from modality.intensity.pipeline import slice_to_uint8

    pixels = np.asarray(decoded.pixels)
    entry: dict[str, Any] = {"index": int(decoded.index), "meta": _plain(decoded.meta)}
    low, high = _finite_range(pixels)
    if low is None:
        entry["reject"] = _reject("empty slice", f"shape {pixels.shape}, no finite pixels")
        return entry
    if low == high:
        entry["reject"] = _reject("blank slice", f"every pixel is {low:g}")
        return entry
    entry["pixel_sha1"] = pixel_sha1(pixels)
    image = slice_to_uint8(decoded, job.modality_code, dict(job.preprocess))
    member = encode_member(image, job.image_format, job.png_compress_level)
    entry["offset"] = len(payload)
    entry["length"] = len(member)
    entry["histogram"] = uint8_histogram(image).tolist()
    payload.extend(member)
    return entry


def run_job(job: DecodeJob, decode: SliceDecoder | None = None) -> tuple[dict[str, Any], bytes]:
    """Decode one file's chosen slices; every failure becomes a recorded rejection, never an exception.

    ``decode(indices, colour)`` reads the slices (default: :func:`modality.readers.read_slices` on the
    job's file; the single pass passes the decoder of the file it already parsed for the headers).
    Unexpected exceptions are caught too (with their type in the reason): one odd file from one scanner
    must not stop a run over a million files, and ``rejects.csv`` makes it visible.
    """
    from modality.readers import read_slices

    if decode is None:

        def decode(indices: Sequence[int] | None, colour: str) -> list[DecodedSlice]:
            return read_slices(job.item, indices, colour=colour)

    payload = bytearray()
    result: dict[str, Any] = {"v": CACHE_VERSION, "path": job.item.path, "reject": None, "slices": []}
    try:
        colour = str(job.preprocess.get("colour", "grey"))
        decoded_slices = decode(list(job.indices), colour)
        for decoded in decoded_slices:
            try:
                result["slices"].append(_slice_result(decoded, job, payload))
            except RejectedInput as exc:
                result["slices"].append(
                    {"index": int(decoded.index), "reject": _reject(exc.reason, exc.detail)}
                )
        returned = {s["index"] for s in result["slices"]}
        for index in job.indices:
            if index not in returned:
                result["slices"].append(
                    {"index": index, "reject": _reject("slice not returned by reader", f"index {index}")}
                )
    except RejectedInput as exc:
        result = {**result, "reject": _reject(exc.reason, exc.detail), "slices": []}
        payload = bytearray()
    except Exception as exc:
        result = {**result, "reject": _reject(f"unexpected error: {type(exc).__name__}", str(exc)[:500])}
        result["slices"] = []
        payload = bytearray()
    result["slices"].sort(key=lambda s: s["index"])
    return result, bytes(payload)


#: First bytes of a work-cache entry (format version 1): magic, then the JSON and payload lengths.
ENTRY_MAGIC = b"MODWORK\x01"
_ENTRY_HEAD = struct.Struct(">8sQQ")
ENTRY_SUFFIX = ".work"
_LEGACY_SUFFIXES = (".json", ".npy")  # the two-file entries of cache versions <= 2


class WorkCache:
    """``out_dir/work``: finished decode jobs, keyed by :func:`job_key` / :func:`first_pass_key`.

    One file per job, ``<key>.work``: a fixed header, the result as JSON, then the encoded members
    (uint8 bytes, concatenated; never pickle). Written to a temporary name and renamed, so an entry
    exists only once complete. One file instead of the ``.json`` + ``.npy`` pair of version 2: creating
    a file is the costly part of storing a ~20 KB entry (1-2 ms under /tmp on the development machine).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{ENTRY_SUFFIX}"

    def load(self, key: str) -> dict[str, Any] | None:
        """The cached result, or None when absent, unreadable or not a complete entry (then it is redone)."""
        try:
            with self.path(key).open("rb") as handle:
                magic, json_length, payload_length = _ENTRY_HEAD.unpack(handle.read(_ENTRY_HEAD.size))
                if magic != ENTRY_MAGIC:
                    return None
                size = os.fstat(handle.fileno()).st_size
                if size != _ENTRY_HEAD.size + json_length + payload_length:
                    return None
                return json.loads(handle.read(json_length).decode("utf-8"))
        except (OSError, ValueError, struct.error):
            return None

    def store(self, key: str, result: Mapping[str, Any], payload: bytes) -> None:
        encoded = json.dumps(result, sort_keys=True).encode("utf-8")
        final = self.path(key)
        tmp = final.with_name(f"{key}.{os.getpid()}.tmp{ENTRY_SUFFIX}")
        with tmp.open("wb") as handle:
            handle.write(_ENTRY_HEAD.pack(ENTRY_MAGIC, len(encoded), len(payload)))
            handle.write(encoded)
            handle.write(payload)
        os.replace(tmp, final)

    def member(self, key: str, offset: int, length: int) -> bytes:
        view, start = _open_entry(str(self.path(key)))
        return bytes(view[start + offset : start + offset + length])

    def prune(self, keep: set[str]) -> int:
        """Delete entries not in ``keep`` (left by earlier configs or cache versions), so ``work/`` does not
        grow without end."""
        removed = 0
        for path in self.directory.iterdir():
            if path.suffix in (ENTRY_SUFFIX, *_LEGACY_SUFFIXES) and path.stem not in keep:
                path.unlink(missing_ok=True)
                removed += path.suffix != ".npy"
        return removed

    def clean_temporaries(self) -> None:
        """Remove temp files a killed worker left behind."""
        for path in self.directory.glob("*.tmp.*"):
            path.unlink(missing_ok=True)


@lru_cache(maxsize=64)
def _open_entry(path: str) -> tuple[np.ndarray, int]:
    """A read-only map of an entry and where its payload starts (the writer reads members one by one)."""
    with open(path, "rb") as handle:
        _, json_length, _ = _ENTRY_HEAD.unpack(handle.read(_ENTRY_HEAD.size))
    return np.memmap(path, dtype=np.uint8, mode="r"), _ENTRY_HEAD.size + json_length


def run_and_cache(args: tuple[DecodeJob, str, str]) -> tuple[str, dict[str, Any]]:
    """Pool entry point: run a job and store it, returning (key, result) for the parent."""
    job, key, cache_dir = args
    result, payload = run_job(job)
    WorkCache(cache_dir).store(key, result, payload)
    return key, result


# ---------------------------------------------------------------- the single pass (headers + decode)

#: Files with at most this many slices are decoded in the pass that reads their headers (when their dataset
#: is small enough that no cap can make that wasteful); longer files are capped first, then decoded.
SINGLE_PASS_MAX_SLICES = 1

_HEADER_FIELDS = ("index", "n_slices", "modality", "body_part_raw", "patient_id", "study_uid", "series_uid")


@dataclass(frozen=True)
class FirstPassJob:
    """Read one file's headers and, if ``decode`` is set and it holds one slice of a mapped class, decode it.

    ``class_map`` is here so a file whose code the map excludes (US, OT...) is not decoded for nothing.
    """

    item: InputItem
    decode: bool
    class_map: ClassMap
    preprocess: Mapping[str, Any]
    image_format: str = "png"
    png_compress_level: int = 1


def first_pass_key(job: FirstPassJob) -> str:
    """Cache key of a single-pass entry: it cannot use the header's modality (unknown before reading), so it
    hashes the whole item, the class map and the output settings, plus the file's size and mtime."""
    fingerprint = file_fingerprint(job.item.path)
    spec = {
        "v": CACHE_VERSION,
        "pass": "single",
        "item": asdict(job.item),
        "class_map": job.class_map.to_dict(),
        "preprocess": job.preprocess,
        "format": job.image_format,
        "png": job.png_compress_level,
        "file": fingerprint,
    }
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def header_to_json(header: SliceHeader) -> dict[str, Any]:
    return {name: getattr(header, name) for name in _HEADER_FIELDS}


def header_from_json(item: InputItem, fields: Mapping[str, Any]) -> SliceHeader:
    return SliceHeader(item=item, **{name: fields[name] for name in _HEADER_FIELDS})


def cached_headers(item: InputItem, result: Mapping[str, Any]) -> list[SliceHeader] | None:
    """The headers a single-pass cache entry recorded, or None for an entry without them."""
    fields = result.get("headers")
    if not isinstance(fields, list) or not fields:
        return None
    try:
        return [header_from_json(item, f) for f in fields]
    except (KeyError, TypeError):
        return None


def decode_in_first_pass(job: FirstPassJob, headers: Sequence[SliceHeader]) -> bool:
    """Whether the single pass decodes this file now (else it is capped first and decoded afterwards)."""
    from modality.labels import resolve_class

    if not job.decode or not headers or len(headers) > SINGLE_PASS_MAX_SLICES:
        return False
    return all(resolve_class(h.modality, h.item.label, job.class_map) is not None for h in headers)


def run_first_pass_decode(
    job: FirstPassJob, headers: Sequence[SliceHeader], decode: SliceDecoder, key: str, cache_dir: str
) -> dict[str, Any]:
    """Decode a file whose headers were just read, from the same parse, and cache it with its headers."""
    decode_job = DecodeJob(
        item=job.item,
        indices=tuple(sorted(h.index for h in headers)),
        modality_code=headers[0].modality or None,
        preprocess=job.preprocess,
        image_format=job.image_format,
        png_compress_level=job.png_compress_level,
    )
    result, payload = run_job(decode_job, decode)
    result["headers"] = [header_to_json(h) for h in headers]
    WorkCache(cache_dir).store(key, result, payload)
    return result


def job_slices(result: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    return result.get("slices", [])
