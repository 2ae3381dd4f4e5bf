"""A streamed part: download a batch of IDC series, prepare it, delete the raw files, repeat.

A top-level module because it joins prepare's passes (``shards``) and the IDC downloader (``sources``).


The IDC's CT/MR/PET series hold 23 TB; no node has that disk, and a part needs its raw files only until they
are decoded. So a streamed part walks its share of the plan's series in batches whose raw files fit a budget
(files and/or MB), fetching each batch with the existing s5cmd downloader
(:func:`modality.sources.idc.download.download_plan`), running pass 1 with every slice decoded into the part's
work cache (the merge cannot go back to files that are gone), writing one journal per series (atomic: a
series is done once its journal exists) and deleting the batch's folders before the next batch is fetched.
A killed part rerun resumes at the first series without a journal; a series s5cmd could not complete is
fetched again by the rerun and named in the error until then.

The listing every part and the merge agree on is the plan's series (one :data:`SERIES_KIND` item each, its
weight the files it will hold), so the partition balances files, not series.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from modality.records import InputItem
from modality.shards.parts import (
    RECORD_NAME,
    SERIES_KIND,
    FileRecord,
    check_part,
    finish_part,
    listing_fingerprint,
    part_dir,
    part_settings,
    partition,
    read_records,
    settings_fingerprint,
    write_records,
)
from modality.shards.summary import Reject
from modality.sources.idc.download import (
    IDCDownloadSource,
    dicom_files,
    download_plan,
    fetched_files,
    is_complete,
    kept_counts,
    read_series_manifest,
    series_dir,
    series_items,
)

if TYPE_CHECKING:
    from modality.shards.build import BuildSettings

JOURNAL_DIR = "series"


@dataclass(frozen=True)
class StreamSettings:
    """How a streamed part fetches: the raw-file budget and the downloader's options."""

    budget_files: int | None = 20000  # most raw DICOM files the part holds at once (None: no file bound)
    budget_mb: float | None = None  # most raw MB (from the plan's series_size_MB; None: no size bound)
    endpoint_url: str | None = None  # an S3-compatible endpoint (tests: a local server); None: AWS
    s5cmd: str | None = None
    download_workers: int = 32
    sample_instances: bool = False  # fetch only images_kept objects of a thinned series (download.py)
    # a series s5cmd cannot complete: False fails the part (a rerun fetches it again); True records it as
    # one rejected input ("download incomplete") so the part and the merge can finish without it
    skip_incomplete: bool = False

    def __post_init__(self) -> None:
        if self.budget_files is None and self.budget_mb is None:
            raise ValueError("a streamed part needs a budget: stream.budget_files and/or stream.budget_mb")


def series_listing(sources: Sequence[IDCDownloadSource], sample_instances: bool) -> list[InputItem]:
    """One item per planned series of every source (sorted like :class:`IDCDownloadSource` lists files):
    the listing a streamed part partitions and the merge checks."""
    items = []
    for source in sources:
        if not isinstance(source, IDCDownloadSource) or source.manifest is None:
            raise ValueError(
                "stream.enabled=true needs a pool whose sources are IDCDownloadSource with a plan manifest "
                f"(configs/dataset/idc_plan.yaml), got {type(source).__name__}"
            )
        table = read_series_manifest(source.manifest)
        files = fetched_files(table, sample_instances)
        # MB on disk (NaN where the plan gives no size: only a MB budget needs it)
        sizes = (
            table["series_size_MB"] if "series_size_MB" in table else pd.Series(math.nan, index=table.index)
        )
        mb = sizes.to_numpy(dtype=float) * files / np.maximum(table["images"].to_numpy(), 1)
        for n, row in enumerate(table.itertuples(index=False)):
            directory = series_dir(source.root, row.collection_id, row.PatientID, row.SeriesInstanceUID)
            items.append(
                InputItem(
                    path=str(directory),
                    dataset=str(row.collection_id),
                    kind=SERIES_KIND,
                    patient_id=str(row.PatientID),
                    series_uid=str(row.SeriesInstanceUID),
                    extra={
                        "files": int(files[n]),
                        "mb": float(mb[n]),
                        "manifest": str(source.manifest),
                    },
                )
            )
    return sorted(items, key=lambda item: (item.dataset, item.path))


