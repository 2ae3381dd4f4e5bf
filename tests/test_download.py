"""Downloads end to end with no internet: a tiny IDC-shaped index, DICOM files in moto's S3 server on loopback."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from modality.shards.sampling import spread_evenly
from modality.sources.idc.download import (
    MARKER_NAME,
    S5CMD_MANIFEST_NAME,
    IDCDownloadSource,
    path_component,
    read_series_manifest,
    series_dir,
)

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")
if shutil.which("s5cmd") is None:
    pytest.skip("s5cmd is not installed", allow_module_level=True)


def ct_slice_bytes(patient_id: str, study_uid: str, series_uid: str, instance: int) -> bytes:
    """A small but valid CT image (8x8 signed HU), as IDC would store it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = instance
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    # a gradient unique to (patient, instance): prepare drops blank slices and duplicate pixels
    offset = sum(map(ord, patient_id)) + 100 * instance
    ds.PixelData = (np.arange(64, dtype=np.int16).reshape(8, 8) * 3 + offset).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


SERIES = [
    # collection, patient (with a space and a slash: path-unsafe), n instances, kept by the plan, bucket
    ("coll_a", "PAT 001", 4, 4, "idc-open-data"),
    ("coll_a", "PAT/002", 3, 3, "idc-open-data"),
    ("coll_b", "B-01", 10, 3, "idc-open-data-two"),
]


