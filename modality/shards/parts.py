"""Partitioned prepare: N parts read and decode, one merge decides and writes.

At archive scale the cost of prepare is reading and decoding (decode alone is ~1 ms per uncompressed CT slice;
the 4.5 M slices of the reference study are 1.3 CPU-hours of it at best), while every decision that needs the
whole pool (per-dataset caps, the patient and identical-image guards, the seeded shuffle) is cheap. So:

* ``parts=N part=i`` (any machine, any order, a Hydra multirun on the training launchers) lists the whole pool
  (cheap: names only), keeps its deterministic share (:func:`partition`: whole units, balanced), reads the
  headers of its files and decodes them into its own work cache ``out_dir/parts/<i>-of-<N>/work``, then
  writes its record (:data:`RECORD_NAME`: per file, the headers, the rejection or the cache key of the
  decoded slices). The record is written last and atomically: it is the part's "finished" marker, and a
  killed part rerun alone resumes from its work cache.
* ``merge=true`` checks every part is finished for the same listing and settings, then runs the same global
  passes a single run does (:func:`modality.shards.build.finish_shards`) over the parts' results and writes
  the shards, summary, statistics and rejects. The shards are therefore byte-identical to a single-machine
  run, not just the same samples: one writer, one seeded order.

Which files a part decodes: the single pass's rule with datasets counted over the whole listing (in a
dataset no bigger than the smallest cap, single-slice files and files of uncapped classes). The rest get
their headers read by the part and are decoded by the merge after capping, only the chosen slices (the
decode a cap would waste is never spent). A streamed part (:mod:`modality.streaming`), whose raw files are
gone by merge time, decodes everything instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modality.records import InputItem, SliceHeader
from modality.shards.summary import Reject, write_atomic
from modality.shards.work import header_from_json, header_to_json

if TYPE_CHECKING:
    from modality.shards.build import BuildSettings, FirstPassResult, Members
    from modality.shards.work import WorkCache

PARTS_DIR = "parts"
#: A listing item that stands for one planned IDC series, whose files exist only while a streamed part
#: holds them (:mod:`modality.streaming`).
SERIES_KIND = "idc_series"
RECORD_NAME = "part.jsonl"
RECORD_VERSION = 1


# ---------------------------------------------------------------- which files go to which part


def work_unit(item: InputItem) -> str:
    """The unit a partition never cuts: a series where the source names one, else the file's folder.

    Series and patients are the leakage units; the merge applies every guard over the whole pool, so cutting
    one would not leak, but keeping a series together keeps its files' reads local to one node, and a
    streamed part downloads whole series. DICOM archives keep a series in one folder (IDC, TCIA, the shared
    corpus), so the folder is the series where no UID is known before reading.
    """
    if item.series_uid:
        return f"{item.dataset}\x00series\x00{item.series_uid}"
    return f"{item.dataset}\x00dir\x00{os.path.dirname(item.path)}"


def file_weight(item: InputItem) -> int:
    """Files an item stands for: 1, or a planned series' file count (``extra["files"]``, streamed parts)."""
    return int(item.extra.get("files", 1)) if item.kind == SERIES_KIND else 1


