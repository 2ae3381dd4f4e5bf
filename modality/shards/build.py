"""The prepare passes, in order: headers -> classes -> caps -> patient guard -> decode -> image guard -> write.

Each pass is a function over plain records so it can be read and tested alone; :func:`build_shards` chains
them. Expensive work (header reads, decoding) runs in a process pool whose results come back in input
order, so output never depends on scheduling; everything that decides *what* is written runs in the
parent, sorted, so the same inputs and seed give byte-identical shards.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from modality.intensity.pipeline import Preprocess
from modality.labels import BodyPartMap, ClassMap, resolve_class
from modality.labels.body_parts import SOURCE_REGION_KEY, resolve_region
from modality.records import PRE_REJECTED, InputItem, RejectedInput, SliceHeader, printable
from modality.shards.charts import plot_split
from modality.shards.sampling import apply_caps
from modality.shards.splits import (
    SPLITS,
    ImageSighting,
    PatientSighting,
    check_split_map,
    guard_identical_images,
    guard_patients,
)
from modality.shards.stats import histogram_stats
from modality.shards.summary import (
    REJECTS_NAME,
    SUMMARY_NAME,
    Reject,
    WrittenSample,
    inputs_accounting,
    reason_counts,
    split_counts,
    write_rejects,
    write_summary,
)
from modality.shards.work import (
    DecodeJob,
    EntryLocation,
    FirstPassJob,
    SliceDecoder,
    WorkCache,
    cached_headers,
    decode_in_first_pass,
    first_pass_key,
    job_key,
    run_and_cache,
    run_first_pass_decode,
)
from modality.shards.writer import PARTIAL_SUFFIX, ShardWriter, sample_key

#: Most files per pool hand-off, which is also one work-cache batch file: big enough to amortise the
#: round trip and the file creation, small enough to balance workers and to lose little to a kill.
CHUNK_MAX = 16

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BuildSettings:
    """Everything :func:`build_shards` needs, as plain values (prepare.py builds it from the Hydra config)."""

    out_dir: Path
    split_of: Mapping[str, str]
    class_map: ClassMap
    body_part_map: BodyPartMap
    preprocess: Preprocess  # summary.json["preprocess"] core; a stored dict is read once, on construction
    caps: Mapping[str, int | None] = field(default_factory=dict)
    seed: int = 0
    workers: int = 2
    image_format: str = "png"
    png_compress_level: int = 1
    shard_max_samples: int = 2000
    pool_name: str = ""
    progress: bool = True
    charts: bool = True
    keep_work: bool = True  # False: drop work/ after a successful run (it holds a copy of every member)
    single_pass: bool = True  # decode single-slice files while reading headers where no cap can bind
    # dataset -> region where every file of the dataset shows it (configs/dataset/<pool>.yaml `body_part`):
    # fills a sample's head region when neither its tag nor its source names one
    dataset_body_parts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.preprocess, Preprocess):
            object.__setattr__(self, "preprocess", Preprocess.from_dict(self.preprocess))


# ---------------------------------------------------------------- parallel map with a progress bar


def batches(jobs: Sequence[T], workers: int) -> list[list[T]]:
    """``jobs`` cut into consecutive batches: one pool hand-off and one work-cache file each (inline, with no
    workers to balance, always the largest)."""
    size = CHUNK_MAX if workers <= 0 else max(1, min(CHUNK_MAX, len(jobs) // (workers * 8)))
    return [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]


def _exit_with_parent(parent: int) -> None:
    """Pool worker initializer: the worker ends when the process that started it ends, however it ends.

    A parent killed with SIGKILL (kill -9, the out-of-memory killer) tells its workers nothing, and an
    executor's worker holds both ends of its job queue, so it would wait for work for ever, holding the
    out_dir lock the rerun waits on. Linux kills it with its parent (PR_SET_PDEATHSIG); elsewhere a
    thread checks once a second.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers end with this process (see :func:`_exit_with_parent`)."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )


class WorkerDied(RuntimeError):
    """A pool worker process ended without returning (killed by a signal: the out-of-memory killer, kill -9)."""