def batches_within_budget(series: Sequence[InputItem], stream: StreamSettings) -> list[list[InputItem]]:
    """Consecutive batches whose files (and MB) stay within the budget. A series bigger than the budget on its
    own cannot be streamed within it: a ValueError names it and the budget that would fit it."""
    out: list[list[InputItem]] = []
    batch: list[InputItem] = []
    files, mb = 0, 0.0
    for item in series:
        n, size = int(item.extra["files"]), float(item.extra["mb"])
        if stream.budget_mb is not None and not math.isfinite(size):
            raise ValueError(
                f"series {item.series_uid} has no series_size_MB in its plan: stream.budget_mb cannot bound it "
                "(use stream.budget_files)"
            )
        if (stream.budget_files is not None and n > stream.budget_files) or (
            stream.budget_mb is not None and size > stream.budget_mb
        ):
            raise ValueError(
                f"series {item.series_uid} of {item.dataset} holds {n} files ({size:.1f} MB), more than the "
                f"raw-file budget (stream.budget_files={stream.budget_files}, stream.budget_mb="
                f"{stream.budget_mb}): raise the budget to at least that"
            )
        over_files = stream.budget_files is not None and files + n > stream.budget_files
        over_mb = stream.budget_mb is not None and mb + size > stream.budget_mb
        if batch and (over_files or over_mb):
            out.append(batch)
            batch, files, mb = [], 0, 0.0
        batch.append(item)
        files += n
        mb += size
    if batch:
        out.append(batch)
    return out


def _journal_path(folder: Path, series_uid: str) -> Path:
    """One file per series, named by a hash of its UID (two UIDs that differ only in characters a file name
    cannot hold must not share a journal)."""
    return folder / JOURNAL_DIR / f"{hashlib.sha1(series_uid.encode()).hexdigest()}.jsonl"


def _journal_head(series: InputItem, settings: str) -> dict[str, str]:
    """What a series' journal was made for: the planned series (its files, size, manifest) and the part
    settings. A journal made for anything else is redone, never merged."""
    return {
        "series_uid": str(series.series_uid),
        "series": listing_fingerprint([series]),
        "settings": settings,
    }


def _read_journal(folder: Path, series: InputItem, settings: str) -> list[FileRecord] | None:
    """A finished series' file records, or None: no journal, a damaged one, or one made for another plan row
    or other part settings (then the series is fetched and prepared again)."""
    found = read_records(_journal_path(folder, str(series.series_uid)))
    if found is None or any(found[0].get(k) != v for k, v in _journal_head(series, settings).items()):
        return None
    return found[1]


#: Written into a series folder before this part fetches it: only folders so marked are deleted (an earlier
#: `idc_download` into the same root keeps its series), including ones a killed run left behind.
FETCHED_MARK = ".fetched-by-streamed-prepare"


def incomplete_series_record(series: InputItem) -> FileRecord:
    """A series s5cmd could not complete, as one rejected input (its folder), so the merge accounts for it."""
    item = InputItem(
        path=series.path,
        dataset=series.dataset,
        kind="dicom",
        patient_id=series.patient_id,
        series_uid=series.series_uid,
    )
    detail = f"s5cmd could not fetch every object of series {series.series_uid} (stream.skip_incomplete=true)"
    return FileRecord(item, [], Reject(item.path, item.dataset, None, "download incomplete", detail), None)


