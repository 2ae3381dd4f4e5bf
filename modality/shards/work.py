"""The per-file decode job (runs in worker processes) and its resumable on-disk cache.

One job = one input file and the slice indices sampling chose from it. The worker decodes them, hashes the
decoded pixels (before any intensity step, so the same image stored by two repositories in two lossless
encodings gets the same hash), turns them into stored uint8 slices with the shared preprocessing
(:func:`modality.intensity.pipeline.slice_to_uint8`, the same function raw-file prediction uses), encodes
the shard member and counts a uint8 histogram for the exact dataset statistics.

Each result is cached under ``out_dir/work/`` (JSON result + encoded members, in batch files, see
:class:`WorkCache`), written to a temporary name and renamed: an entry means the job finished. A killed
run therefore resumes with every finished batch reused, and no pickle is ever involved. The key hashes the
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

from modality.intensity.pipeline import Preprocess
from modality.intensity.value_stats import value_features
from modality.labels import ClassMap
from modality.records import DecodedSlice, InputItem, RejectedInput, SliceHeader
from modality.shards.png_codec import encode_png_up
from modality.shards.stats import uint8_histogram_counts

CACHE_VERSION = 11  # 11: Siemens mosaics read as their tiles; 10: value_features with the stored peak; 9: libdeflate instead of ISA-L deflate for PNG members (byte-deterministic); 8: as 6 (7, zero fractions, was reverted); 6: value_features with matrix size; 5: value_features; 4: batch files, xxh3 pixel hashes, ISA-L deflated PNG members; 3: one file per entry
IMAGE_FORMATS = ("png", "npy")

#: ``decode(indices, colour) -> slices`` of one file (see :func:`modality.readers.read_headers_keeping_file`).
SliceDecoder = Callable[[Sequence[int] | None, str], list[DecodedSlice]]


@dataclass(frozen=True)
class DecodeJob:
    """Decode ``indices`` of ``item`` and store them as shard members."""

    item: InputItem
    indices: tuple[int, ...]
    modality_code: str | None
    preprocess: Preprocess
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
        "preprocess": job.preprocess.to_dict(),
        "format": job.image_format,
        "png": job.png_compress_level,
        "file": fingerprint,
    }
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def pixel_hash(pixels: np.ndarray) -> str:
    """Hash of decoded pixel values and shape (float32, C order): identical images, whatever the encoding.

    XXH3-128, not SHA-1: it runs at memory speed (0.01 ms for a 512x512 slice against 0.5 ms), and the
    guard needs identity of honest copies, not resistance to forged collisions (a forged pair could at
    worst make prepare refuse to write, naming both files).
    """
    import xxhash

    data = np.ascontiguousarray(pixels, dtype=np.float32)
    digest = xxhash.xxh3_128(repr(data.shape).encode())
    digest.update(memoryview(data).cast("B"))  # the buffer itself: no 1 MB bytes copy per slice
    return digest.hexdigest()


def encode_member(image: np.ndarray, image_format: str, png_compress_level: int = 1) -> bytes:
    """A stored uint8 slice as member bytes: 8-bit greyscale PNG (Up-filtered rows, libdeflate),
    or ``.npy`` (no pickle)."""
    if image_format == "png":
        return encode_png_up(image, png_compress_level, engine="libdeflate")
    buffer = io.BytesIO()
    if image_format == "npy":
        np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buffer.getvalue()


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def _plain(value: Any) -> Any:
    """JSON-safe copy of reader metadata (tuples, numpy scalars and arrays become plain types)."""
    if type(value) in _JSON_SCALARS:  # exact types: numpy's float64 subclasses float but goes to .item()
        return value
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
    entry["pixel_hash"] = pixel_hash(pixels)
    entry["value_features"] = value_features(pixels, decoded.meta.get("stored_peak"))
    image = slice_to_uint8(decoded, job.modality_code, job.preprocess)
    member = encode_member(image, job.image_format, job.png_compress_level)
    entry["offset"] = len(payload)
    entry["length"] = len(member)
    entry["histogram"] = uint8_histogram_counts(image)
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
        colour = job.preprocess.colour
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


#: First bytes of a work-cache file (format version 2: a batch of entries), then the index length.
BATCH_MAGIC = b"MODWORK\x02"
_BATCH_HEAD = struct.Struct(">8sQ")
ENTRY_SUFFIX = ".work"
_LEGACY_SUFFIXES = (".json", ".npy")  # the two-file entries of cache versions <= 2
_TEMP_MARK = ".tmp."
#: A batch file is closed once its members pass this many bytes (a batch of long multi-frame files).
BATCH_MAX_PAYLOAD = 64 << 20


@dataclass(frozen=True)
class EntryLocation:
    """Where one entry lives: its batch file, and the offsets (from the file start) of its JSON and payload."""

    file: str
    json_start: int
    json_length: int
    payload_start: int


class WorkCache:
    """``out_dir/work``: finished decode jobs, keyed by :func:`job_key` / :func:`first_pass_key`.

    Entries are written in batches, one file per batch of jobs a worker finished (``<name>.work``): a fixed
    header, a JSON index ``[[key, json_start, json_length, payload_start, payload_length], ...]``, then each
    entry's result as JSON followed by its encoded members (uint8 bytes; never pickle). The file is written
    to a temporary name and renamed, so an entry is visible only once its whole batch is complete, and a
    file whose size disagrees with its index is ignored (its jobs are redone). Batches, not one file per
    entry: creating and renaming a file costs 0.5-2 ms, as much as decoding a small slice, and was 15-20
    points of the prepare overhead benchmark; a killed run loses at most the batches in flight.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, EntryLocation] | None = None

    # ------------------------------------------------------------ reading

    def _entries(self) -> dict[str, EntryLocation]:
        """key -> location over every complete batch file (scanned once, then kept up to date)."""
        if self._index is None:
            self._index = {}
            for path in sorted(self.directory.glob(f"*{ENTRY_SUFFIX}")):
                if _TEMP_MARK not in path.name:
                    self._index.update(read_batch_index(path))
        return self._index

    def cached_keys(self) -> list[str]:
        return sorted(self._entries())

    def load(self, key: str) -> dict[str, Any] | None:
        """The cached result, or None when absent or unreadable (then the job is redone)."""
        where = self._entries().get(key)
        if where is None:
            return None
        try:
            with open(where.file, "rb") as handle:
                handle.seek(where.json_start)
                return json.loads(handle.read(where.json_length).decode("utf-8"))
        except (OSError, ValueError):
            return None

    def member(self, key: str, offset: int, length: int) -> bytes:
        where = self._entries()[key]
        view = _open_batch(where.file)
        start = where.payload_start + offset
        return bytes(view[start : start + length])

    # ------------------------------------------------------------ writing

    def store_batch(
        self, entries: Sequence[tuple[str, Mapping[str, Any], bytes]]
    ) -> dict[str, EntryLocation]:
        """Write finished entries as one batch file (temporary name, then rename); their locations.

        The name hashes the keys, so the same jobs land in the same file and a rerun replaces it whole.
        """
        if not entries:
            return {}
        encoded = [
            (key, json.dumps(result, sort_keys=True).encode("utf-8"), payload)
            for key, result, payload in entries
        ]
        rows: list[list[Any]] = []
        position = 0
        for key, text, payload in encoded:
            rows.append([key, position, len(text), position + len(text), len(payload)])
            position += len(text) + len(payload)
        index = json.dumps(rows).encode("utf-8")
        name = hashlib.sha1("\n".join(k for k, _, _ in encoded).encode()).hexdigest()
        final = self.directory / f"{name}{ENTRY_SUFFIX}"
        tmp = self.directory / f"{name}{_TEMP_MARK}{os.getpid()}{ENTRY_SUFFIX}"
        with tmp.open("wb") as handle:
            handle.write(_BATCH_HEAD.pack(BATCH_MAGIC, len(index)))
            handle.write(index)
            for _, text, payload in encoded:
                handle.write(text)
                handle.write(payload)
        os.replace(tmp, final)
        _open_batch.cache_clear()  # a replaced file must not be read through an old map
        body = _BATCH_HEAD.size + len(index)
        locations = {
            key: EntryLocation(str(final), body + json_start, json_length, body + payload_start)
            for key, json_start, json_length, payload_start, _ in rows
        }
        self.add(locations)
        return locations

    def add(self, locations: Mapping[str, EntryLocation]) -> None:
        """Record entries another process wrote (workers return the locations of what they stored).

        A cache that has not scanned its folder yet (a worker's) keeps no index: it only writes.
        """
        if self._index is not None:
            self._index.update(locations)

    # ------------------------------------------------------------ housekeeping

    def prune(self, keep: set[str]) -> int:
        """Drop entries not in ``keep`` (earlier configs, changed files, older cache versions), so ``work/``
        does not grow without end; returns how many entries went.

        A batch with no live entry is deleted; one with some is rewritten with only those (new file first,
        then the old one goes), so a killed prune loses nothing.
        """
        index = self._entries()
        by_file: dict[str, list[str]] = {}
        for key, where in index.items():
            by_file.setdefault(where.file, []).append(key)
        removed = 0
        for path in sorted(self.directory.iterdir()):
            foreign = path.suffix == ENTRY_SUFFIX and str(path) not in by_file  # damaged or old format
            if (foreign or path.suffix in _LEGACY_SUFFIXES) and _TEMP_MARK not in path.name:
                path.unlink(missing_ok=True)
                removed += path.suffix != ".npy"
        for file, keys in sorted(by_file.items()):
            live = sorted(k for k in keys if k in keep)
            if len(live) == len(keys):
                continue
            removed += len(keys) - len(live)
            self.store_batch([entry for entry in map(self._repacked, live) if entry is not None])
            for key in keys:
                if key not in live:
                    del index[key]
            _open_batch.cache_clear()
            Path(file).unlink(missing_ok=True)
        return removed

    def _repacked(self, key: str) -> tuple[str, dict[str, Any], bytes] | None:
        """An entry read back as (key, result, members), member offsets renumbered for the new file."""
        result = self.load(key)
        if result is None:
            return None
        members = [s for s in job_slices(result) if "offset" in s]
        payload = b"".join(self.member(key, int(s["offset"]), int(s["length"])) for s in members)
        return key, _rebased(result), payload

    def clean_temporaries(self) -> None:
        """Remove temp files a killed worker left behind."""
        for path in self.directory.glob(f"*{_TEMP_MARK}*"):
            path.unlink(missing_ok=True)