def parallel_map(
    fn: Callable[[list[T]], list[R]], jobs: Sequence[T], workers: int, desc: str, progress: bool
) -> Iterator[R]:
    """``fn`` over batches of ``jobs``, results flattened in input order; a pool of ``workers`` processes,
    or inline when ``workers`` is 0.

    The pool is a :class:`~concurrent.futures.ProcessPoolExecutor`, not ``multiprocessing.Pool``: when a
    worker is killed, ``Pool`` starts a new one and waits forever for the lost batch, while the executor
    fails at once (:class:`WorkerDied` here). Finished batches are already in the work cache, so the
    rerun resumes. The bar shows only on a terminal (``progress`` and stderr a TTY), never for no jobs.
    """
    from tqdm import tqdm

    if not jobs:
        return
    bar = tqdm(total=len(jobs), desc=desc, unit="file", disable=None if progress else True, mininterval=1.0)
    try:
        # A few jobs per hand-off: one round trip per file costs ~1 ms of pickling and pipe traffic, and
        # one cache file per file as much again: as much as the whole-pipeline overhead budget per slice.
        chunks = batches(jobs, workers)
        if workers <= 0 or len(chunks) <= 1:
            for chunk in chunks:
                yield from fn(chunk)
                bar.update(len(chunk))
            return
        pool = worker_pool(workers)
        try:
            for chunk, results in zip(chunks, pool.map(fn, chunks), strict=True):
                yield from results
                bar.update(len(chunk))
        except BrokenProcessPool as error:
            raise WorkerDied(
                f"a worker process of the '{desc}' pass died without finishing its files (killed by a "
                "signal: the out-of-memory killer or kill -9?). Work finished so far is kept in the work "
                "cache: rerun the same command to resume, with fewer workers if memory ran out."
            ) from error
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def warm_worker_imports() -> None:
    """Import the readers and the pixel pipeline in the parent, before any pool forks.

    Readers import pydicom, its decoder plugins, Pillow and nibabel lazily; without this every worker of
    every pass pays those imports again (seconds on a busy 2-core machine).
    """
    import importlib

    for name in (
        "modality.readers",
        "modality.readers.dicom",
        "modality.readers.image",
        "modality.readers.volume",
        "modality.intensity.pipeline",
        "modality.shards.png_codec",
    ):
        try:
            importlib.import_module(name)
        except ImportError:  # a reader that is not installed fails per file, with a reject, later
            continue


# ---------------------------------------------------------------- pass 1: headers (and single-slice decode)


def single_pass_datasets(items: Sequence[InputItem], caps: Mapping[str, int | None]) -> set[str]:
    """Datasets whose single-slice files are decoded in the header pass, from the same parse.

    Caps need every header before anything is chosen, so decoding while reading headers is only free of
    waste where no cap can bind. A dataset with no more files than the smallest cap qualifies: its
    single-slice files alone cannot exceed any cap. Its multi-slice files (multi-frame DICOM, volumes)
    are still capped first and decoded after, so the decoding a cap could make wasted is bounded by the
    cap. Bigger datasets keep the two passes (header pass, then decode only what the caps chose).
    """
    bounds = [cap for cap in caps.values() if cap is not None]
    smallest = min(bounds) if bounds else None
    counts = Counter(item.dataset for item in items)
    return {dataset for dataset, n in counts.items() if smallest is None or n <= smallest}


def uncapped_classes(settings: BuildSettings) -> frozenset[str]:
    """Classes no cap applies to: in a single-pass dataset their files are decoded in the header pass
    whatever their length."""
    return frozenset(c for c in settings.class_map.classes if settings.caps.get(c) is None)


@dataclass(frozen=True)
class FirstPassResult:
    """One file after pass 1: its headers or header rejection, and its decode result if it was decoded."""

    headers: list[SliceHeader]
    reject: Reject | None
    cache_key: str | None = None
    decoded: dict[str, Any] | None = None
    location: EntryLocation | None = None  # where a worker stored ``decoded`` (None: from the cache)


def _item_reject(item: InputItem, reason: str, detail: str) -> Reject:
    return Reject(item.path, item.dataset, None, reason, detail)