def partition(items: Sequence[InputItem], parts: int) -> list[list[int]]:
    """Indices of ``items`` per part: whole units, each part's file count as even as units allow.

    Longest-processing-time greedy: units from largest to smallest (ties by name), each to the part with the
    fewest files so far (:func:`file_weight`) (ties by part number). Same items -> same partition on every machine, whatever
    order the listing arrived in. Each part's indices keep the listing order.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    by_unit: dict[str, list[int]] = defaultdict(list)
    weight: dict[str, int] = defaultdict(int)
    for index, item in enumerate(items):
        by_unit[work_unit(item)].append(index)
        weight[work_unit(item)] += file_weight(item)
    heap = [(0, part) for part in range(parts)]
    owner: dict[str, int] = {}
    for unit in sorted(by_unit, key=lambda u: (-weight[u], u)):
        load, part = heapq.heappop(heap)
        owner[unit] = part
        heapq.heappush(heap, (load + weight[unit], part))
    out: list[list[int]] = [[] for _ in range(parts)]
    for unit, indices in by_unit.items():
        out[owner[unit]].extend(indices)
    return [sorted(indices) for indices in out]


def part_name(part: int, parts: int) -> str:
    return f"{part:04d}-of-{parts:04d}"


def part_dir(out_dir: Path, part: int, parts: int) -> Path:
    return Path(out_dir) / PARTS_DIR / part_name(part, parts)


def check_part(part: Any, parts: Any) -> tuple[int, int]:
    """``part`` and ``parts`` as ints, or a ValueError saying what a valid pair is."""

    def whole(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit():
            raise ValueError(f"parts and part must be whole numbers, got parts={parts!r} part={part!r}")
        return int(value)

    part_i, parts_i = whole(part), whole(parts)
    if parts_i < 1 or not 0 <= part_i < parts_i:
        raise ValueError(f"need parts >= 1 and 0 <= part < parts, got parts={parts_i} part={part_i}")
    return part_i, parts_i


# ---------------------------------------------------------------- what a part records


def listing_fingerprint(items: Iterable[InputItem]) -> str:
    """Hash of the whole listing (each item's fields, in order): parts and the merge must agree on it."""
    digest = hashlib.sha1()
    for item in items:
        digest.update(
            json.dumps(asdict(item), sort_keys=True, default=str).encode("utf-8", "surrogateescape")
        )
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """One file as a part left it: its headers (or its rejection) and where its decoded slices are cached."""

    item: InputItem
    headers: list[SliceHeader]
    reject: Reject | None
    cache_key: str | None  # None: headers only (the merge decodes the slices the caps choose)


def record_line(record: FileRecord) -> str:
    reject = record.reject
    row = {
        "item": asdict(record.item),
        "headers": [header_to_json(h) for h in record.headers],
        "reject": None if reject is None else {"reason": reject.reason, "detail": reject.detail},
        "cache_key": record.cache_key,
    }
    # ensure_ascii (the default) writes a non-UTF-8 file name's smuggled bytes as \udcXX, read back as such
    return json.dumps(row, sort_keys=True)


def record_from_line(line: str) -> FileRecord:
    row = json.loads(line)
    item = InputItem(**row["item"])
    headers = [header_from_json(item, h) for h in row["headers"]]
    reject = row["reject"]
    return FileRecord(
        item=item,
        headers=headers,
        reject=None
        if reject is None
        else Reject(item.path, item.dataset, None, reject["reason"], reject["detail"]),
        cache_key=row["cache_key"],
    )


def write_record(directory: Path, head: Mapping[str, Any], records: Iterable[FileRecord]) -> Path:
    """The part's record (``<directory>/part.jsonl``); see :func:`write_records`."""
    return write_records(Path(directory) / RECORD_NAME, head, records)


def read_record(directory: Path) -> tuple[dict[str, Any], list[FileRecord]] | None:
    """A finished part's head and file records, or None when the part has not finished (no record)."""
    return read_records(Path(directory) / RECORD_NAME)


def write_records(path: Path, head: Mapping[str, Any], records: Iterable[FileRecord]) -> Path:
    """File records as JSON lines after a head line (settings, listing, counts); atomic. A part's record and
    a streamed part's per-series journal are both this."""
    lines = [json.dumps({"record_version": RECORD_VERSION, **head}, sort_keys=True)]
    lines += [record_line(r) for r in records]
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def read_records(path: Path) -> tuple[dict[str, Any], list[FileRecord]] | None:
    """The head and file records of :func:`write_records`, or None when missing, damaged, of another version,
    or holding another number of records than its head says (trusted whole or redone, never read in part)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        if head.get("record_version") != RECORD_VERSION:
            return None
        records = [record_from_line(line) for line in lines[1:] if line]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None  # missing or damaged (the write is atomic: only a hand edit or a disk fault does this)
    if len(records) != head.get("files"):
        return None
    return head, records


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """Hash of the settings every part must share with the merge (preprocessing, maps, caps, seed...)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class PartsNotReady(RuntimeError):
    """The merge found parts missing or made for another listing or settings (the message says which)."""


def collect_parts(
    out_dir: Path, parts: int, listing: str, settings: str, command_hint: str
) -> tuple[list[FileRecord], list[Path], list[dict[str, Any]]]:
    """Every part's file records (for the merge), each part's folder and each part's record head.

    Raises :class:`PartsNotReady` naming each part that is missing, unfinished or stale (another listing or
    settings: the inputs or the config changed since it ran), with the command that fixes it.
    """
    records: list[FileRecord] = []
    folders: list[Path] = []
    heads: list[dict[str, Any]] = []
    missing: list[str] = []
    stale: list[str] = []
    for part in range(parts):
        folder = part_dir(out_dir, part, parts)
        found = read_record(folder)
        if found is None:
            missing.append(str(part))
            continue
        head, part_records = found
        if head.get("listing") != listing or head.get("settings") != settings:
            stale.append(str(part))
            continue
        records.extend(part_records)
        folders.append(folder)
        heads.append(head)
    problems = []
    if missing:
        problems.append(f"part(s) {', '.join(missing)} of {parts} not finished")
    if stale:
        problems.append(
            f"part(s) {', '.join(stale)} of {parts} made for other inputs or settings than this merge's"
        )
    if problems:
        raise PartsNotReady(
            f"cannot merge {out_dir}: {'; '.join(problems)}. Run them (a killed part resumes from its work "
            f"cache), e.g. {command_hint}"
        )
    return records, folders, heads


# ---------------------------------------------------------------- the two commands


def part_settings(settings: BuildSettings) -> dict[str, Any]:
    """What a part's output depends on: the merge refuses parts made with other values. Caps, seed, splits and
    shard size are applied by the merge alone, so changing them needs no part rerun."""
    from modality.readers import decode_budget

    return {
        "preprocess": settings.preprocess.to_dict(),
        "class_map": settings.class_map.to_dict(),
        "image_format": settings.image_format,
        "png_compress_level": settings.png_compress_level,
        # which files a part rejects before decoding: another budget, other rejects
        "decode_budget": asdict(decode_budget()),
    }


def build_part(items: Sequence[InputItem], settings: BuildSettings, part: int, parts: int) -> Path:
    """Pass 1 (headers, and the decode of every file no cap can cut) over part ``part`` of ``parts`` of
    ``items`` (the whole listing); returns the part's record. Resumes from the part's work cache."""
    from modality.locks import folder_lock
    from modality.shards.build import first_pass, single_pass_datasets, start_output, uncapped_classes
    from modality.shards.work import WorkCache

    part, parts = check_part(part, parts)
    out_dir = start_output(items, settings)
    folder = part_dir(out_dir, part, parts)
    with folder_lock(folder):
        (folder / RECORD_NAME).unlink(missing_ok=True)  # not finished until the new record is written
        cache = WorkCache(folder / "work")
        cache.clean_temporaries()
        mine = [items[i] for i in partition(items, parts)[part]]
        # the single pass's rule, datasets counted over the whole listing: the choice one run makes
        decode = (single_pass_datasets(items, settings.caps), uncapped_classes(settings))
        per_file = first_pass(mine, cache, settings, decode=decode)
        records = [
            FileRecord(item, f.headers, f.reject, f.cache_key if f.decoded is not None else None)
            for item, f in zip(mine, per_file, strict=True)
        ]
        path = finish_part(folder, cache, settings, part, parts, items, records)
    return path


def finish_part(
    folder: Path,
    cache: WorkCache,
    settings: BuildSettings,
    part: int,
    parts: int,
    listing: Sequence[InputItem],
    records: Sequence[FileRecord],
    **extra: Any,
) -> Path:
    """Write a part's record (its head: which part, the listing and settings it was made for, counts, and
    ``extra``), then prune its work cache to what the record points at. The record is the part's "finished"
    marker, so it goes last."""
    head = {
        "part": part,
        "parts": parts,
        "listing": listing_fingerprint(listing),
        "settings": settings_fingerprint(part_settings(settings)),
        "files": len(records),
        "decoded_files": sum(r.cache_key is not None for r in records),
        "rejected_files": sum(r.reject is not None for r in records),
        **extra,
    }
    path = write_record(folder, head, records)
    if settings.keep_work:
        cache.prune(keep={r.cache_key for r in records if r.cache_key is not None})
    return path


def streamed_files(
    listing: Sequence[InputItem], records: Sequence[FileRecord], heads: Sequence[Mapping[str, Any]]
) -> list[InputItem]:
    """The merge's items for streamed parts (a listing of planned series): the files the parts recorded, once
    every planned series is journalled by exactly one part; sorted as a listing of the downloaded files is."""
    planned = sorted(str(item.series_uid) for item in listing)
    done = sorted(str(uid) for head in heads for uid in head.get("units", []))
    if done != planned:
        missing = sorted(set(planned) - set(done))
        raise PartsNotReady(
            f"the streamed parts do not cover every planned series exactly once (missing e.g. {missing[:3]})"
        )
    return sorted((r.item for r in records), key=lambda item: (item.dataset, item.path))


def merge_parts(
    items: Sequence[InputItem], settings: BuildSettings, parts: int, command_hint: str = ""
) -> Path:
    """Passes 2-5 over every part's pass 1: the same shards, summary, statistics and rejects as one run over
    ``items``; returns ``summary.json``'s path. Raises :class:`PartsNotReady` when a part is missing or stale.

    Every part's lock is held for the whole merge, so a part rerun started meanwhile (which would drop its
    record and prune its cache) waits until the merge has written everything.
    """
    from modality.locks import folder_lock
    from modality.shards.build import Members, finish_shards, start_output
    from modality.shards.work import WorkCache

    _, parts = check_part(0, parts)
    out_dir = start_output(items, settings)
    with contextlib.ExitStack() as locks:
        for part in range(parts):
            locks.enter_context(folder_lock(part_dir(out_dir, part, parts)))
        records, folders, heads = collect_parts(
            out_dir,
            parts,
            listing_fingerprint(items),
            settings_fingerprint(part_settings(settings)),
            command_hint or f"python -m modality.prepare <the same overrides> parts={parts} part=<i>",
        )
        streamed = bool(items) and all(item.kind == SERIES_KIND for item in items)
        if streamed:
            items = streamed_files(items, records, heads)
        caches = [WorkCache(folder / "work") for folder in folders]
        merge_cache = WorkCache(out_dir / "work")
        merge_cache.clean_temporaries()
        members = Members([merge_cache, *caches])
        # handed over without a name here, so finish_shards can let go of pass 1's results as it goes
        summary = finish_shards(
            [item.path for item in items],
            parts_first_pass(items, records, members, streamed, out_dir),
            merge_cache,
            members,
            settings,
        )
        if (
            not settings.keep_work
        ):  # keep_work=false: no copy of the members is left behind, the parts' neither
            for cache in caches:
                shutil.rmtree(cache.directory, ignore_errors=True)
        return summary


def parts_first_pass(
    items: Sequence[InputItem],
    records: Sequence[FileRecord],
    members: Members,
    streamed: bool,
    out_dir: Path,
) -> list[FirstPassResult]:
    """The parts' pass 1 as one run's would be, in listing order: each file's headers (on the listed item),
    its rejection, and its decoded slices loaded from whichever part cache holds them.

    A plain part's entry lost from its cache (deleted by hand) is decoded again by the merge, from the file;
    a streamed part's file is gone, so that is an error naming the fix.
    """
    from modality.shards.build import FirstPassResult

    by_path = {r.item.path: r for r in records}
    if len(by_path) != len(records) or set(by_path) != {item.path for item in items}:
        raise PartsNotReady(f"the parts of {out_dir} do not hold every listed file exactly once: rerun them")
    out: list[FirstPassResult] = []
    for item in items:
        record = by_path[item.path]
        key = record.cache_key
        decoded = members.load(key) if key is not None else None
        if streamed and decoded is None and record.reject is None:
            raise PartsNotReady(
                f"{item.path}: its decoded slices are missing from every streamed part's work cache and its "
                "raw file is gone: rerun the part that holds its series"
            )
        headers = [replace(h, item=item) for h in record.headers]
        out.append(FirstPassResult(headers, record.reject, key if decoded is not None else None, decoded))
    return out