def _rebased(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result whose member offsets are renumbered for its members concatenated in slice order."""
    out = dict(result)
    position = 0
    slices = []
    for entry in job_slices(result):
        if "offset" in entry:
            entry = {**entry, "offset": position}
            position += int(entry["length"])
        slices.append(entry)
    out["slices"] = slices
    return out


def read_batch_index(path: Path) -> dict[str, EntryLocation]:
    """The entries of one batch file, or none when it is not a complete batch of this format."""
    try:
        with path.open("rb") as handle:
            magic, index_length = _BATCH_HEAD.unpack(handle.read(_BATCH_HEAD.size))
            if magic != BATCH_MAGIC:
                return {}
            rows = json.loads(handle.read(index_length).decode("utf-8"))
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError, struct.error):
        return {}
    body = _BATCH_HEAD.size + index_length
    try:
        end = max((int(r[3]) + int(r[4]) for r in rows), default=0)
        if size != body + end:
            return {}
        return {
            str(r[0]): EntryLocation(str(path), body + int(r[1]), int(r[2]), body + int(r[3])) for r in rows
        }
    except (TypeError, ValueError, IndexError):
        return {}


@lru_cache(maxsize=64)
def _open_batch(path: str) -> np.ndarray:
    """A read-only map of a batch file (the shard writer reads members one by one)."""
    return np.memmap(path, dtype=np.uint8, mode="r")


def run_and_cache(
    batch: Sequence[tuple[DecodeJob, str, str]],
) -> list[tuple[str, dict[str, Any], EntryLocation]]:
    """Pool entry point: run a batch of ``(job, key, cache_dir)``, store the entries in batch files (a new
    one past :data:`BATCH_MAX_PAYLOAD`); (key, result, location) per job for the parent."""
    if not batch:
        return []
    cache = WorkCache(batch[0][2])
    out: list[tuple[str, dict[str, Any], EntryLocation]] = []
    pending: list[tuple[str, dict[str, Any], bytes]] = []

    def flush() -> None:
        locations = cache.store_batch(pending)
        out.extend((key, result, locations[key]) for key, result, _ in pending)
        pending.clear()

    for job, key, _ in batch:
        result, payload = run_job(job)
        pending.append((key, result, payload))
        if sum(len(p) for _, _, p in pending) >= BATCH_MAX_PAYLOAD:
            flush()
    flush()
    return out


# ---------------------------------------------------------------- the single pass (headers + decode)

#: Files with at most this many slices are decoded in the pass that reads their headers (when their dataset
#: is small enough that no cap can make that wasteful); longer files of a capped class are capped first,
#: then decoded.
SINGLE_PASS_MAX_SLICES = 1

_HEADER_FIELDS = ("index", "n_slices", "modality", "body_part_raw", "patient_id", "study_uid", "series_uid")


@dataclass(frozen=True)
class FirstPassJob:
    """Read one file's headers and, when ``decode`` is set (its dataset has no more files than the smallest
    cap), decode it from the same parse if no cap can drop any of its slices: a file of a mapped class that
    holds one slice, or of a class in ``uncapped`` whatever its length.

    ``class_map`` is here so a file whose code the map excludes (US, OT...) is not decoded for nothing.
    """

    item: InputItem
    decode: bool
    class_map: ClassMap
    preprocess: Preprocess
    image_format: str = "png"
    png_compress_level: int = 1
    uncapped: frozenset[str] = frozenset()


def first_pass_key(job: FirstPassJob) -> str:
    """Cache key of a single-pass entry: it cannot use the header's modality (unknown before reading), so it
    hashes the whole item, the class map and the output settings, plus the file's size and mtime."""
    fingerprint = file_fingerprint(job.item.path)
    spec = {
        "v": CACHE_VERSION,
        "pass": "single",
        "item": asdict(job.item),
        "class_map": job.class_map.to_dict(),
        "preprocess": job.preprocess.to_dict(),
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

    if not job.decode or not headers:
        return False
    classes = {resolve_class(h.modality, h.item.label, job.class_map) for h in headers}
    if None in classes:
        return False
    # No cap on its class: every slice will be written, whatever the count.
    return len(headers) <= SINGLE_PASS_MAX_SLICES or classes <= job.uncapped


def run_first_pass_decode(
    job: FirstPassJob, headers: Sequence[SliceHeader], decode: SliceDecoder
) -> tuple[dict[str, Any], bytes]:
    """Decode a file whose headers were just read, from the same parse; the result records the headers
    (the caller caches it, so a resumed run need not read the file again)."""
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
    return result, payload


def job_slices(result: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    return result.get("slices", [])