def _read_safely(
    item: InputItem, read: Callable[[], tuple[list[SliceHeader], SliceDecoder | None]]
) -> tuple[list[SliceHeader], Reject | None, SliceDecoder | None]:
    """Run a header read, turning every failure (and a source's own rejection) into a :class:`Reject`."""
    pre = item.extra.get(PRE_REJECTED) if item.extra else None
    if pre:
        return [], _item_reject(item, str(pre["reason"]), str(pre.get("detail", ""))), None
    try:
        headers, decode = read()
    except RejectedInput as exc:
        return [], _item_reject(item, exc.reason, exc.detail), None
    except Exception as exc:
        return [], _item_reject(item, f"unexpected error: {type(exc).__name__}", str(exc)[:500]), None
    if not headers:
        return [], _item_reject(item, "no image slices", "reader returned no slices"), None
    return headers, None, decode


def read_headers_safely(item: InputItem) -> tuple[list[SliceHeader], Reject | None]:
    """Header read that turns every failure into a rejection."""
    from modality.readers import read_headers

    headers, reject, _ = _read_safely(item, lambda: (read_headers(item), None))
    return headers, reject


def run_first_pass(batch: list[tuple[FirstPassJob, str | None, str]]) -> list[FirstPassResult]:
    """Pool entry point of pass 1 for a batch of files: headers, every failure a rejection; with
    ``job.decode``, a file no cap can cut (:func:`~modality.shards.work.decode_in_first_pass`) is decoded
    from the same parse, and the batch's decoded files are cached (with their headers) in one batch file."""
    from modality.readers import read_headers_keeping_file

    out: list[FirstPassResult] = []
    decoded: list[tuple[str, dict[str, Any], bytes]] = []
    for job, key, _ in batch:
        if not job.decode or key is None:
            out.append(FirstPassResult(*read_headers_safely(job.item)))
            continue
        headers, reject, decode = _read_safely(job.item, lambda job=job: read_headers_keeping_file(job.item))
        if reject is not None or decode is None or not decode_in_first_pass(job, headers):
            out.append(FirstPassResult(headers, reject))
            continue
        result, payload = run_first_pass_decode(job, headers, decode)
        decoded.append((key, result, payload))
        out.append(FirstPassResult(headers, None, key, result))
    if decoded:
        locations = WorkCache(batch[0][2]).store_batch(decoded)
        out = [replace(r, location=locations[r.cache_key]) if r.cache_key else r for r in out]
    return out


def first_pass(
    items: Sequence[InputItem],
    cache: WorkCache,
    settings: BuildSettings,
    decode: tuple[set[str], frozenset[str]] | None = None,
) -> list[FirstPassResult]:
    """Pass 1 over ``items`` in input order; single-pass entries finished by an earlier run come from the
    cache (headers included), so a killed run resumes without reading those files again.

    ``decode`` = (datasets, classes) whose files are decoded here (default: the single-pass rule over
    ``items``); a part passes its own, counted over the whole pool.
    """
    if decode is not None:
        decode_datasets, uncapped = decode
    elif settings.single_pass:
        decode_datasets, uncapped = single_pass_datasets(items, settings.caps), uncapped_classes(settings)
    else:
        decode_datasets, uncapped = set(), frozenset()
    results: list[FirstPassResult | None] = [None] * len(items)
    todo: list[tuple[FirstPassJob, str | None, str]] = []
    slots: list[int] = []
    for slot, item in enumerate(items):
        job = FirstPassJob(
            item=item,
            decode=item.dataset in decode_datasets,
            class_map=settings.class_map,
            uncapped=uncapped,
            preprocess=settings.preprocess,
            image_format=settings.image_format,
            png_compress_level=settings.png_compress_level,
        )
        key = first_pass_key(job) if job.decode else None
        cached = cache.load(key) if key is not None else None
        headers = cached_headers(item, cached) if cached is not None else None
        if headers is not None:
            results[slot] = FirstPassResult(headers, None, key, cached)
        else:
            todo.append((job, key, str(cache.directory)))
            slots.append(slot)
    for slot, result in zip(
        slots, parallel_map(run_first_pass, todo, settings.workers, "read", settings.progress), strict=True
    ):
        results[slot] = result
        if result.cache_key is not None and result.location is not None:
            cache.add({result.cache_key: result.location})
    return [r for r in results if r is not None]


@dataclass
class Classified:
    """Headers that map to a class, and the rejections so far."""

    headers: list[tuple[SliceHeader, str]]
    rejects: list[Reject]