def stream_part(
    sources: Sequence[IDCDownloadSource],
    settings: BuildSettings,
    part: int,
    parts: int,
    stream: StreamSettings,
) -> Path:
    """Download, prepare and delete part ``part`` of ``parts`` of the plan's series, a budget at a time; then
    write the part's record for the merge. Returns the record's path."""
    from modality.locks import folder_lock
    from modality.shards.build import first_pass, start_output
    from modality.shards.work import WorkCache

    part, parts = check_part(part, parts)
    listing = series_listing(sources, stream.sample_instances)
    out_dir = start_output(listing, settings)
    folder = part_dir(out_dir, part, parts)
    mine = [listing[i] for i in partition(listing, parts)[part]]
    manifests = {str(s.manifest): read_series_manifest(s.manifest) for s in sources}
    roots = {str(s.manifest): Path(s.root) for s in sources}
    counts: dict[str, int] = {}
    for table in manifests.values():
        counts.update(kept_counts(table))
    fingerprint = settings_fingerprint(part_settings(settings))
    with folder_lock(folder):
        (folder / RECORD_NAME).unlink(missing_ok=True)
        (folder / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
        cache = WorkCache(folder / "work")
        cache.clean_temporaries()
        todo = []
        for item in mine:
            if _read_journal(folder, item, fingerprint) is None:
                todo.append(item)
            elif (Path(item.path) / FETCHED_MARK).is_file():  # prepared, but a kill came before the delete
                shutil.rmtree(item.path, ignore_errors=True)
        peak, incomplete = 0, []
        everything = ({i.dataset for i in listing}, frozenset(settings.class_map.classes))
        for batch in batches_within_budget(todo, stream):
            by_manifest: dict[str, list[str]] = {}
            for item in batch:
                by_manifest.setdefault(str(item.extra["manifest"]), []).append(str(item.series_uid))
                if not is_complete(Path(item.path)):  # this part fetches it, so this part deletes it
                    Path(item.path).mkdir(parents=True, exist_ok=True)
                    (Path(item.path) / FETCHED_MARK).touch()
            for manifest, uids in by_manifest.items():
                table = manifests[manifest]
                report = download_plan(
                    table[table["SeriesInstanceUID"].astype(str).isin(uids)],
                    roots[manifest],
                    endpoint_url=stream.endpoint_url,
                    workers=stream.download_workers,
                    s5cmd=stream.s5cmd,
                    sample_instances=stream.sample_instances,
                    run_dir=folder,
                )
                incomplete += report.incomplete
            peak = max(peak, sum(len(dicom_files(Path(item.path))) for item in batch))
            files: list[InputItem] = []
            series_of: list[str] = []
            for item in batch:
                listed = series_items(Path(item.path), counts) if is_complete(Path(item.path)) else None
                files.extend(listed or [])
                series_of.extend([str(item.series_uid)] * len(listed or []))
            per_file = first_pass(files, cache, settings, decode=everything)
            by_series: dict[str, list[FileRecord]] = {}
            for uid, file_item, result in zip(series_of, files, per_file, strict=True):
                key = result.cache_key if result.decoded is not None else None
                by_series.setdefault(uid, []).append(
                    FileRecord(file_item, result.headers, result.reject, key)
                )
            for item in batch:
                uid = str(item.series_uid)
                if uid in incomplete:
                    if not stream.skip_incomplete:
                        continue
                    records = [incomplete_series_record(item)]
                else:
                    records = by_series.get(uid, [])
                head = {**_journal_head(item, fingerprint), "files": len(records)}
                write_records(_journal_path(folder, uid), head, records)
            for item in batch:  # the raw files this part fetched go before the next batch is fetched
                if (Path(item.path) / FETCHED_MARK).is_file():
                    shutil.rmtree(item.path, ignore_errors=True)
        if incomplete and not stream.skip_incomplete:
            raise RuntimeError(
                f"{len(incomplete)} series of part {part} could not be fetched completely (e.g. "
                f"{incomplete[:3]}): rerun the same part to fetch them again (finished series are kept), or set "
                "stream.skip_incomplete=true to record them as rejected inputs"
            )
        records: list[FileRecord] = []
        for item in mine:
            journal = _read_journal(folder, item, fingerprint)
            assert journal is not None  # every series of the part was journalled above or before
            records.extend(journal)
        path = finish_part(
            folder,
            cache,
            settings,
            part,
            parts,
            listing,
            records,
            units=sorted(str(item.series_uid) for item in mine),
            peak_raw_files=peak,
            budget_files=stream.budget_files,
            budget_mb=stream.budget_mb,
        )
    return path
