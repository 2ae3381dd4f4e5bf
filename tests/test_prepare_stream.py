"""Streamed parts: download a batch of IDC series, prepare it, delete it; never more raw files than the budget.

No internet: the series live in moto's S3 server on loopback, fetched by the real s5cmd, as in
tests/test_download.py. The merged result must equal a plain run over the same series downloaded whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from pydicom.uid import generate_uid

from modality.prepare import is_prepared
from modality.records import InputItem
from modality.shards.parts import PARTS_DIR, SERIES_KIND, read_record
from modality.streaming import StreamSettings, batches_within_budget

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")
from test_download import ct_slice_bytes  # noqa: E402  (and skips this module where s5cmd is missing)

BUDGET = 6
SERIES = [  # collection, patient, instances (ids whose letters sum apart: the pixels differ)
    ("coll_a", "A1", 2),
    ("coll_a", "A2", 3),
    ("coll_a", "A3", 4),
    ("coll_b", "B4", 5),
    ("coll_b", "B5", 2),
    ("coll_b", "B6", 6),
]


def series_item(uid: str, files: int) -> InputItem:
    return InputItem(
        path=f"/r/c/p/{uid}", dataset="c", kind=SERIES_KIND, series_uid=uid, extra={"files": files, "mb": 0.0}
    )


def test_batches_fill_the_budget_and_refuse_a_series_that_cannot_fit() -> None:
    items = [series_item(str(i), n) for i, n in enumerate([2, 3, 4, 5, 2, 6])]
    batches = batches_within_budget(items, StreamSettings(budget_files=6))
    assert [[int(i.series_uid) for i in b] for b in batches] == [[0, 1], [2], [3], [4], [5]]
    assert all(sum(i.extra["files"] for i in b) <= 6 for b in batches)
    with pytest.raises(ValueError, match="more than the raw-file budget"):
        batches_within_budget([series_item("big", 7)], StreamSettings(budget_files=6))
    with pytest.raises(ValueError, match="needs a budget"):
        StreamSettings(budget_files=None, budget_mb=None)
    unsized = InputItem(
        path="/r/c/p/u", dataset="c", kind=SERIES_KIND, series_uid="u", extra={"files": 1, "mb": float("nan")}
    )
    with pytest.raises(ValueError, match="no series_size_MB"):
        batches_within_budget([unsized], StreamSettings(budget_files=None, budget_mb=10.0))
    assert batches_within_budget([unsized], StreamSettings(budget_files=5)) == [[unsized]]


@pytest.fixture(scope="module")
def plan(s3_client, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("stream")
    client = s3_client
    client.create_bucket(Bucket="idc-stream")
    rows, objects = [], {}
    for n, (collection, patient, count) in enumerate(SERIES):
        study, series = generate_uid(), generate_uid()
        for instance in range(1, count + 1):
            key = f"s{n}/{instance:03d}.dcm"
            body = ct_slice_bytes(patient, study, series, instance)
            client.put_object(Bucket="idc-stream", Key=key, Body=body, ACL="public-read")
            objects[(n, instance)] = (key, body)
        rows.append(
            {
                "SeriesInstanceUID": series,
                "collection_id": collection,
                "PatientID": patient,
                "split": "train" if collection == "coll_a" else "test",
                "images": count,
                "images_kept": count,
                "series_size_MB": 0.001 * count,
                "series_aws_url": f"s3://idc-stream/s{n}/*",
            }
        )
    (base / "plan").mkdir()
    pd.DataFrame(rows).to_csv(base / "plan" / "series_manifest.csv", index=False)
    conf = base / "conf" / "dataset"
    conf.mkdir(parents=True)
    (conf / "idcstream.yaml").write_text(
        "name: idcstream\nsources:\n"
        "  - _target_: modality.sources.idc.download.IDCDownloadSource\n"
        f"    root: {base / 'raw'}\n"
        f"    manifest: {base / 'plan' / 'series_manifest.csv'}\n"
        "split:\n  coll_a: train\n  coll_b: test\n",
        encoding="utf-8",
    )
    return base, client, objects


def prepare(base: Path, out: Path, endpoint: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "modality.prepare",
        f"hydra.searchpath=[file://{base / 'conf'}]",
        "dataset=idcstream",
        f"out_dir={out}",
        "image_size=16",
        "workers=0",
        "progress=false",
        "charts=false",
        f"stream.endpoint_url={endpoint}",
        f"stream.budget_files={BUDGET}",
        "stream.download_workers=4",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


class RawWatcher:
    """Counts the raw DICOM files on disk every few milliseconds while a part runs; keeps the peak."""

    def __init__(self, root: Path) -> None:
        self.root, self.peak, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):  # a folder deleted while walked
                self.peak = max(self.peak, sum(1 for _ in self.root.rglob("*.dcm")))
            time.sleep(0.002)

    def __enter__(self) -> RawWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def hashes(out: Path) -> dict[str, str]:
    files = [*sorted((out / "shards").iterdir()), out / "summary.json", out / "rejects.csv"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_streamed_parts_stay_within_the_budget_resume_per_series_and_merge_to_a_plain_run(
    plan, s3_endpoint
) -> None:
    base, client, objects = plan
    out = base / "streamed"
    # one object missing from the bucket: its series stays incomplete, the part fails naming the rerun
    key, body = objects[(5, 3)]
    client.delete_object(Bucket="idc-stream", Key=key)
    peaks = []
    for part in (0, 1):
        with RawWatcher(base / "raw") as watcher:
            proc = prepare(base, out, s3_endpoint, "stream.enabled=true", "parts=2", f"part={part}")
        peaks.append(watcher.peak)
        if proc.returncode != 0:
            failed = part
            assert "could not be fetched completely" in proc.stderr and "rerun the same part" in proc.stderr
    assert max(peaks) <= BUDGET and max(peaks) > 0
    journals = {p.name: p.stat().st_mtime_ns for p in (out / PARTS_DIR).glob("*/series/*.jsonl")}
    assert len(journals) == len(SERIES) - 1  # every series but the broken one is done
    assert prepare(base, out, s3_endpoint, "stream.enabled=true", "parts=2", "merge=true").returncode != 0

    client.put_object(Bucket="idc-stream", Key=key, Body=body, ACL="public-read")
    with RawWatcher(base / "raw") as watcher:
        rerun = prepare(base, out, s3_endpoint, "stream.enabled=true", "parts=2", f"part={failed}")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert watcher.peak == 6  # only the series that failed was fetched again
    after = {p.name: p.stat().st_mtime_ns for p in (out / PARTS_DIR).glob("*/series/*.jsonl")}
    assert {k: v for k, v in after.items() if k in journals} == journals  # finished series not redone
    head, _ = read_record(out / PARTS_DIR / f"{failed:04d}-of-0002")
    assert head["peak_raw_files"] <= BUDGET
    assert not list((base / "raw").rglob("*.dcm"))  # raw files deleted once prepared

    merged = prepare(base, out, s3_endpoint, "stream.enabled=true", "parts=2", "merge=true")
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert is_prepared(out)

    # the same series downloaded whole, prepared in one plain run: the same bytes
    download = subprocess.run(
        [
            sys.executable,
            "-m",
            "modality.commands.idc_download",
            f"plan={base / 'plan'}",
            f"out={base / 'raw'}",
            f"endpoint_url={s3_endpoint}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert download.returncode == 0, download.stderr
    plain = prepare(base, base / "plain", s3_endpoint)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert hashes(out) == hashes(base / "plain")

    # series a user downloaded into the root are read by a streamed part, never deleted by it
    downloaded = sorted(base.joinpath("raw").rglob("*.dcm"))
    again = prepare(base, base / "again", s3_endpoint, "stream.enabled=true", "parts=1", "part=0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(base.joinpath("raw").rglob("*.dcm")) == downloaded


def test_a_series_that_cannot_be_fetched_can_be_recorded_as_a_rejected_input(plan, s3_endpoint) -> None:
    """stream.skip_incomplete=true: the part and the merge finish, and the series is a rejects.csv row, not a
    silent gap."""
    import csv
    import json
    import shutil

    base, client, objects = plan
    shutil.rmtree(base / "raw", ignore_errors=True)  # nothing downloaded: every series is streamed
    key, body = objects[(0, 1)]
    client.delete_object(Bucket="idc-stream", Key=key)
    try:
        out = base / "skipping"
        part = prepare(
            base, out, s3_endpoint, "stream.enabled=true", "stream.skip_incomplete=true", "parts=1", "part=0"
        )
        assert part.returncode == 0, part.stderr[-2000:]
        merged = prepare(base, out, s3_endpoint, "stream.enabled=true", "parts=1", "merge=true")
        assert merged.returncode == 0, merged.stderr[-2000:]
    finally:
        client.put_object(Bucket="idc-stream", Key=key, Body=body, ACL="public-read")
    with (out / "rejects.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["reason"] == "download incomplete"]
    assert len(rows) == 1 and rows[0]["dataset"] == "coll_a"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["slices_written"] == sum(n for _, _, n in SERIES) - SERIES[0][2]
    assert not list((base / "raw").rglob("*.dcm"))  # the partial download went too