def classify(per_file: Iterable[tuple[list[SliceHeader], Reject | None]], class_map: ClassMap) -> Classified:
    """Resolve each slice's class; a file whose code the map excludes is one reject naming the code."""
    out = Classified([], [])
    for headers, reject in per_file:
        if reject is not None:
            out.rejects.append(reject)
            continue
        excluded: Counter[str] = Counter()
        for header in headers:
            cls = resolve_class(header.modality, header.item.label, class_map)
            if cls is None:
                excluded[header.item.label or header.modality or "?"] += 1
            else:
                out.headers.append((header, cls))
        if excluded:
            item = headers[0].item
            codes = ", ".join(sorted(excluded))
            detail = f"{sum(excluded.values())} of {len(headers)} slices" if len(headers) > 1 else ""
            out.rejects.append(
                Reject(item.path, item.dataset, None, f"modality not in class map ({codes})", detail)
            )
    return out


# ---------------------------------------------------------------- pass 2: caps


def over_cap_rejects(
    over: Sequence[SliceHeader], chosen: Sequence[SliceHeader], caps: Mapping
) -> list[Reject]:
    """One row per file with slices over the cap, counting them (a file can be partly written)."""
    kept = Counter(h.item.path for h in chosen)
    dropped: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in over:
        dropped[header.item.path].append(header)
    rows = []
    for path, headers in sorted(dropped.items()):
        item = headers[0].item
        rows.append(
            Reject(
                path,
                item.dataset,
                None,
                "over cap",
                f"{len(headers)} slice(s) over the per-dataset cap ({len(headers) + kept[path]} in file, "
                f"{kept[path]} kept)",
            )
        )
    return rows


# ---------------------------------------------------------------- pass 3: decode


def decode_jobs(chosen: Sequence[tuple[SliceHeader, str]], settings: BuildSettings) -> list[DecodeJob]:
    by_file: dict[str, list[SliceHeader]] = defaultdict(list)
    for header, _ in chosen:
        by_file[header.item.path].append(header)
    jobs = []
    for _path, headers in sorted(by_file.items()):
        jobs.append(
            DecodeJob(
                item=headers[0].item,
                indices=tuple(sorted(h.index for h in headers)),
                modality_code=headers[0].modality or None,
                preprocess=settings.preprocess,
                image_format=settings.image_format,
                png_compress_level=settings.png_compress_level,
            )
        )
    return jobs


def run_decode_pass(
    jobs: Sequence[DecodeJob], cache: WorkCache, settings: BuildSettings
) -> dict[str, tuple[str, dict[str, Any]]]:
    """path -> (cache key, result); finished jobs come from the cache, the rest run in the pool."""
    keys = [job_key(job) for job in jobs]
    results: dict[str, tuple[str, dict[str, Any]]] = {}
    todo = []
    for job, key in zip(jobs, keys, strict=True):
        cached = cache.load(key)
        if cached is not None:
            results[job.item.path] = (key, cached)
        else:
            todo.append((job, key, str(cache.directory)))
    for key, result, location in parallel_map(
        run_and_cache, todo, settings.workers, "decode", settings.progress
    ):
        cache.add({key: location})
        results[result["path"]] = (key, result)
    return results


# ---------------------------------------------------------------- pass 4: samples and the image guard


@dataclass(frozen=True)
class Sample:
    """One slice that will be written: where its member bytes are and what its metadata says."""

    key: str
    path: str  # the input file as listed (may hold a non-UTF-8 name's bytes as surrogates)
    split: str
    cls: str
    cache_key: str
    offset: int
    length: int
    meta: dict[str, Any]
    histogram: np.ndarray  # int64[256]; an array, not a list of ints, to stay small for big pools