@pytest.fixture
def bucket_and_manifest(s3_client, tmp_path):
    """Upload the series to the fake buckets; write a plan manifest shaped like the planner's."""
    client = s3_client
    rows = []
    objects: dict[str, tuple[str, str, bytes]] = {}
    for collection, patient, count, kept, bucket in SERIES:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        study, series = generate_uid(), generate_uid()
        prefix = f"{generate_uid(prefix=None).replace('.', '')[:8]}-{len(rows)}"
        for instance in range(1, count + 1):
            key = f"{prefix}/{generate_uid(prefix=None)[:12]}{instance}.dcm"
            body = ct_slice_bytes(patient, study, series, instance)
            client.put_object(Bucket=bucket, Key=key, Body=body, ACL="public-read")
            objects[f"{series}/{instance}"] = (bucket, key, body)
        rows.append(
            {
                "SeriesInstanceUID": series,
                "collection_id": collection,
                "PatientID": patient,
                "split": "train" if collection == "coll_a" else "test",
                "class": "CT",
                "Modality": "CT",
                "body_part": "chest",
                "images": count,
                "images_kept": kept,
                "slice_step": max(count // kept, 1),
                "series_size_MB": 0.01 * count,
                "series_aws_url": f"s3://{bucket}/{prefix}/*",
            }
        )
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    pd.DataFrame(rows).to_csv(plan_dir / "series_manifest.csv", index=False)
    return client, plan_dir, rows, objects


def run_download(plan_dir: Path, out: Path, endpoint: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "modality.commands.idc_download",
            f"plan={plan_dir}",
            f"out={out}",
            f"endpoint_url={endpoint}",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_download_fetches_the_layout_then_resumes_only_what_is_missing(
    bucket_and_manifest, s3_endpoint, tmp_path
):
    _, plan_dir, rows, _ = bucket_and_manifest
    out = tmp_path / "dicom dir"  # a space in the destination must survive s5cmd's run-file parser

    dry = run_download(plan_dir, out, s3_endpoint, "dry_run=true")
    assert dry.returncode == 0, dry.stderr
    assert "3 to fetch" in dry.stdout and "GB" in dry.stdout
    assert len((out / S5CMD_MANIFEST_NAME).read_text().splitlines()) == 3
    assert not list(out.glob("*/*/*/*.dcm"))

    first = run_download(plan_dir, out, s3_endpoint)
    assert first.returncode == 0, first.stderr
    for row in rows:
        directory = series_dir(out, row["collection_id"], row["PatientID"], row["SeriesInstanceUID"])
        assert directory.parent.name == path_component(row["PatientID"])
        files = sorted(directory.glob("*.dcm"))
        assert len(files) == row["images"]
        assert (directory / MARKER_NAME).is_file()
        assert pydicom.dcmread(files[0]).SeriesInstanceUID == row["SeriesInstanceUID"]

    # resume: a complete series is skipped; a series that lost a file and its marker is fetched again
    broken = series_dir(out, rows[0]["collection_id"], rows[0]["PatientID"], rows[0]["SeriesInstanceUID"])
    (broken / MARKER_NAME).unlink()
    sorted(broken.glob("*.dcm"))[0].unlink()
    second = run_download(plan_dir, out, s3_endpoint)
    assert second.returncode == 0, second.stderr
    assert "2 already complete, 1 to fetch" in second.stdout
    assert len((out / S5CMD_MANIFEST_NAME).read_text().splitlines()) == 1
    assert len(list(broken.glob("*.dcm"))) == rows[0]["images"] and (broken / MARKER_NAME).is_file()

    third = run_download(plan_dir, out, s3_endpoint)
    assert "3 already complete, 0 to fetch" in third.stdout


def test_missing_objects_leave_the_series_incomplete_until_a_rerun(
    bucket_and_manifest, s3_endpoint, tmp_path
):
    client, plan_dir, rows, objects = bucket_and_manifest
    target = rows[2]
    bucket, key, body = objects[f"{target['SeriesInstanceUID']}/5"]
    client.delete_object(Bucket=bucket, Key=key)
    out = tmp_path / "out"
    failed = run_download(plan_dir, out, s3_endpoint)
    assert failed.returncode == 1
    assert target["SeriesInstanceUID"] in failed.stderr
    directory = series_dir(out, target["collection_id"], target["PatientID"], target["SeriesInstanceUID"])
    assert not (directory / MARKER_NAME).exists()
    client.put_object(Bucket=bucket, Key=key, Body=body, ACL="public-read")
    resumed = run_download(plan_dir, out, s3_endpoint)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 already complete, 1 to fetch" in resumed.stdout


def test_download_source_lists_complete_series_with_the_plans_sampling(
    bucket_and_manifest, s3_endpoint, tmp_path
):
    _, plan_dir, rows, _ = bucket_and_manifest
    out = tmp_path / "out"
    assert run_download(plan_dir, out, s3_endpoint).returncode == 0
    # a leftover partial series without a marker is not listed
    (out / "coll_b" / "X" / "1.2.3").mkdir(parents=True)
    items = IDCDownloadSource(out, manifest=plan_dir / "series_manifest.csv").items()
    by_series: dict[str, list] = {}
    for item in items:
        by_series.setdefault(item.series_uid, []).append(item)
    assert {item.dataset for item in items} == {"coll_a", "coll_b"}
    assert all(item.kind == "dicom" for item in items)
    for row in rows:
        listed = by_series[row["SeriesInstanceUID"]]
        assert len(listed) == row["images_kept"]
        assert {item.patient_id for item in listed} == {row["PatientID"]}  # the original id, not the dir name
    # the 10-slice series keeps 3 slices spread along InstanceNumber, not the first 3
    sampled = sorted(
        int(pydicom.dcmread(item.path).InstanceNumber) for item in by_series[rows[2]["SeriesInstanceUID"]]
    )
    assert sampled == [i + 1 for i in spread_evenly(10, 3)] == [2, 6, 9]
    # without the manifest every complete file is listed
    assert len(IDCDownloadSource(out).items()) == sum(row["images"] for row in rows)


def test_manifest_validation_and_evenly_spaced_indices(tmp_path) -> None:
    bad = tmp_path / "series_manifest.csv"
    pd.DataFrame({"SeriesInstanceUID": ["1"], "collection_id": ["c"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="lacks columns"):
        read_series_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"modality\.commands\.idc_plan"):
        read_series_manifest(tmp_path / "nowhere")
    assert spread_evenly(5, 10) == [0, 1, 2, 3, 4]
    assert spread_evenly(100, 4) == [12, 37, 62, 87]
    assert path_component("PAT/001 x") == "PAT_001_x"
    with pytest.raises(ValueError):
        path_component("..")


def test_downloaded_plan_prepares_into_shards(bucket_and_manifest, s3_endpoint, tmp_path) -> None:
    """The whole chain: plan manifest -> download -> IDCDownloadSource (configs/dataset/idc_plan.yaml) -> shards."""
    import json

    from modality.prepare import build_in_subprocess

    _, plan_dir, rows, _ = bucket_and_manifest
    data_dir = tmp_path / "data"
    (data_dir / "idc" / "plan").mkdir(parents=True)
    shutil.copy(plan_dir / "series_manifest.csv", data_dir / "idc" / "plan" / "series_manifest.csv")
    assert run_download(data_dir / "idc" / "plan", data_dir / "idc" / "dicom", s3_endpoint).returncode == 0
    out = tmp_path / "prepared"
    build_in_subprocess(
        "idc_plan",
        out,
        overrides=[
            f"paths.data_dir={data_dir}",
            "++dataset.split.coll_a=train",
            "++dataset.split.coll_b=test",
            "progress=false",
            "charts=false",
        ],
    )
    summary = json.loads((out / "summary.json").read_text())
    kept = {split: sum(r["images_kept"] for r in rows if r["split"] == split) for split in ("train", "test")}
    assert summary["splits"]["train"]["by_class"] == {"CT": kept["train"]}
    assert summary["splits"]["test"]["by_class"] == {"CT": kept["test"]}
    assert summary["inputs"]["rejected_files"] == 0


def test_sample_instances_fetches_only_the_kept_objects(bucket_and_manifest, s3_endpoint, tmp_path) -> None:
    _, plan_dir, rows, _ = bucket_and_manifest
    out = tmp_path / "out"
    dry = run_download(plan_dir, out, s3_endpoint, "dry_run=true", "sample_instances=true")
    assert dry.returncode == 0, dry.stderr
    run_file = (out / S5CMD_MANIFEST_NAME).read_text()
    assert run_file.count("cp ") == 2 and run_file.count("ls ") == 1  # the 10-slice series keeps 3
    fetched = run_download(plan_dir, out, s3_endpoint, "sample_instances=true")
    assert fetched.returncode == 0, fetched.stderr
    thinned = rows[2]
    directory = series_dir(out, thinned["collection_id"], thinned["PatientID"], thinned["SeriesInstanceUID"])
    assert len(list(directory.glob("*.dcm"))) == thinned["images_kept"] == 3
    assert (directory / MARKER_NAME).is_file()
    items = IDCDownloadSource(out, manifest=plan_dir / "series_manifest.csv").items()
    assert len(items) == sum(row["images_kept"] for row in rows)
    again = run_download(plan_dir, out, s3_endpoint, "sample_instances=true")
    assert "3 already complete, 0 to fetch" in again.stdout