def assemble_samples(
    chosen: Sequence[tuple[SliceHeader, str]],
    results: Mapping[str, tuple[str, dict[str, Any]]],
    settings: BuildSettings,
) -> tuple[list[Sample], list[Reject]]:
    """Join headers with decode results; decode rejections become rejects, duplicates are dropped."""
    headers = {(h.item.path, h.index): (h, cls) for h, cls in chosen}
    items = {h.item.path: h.item for h, _ in chosen}
    rejects: list[Reject] = []
    candidates: list[tuple[Sample, ImageSighting]] = []
    for path, (cache_key, result) in sorted(results.items()):
        if result.get("reject"):
            r = result["reject"]
            rejects.append(Reject(path, items[path].dataset, None, r["reason"], r["detail"]))
            continue
        for entry in result["slices"]:
            header, cls = headers[(path, entry["index"])]
            if entry.get("reject"):
                r = entry["reject"]
                rejects.append(Reject(path, header.item.dataset, entry["index"], r["reason"], r["detail"]))
                continue
            split = settings.split_of[header.item.dataset]
            meta = sample_meta(header, cls, entry, settings)
            sample = Sample(
                key=sample_key(header.item.dataset, path, header.index),
                path=path,
                split=split,
                cls=cls,
                cache_key=cache_key,
                offset=entry["offset"],
                length=entry["length"],
                meta=meta,
                histogram=np.asarray(entry["histogram"], dtype=np.int64),
            )
            sighting = ImageSighting(entry["pixel_hash"], split, header.item.dataset, path, header.index)
            candidates.append((sample, sighting))
    duplicates = guard_identical_images(s for _, s in candidates)
    dropped = {(d.sighting.path, d.sighting.index) for d in duplicates}
    for d in duplicates:
        rejects.append(
            Reject(
                d.sighting.path,
                d.sighting.dataset,
                d.sighting.index,
                "duplicate image",
                f"duplicate of {d.original.path} [{d.original.index}]",
            )
        )
    samples = [s for s, sight in candidates if (sight.path, sight.index) not in dropped]
    return samples, rejects


def sample_meta(
    header: SliceHeader, cls: str, entry: Mapping[str, Any], settings: BuildSettings
) -> dict[str, Any]:
    """The ``<key>.json`` member (fields fixed by docs/design.md)."""
    decoded = entry.get("meta") or {}
    raw_part = header.body_part_raw or header.item.body_part or ""
    region, region_from = resolve_region(
        header.body_part_raw,
        header.item.body_part or (header.item.extra or {}).get(SOURCE_REGION_KEY),
        settings.dataset_body_parts.get(header.item.dataset),
        settings.body_part_map,
    )
    return {
        "dataset": header.item.dataset,
        "class": cls,
        "modality": header.modality,
        "body_part_raw": raw_part,
        "body_part": settings.body_part_map.normalise(raw_part),
        "patient_id": header.patient_id,
        "study_uid": header.study_uid,
        "series_uid": header.series_uid,
        "slice_index": header.index,
        "original_shape": decoded.get("original_shape"),
        "dtype": decoded.get("dtype"),
        "photometric": decoded.get("photometric"),
        "transfer_syntax": decoded.get("transfer_syntax"),
        "scaling": settings.preprocess.scaling.to_dict(),
        "source_path": printable(header.item.path),
        "pixel_hash": entry["pixel_hash"],
        "value_features": entry["value_features"],  # modality.intensity.value_stats.VALUE_FEATURES
        # the body-part head's label (a head region or unknown) and where it came from: tag, source, dataset, none
        "region": region,
        "region_from": region_from,
    }


# ---------------------------------------------------------------- pass 5: write


def shuffled(samples: Iterable[Sample], split: str, seed: int) -> list[Sample]:
    """A split's samples in a seeded order that mixes datasets across every shard."""
    ordered = sorted((s for s in samples if s.split == split), key=lambda s: s.key)
    random.Random(f"{seed}:shuffle:{split}").shuffle(ordered)
    return ordered


def clear_shards(shard_dir: Path) -> None:
    """Remove shards of an earlier (maybe killed) run: they are rewritten from the work cache."""
    if shard_dir.is_dir():
        for path in shard_dir.iterdir():
            if path.name.endswith((".tar", ".tar" + PARTIAL_SUFFIX)):
                path.unlink()


def write_split(
    samples: Sequence[Sample], split: str, cache: WorkCache | Members, settings: BuildSettings
) -> list[dict]:
    import json

    shard_dir = settings.out_dir / "shards"
    ext = settings.image_format
    with ShardWriter(shard_dir, split, settings.shard_max_samples) as writer:
        for sample in samples:
            image = cache.member(sample.cache_key, sample.offset, sample.length)
            members = [
                (ext, image),
                ("cls", str(settings.class_map.index(sample.cls)).encode("ascii")),
                ("json", json.dumps(sample.meta, sort_keys=True).encode("utf-8")),
            ]
            writer.write(sample.key, members)
    return [{"name": s.name, "samples": s.samples} for s in writer.shards]


def build_shards(items: Sequence[InputItem], settings: BuildSettings) -> Path:
    """Run every pass over ``items`` and write ``out_dir``; returns the path of ``summary.json``.

    Raises ``ValueError`` for a dataset missing from the split map and
    :class:`~modality.shards.splits.LeakageError` for a patient or image in two splits (nothing is written).
    """
    out_dir = start_output(items, settings)
    cache = WorkCache(out_dir / "work")
    cache.clean_temporaries()
    # handed over without a name here, so finish_shards can let go of pass 1's results as it goes
    return finish_shards(
        [item.path for item in items], first_pass(items, cache, settings), cache, Members([cache]), settings
    )


def start_output(items: Sequence[InputItem], settings: BuildSettings) -> Path:
    """Checks every run (single, part or merge) makes before reading anything; creates ``out_dir``."""
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The summary marks a complete run: drop it first so a killed rerun is never mistaken for finished.
    (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
    check_split_map({item.dataset for item in items}, settings.split_of)
    paths = [item.path for item in items]
    if len(set(paths)) != len(paths):
        dup = [p for p, n in Counter(paths).items() if n > 1]
        raise ValueError(f"sources list the same file more than once, e.g. {dup[:3]}")
    warm_worker_imports()
    return out_dir


def covers(result: Mapping[str, Any], wanted: set[int], decoded: set[int]) -> bool:
    """Whether a cached decode result of the slices ``decoded`` answers for every slice in ``wanted``. A
    file-level rejection answers only for the same slices: decoding fewer of them might have succeeded."""
    if result.get("reject"):
        return wanted == decoded
    return wanted <= {int(entry["index"]) for entry in result.get("slices", [])}


def only_slices(result: Mapping[str, Any], wanted: set[int]) -> dict[str, Any]:
    """``result`` restricted to the slices in ``wanted``: what decoding only those would have given (member
    offsets stay those of the cached entry, which is where the bytes are)."""
    return {**result, "slices": [e for e in result.get("slices", []) if int(e["index"]) in wanted]}


class Members:
    """Cached results and shard member bytes by cache key, over several work caches (a merge reads every
    part's and its own): one key -> cache map, built once, for loading pass 1's results and for writing."""

    def __init__(self, caches: Sequence[WorkCache]) -> None:
        self._caches = list(caches)
        self._owner: dict[str, WorkCache] | None = None

    def _cache_of(self, key: str) -> WorkCache | None:
        if len(self._caches) == 1:
            return self._caches[0]
        if self._owner is None:
            self._owner = {k: c for c in reversed(self._caches) for k in c.cached_keys()}
        return self._owner.get(key)

    def refresh(self) -> None:
        """Forget the key map: entries were added since (the decode pass writes into the first cache)."""
        self._owner = None

    def load(self, key: str) -> dict[str, Any] | None:
        cache = self._cache_of(key)
        return None if cache is None else cache.load(key)

    def member(self, key: str, offset: int, length: int) -> bytes:
        cache = self._cache_of(key)
        if cache is None:
            raise KeyError(f"no work cache holds entry {key}")
        return cache.member(key, offset, length)


def finish_shards(
    paths: Sequence[str],
    per_file: Sequence[FirstPassResult],
    cache: WorkCache,
    members: Members,
    settings: BuildSettings,
) -> Path:
    """Passes 2-5 over pass 1's results (``per_file``, in listing order): classes, caps, guards, decode of
    what pass 1 did not decode (into ``cache``), image guard, shards, summary.

    ``members`` reads the work caches pass 1's results live in (``cache`` itself for a single run, every
    part's for a merge). A result decoded in pass 1 is used for the slices the caps chose whenever it holds
    them all; only files it does not cover are decoded here.
    """
    out_dir = Path(settings.out_dir)
    classified = classify(((f.headers, f.reject) for f in per_file), settings.class_map)
    rejects = list(classified.rejects)

    capped = apply_caps(classified.headers, settings.caps, settings.seed)
    class_of = {(h.item.path, h.index): cls for h, cls in classified.headers}
    chosen = [(h, class_of[(h.item.path, h.index)]) for h in capped.chosen]
    rejects += over_cap_rejects(capped.over_cap, capped.chosen, settings.caps)

    guard_patients(
        PatientSighting(h.patient_id or "", h.item.dataset, settings.split_of[h.item.dataset], h.item.path)
        for h, _ in chosen
    )

    # A file decoded in pass 1 (here, by a part, or by an earlier run) serves the slices the caps chose when
    # it holds them all (restricted to them: the same entries decoding only those gives); the rest are
    # decoded now, only their chosen slices.
    wanted: dict[str, set[int]] = defaultdict(set)
    for h, _ in chosen:
        wanted[h.item.path].add(h.index)
    results: dict[str, tuple[str, dict[str, Any]]] = {}
    # pass 1's entries stay cached even where a cap left them unused: they hold the headers a rerun needs
    used_keys = {f.cache_key for f in per_file if f.cache_key is not None and f.decoded is not None}
    for f in per_file:
        if f.cache_key is None or f.decoded is None or not f.headers:
            continue
        path = f.headers[0].item.path
        if path in wanted and covers(f.decoded, wanted[path], {h.index for h in f.headers}):
            results[path] = (f.cache_key, only_slices(f.decoded, wanted[path]))
    del per_file
    remaining = [(h, cls) for h, cls in chosen if h.item.path not in results]
    results.update(run_decode_pass(decode_jobs(remaining, settings), cache, settings))
    if remaining:
        members.refresh()
    samples, decode_rejects = assemble_samples(chosen, results, settings)
    used_keys |= {key for key, _ in results.values()}
    del results  # per-slice histograms as JSON lists: the biggest thing held, no longer needed
    rejects += decode_rejects

    shard_dir = out_dir / "shards"
    clear_shards(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    written: list[WrittenSample] = []
    for split in SPLITS:
        ordered = shuffled(samples, split, settings.seed)
        shards = write_split(ordered, split, members, settings)
        histogram = np.zeros(256, dtype=np.int64)  # int64 holds 3.6e16 pixels: no overflow in practice
        for sample in ordered:
            histogram += sample.histogram
        stats[split] = histogram_stats(histogram)
        written += [
            WrittenSample(split, s.cls, s.meta["dataset"], s.meta["body_part"], s.path, s.meta["region"])
            for s in ordered
        ]
        splits[split] = {"shards": shards}

    for split in SPLITS:
        splits[split] = {**split_counts(written, split), **splits[split]}
    write_rejects(out_dir / REJECTS_NAME, [printable_reject(r) for r in rejects])
    if settings.charts:
        for split in SPLITS:
            plot_split(split, splits[split], settings.class_map.classes, out_dir / "charts" / f"{split}.png")
    summary = {
        "classes": list(settings.class_map.classes),
        "body_parts": list(settings.body_part_map.regions),
        "regions": list(settings.body_part_map.head_region_names),  # the body-part head's classes
        "image_size": settings.preprocess.image_size,
        "image_format": settings.image_format,
        "preprocess": {
            **settings.preprocess.to_dict(),
            "class_map": settings.class_map.to_dict(),
            "body_part_map": settings.body_part_map.to_dict(),
        },
        "seed": settings.seed,
        "pool": settings.pool_name,
        "split_map": dict(sorted(settings.split_of.items())),
        "caps": dict(settings.caps),
        "splits": splits,
        "stats": stats,
        "inputs": inputs_accounting(paths, written, rejects),
        "rejects": reason_counts(rejects),
    }
    path = write_summary(out_dir, summary)
    if settings.keep_work:
        cache.prune(keep=used_keys)
    else:
        shutil.rmtree(cache.directory, ignore_errors=True)
    return path


def printable_reject(reject: Reject) -> Reject:
    """A rejects.csv row that can be written as UTF-8 whatever the file's name (see :func:`printable`)."""
    return replace(
        reject,
        path=printable(reject.path),
        dataset=printable(reject.dataset),
        reason=printable(reject.reason),
        detail=printable(reject.detail),
    )
