"""Folder and manifest sources list what they should, label it from config, and feed prepare end to end."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modality.labels import BodyPartMap, ClassMap
from modality.shards.build import BuildSettings, build_shards
from modality.sources.folders import DicomFolderSource, ImageFolderSource, VolumeSource
from modality.sources.manifest import PRE_REJECTED, ManifestSource, current_rows, dataset_name


def write_png(path: Path, seed: int, size: int = 40, bits: int = 8) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        Image.fromarray(rng.integers(0, 65535, (size, size)).astype(np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (size, size)).astype(np.uint8), mode="L").save(path)
    return path


def test_dicom_folder_walks_recursively_in_sorted_order_and_skips_non_dicom(tmp_path: Path) -> None:
    for rel in ("b/IM0002", "a/x y/IM0001.dcm", "a/readme.txt", "a/.hidden/IM9", "c/thumb.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    items = DicomFolderSource(tmp_path, "site").items()
    assert [Path(i.path).relative_to(tmp_path).as_posix() for i in items] == ["a/x y/IM0001.dcm", "b/IM0002"]
    assert all(i.kind == "dicom" and i.label is None and i.dataset == "site" for i in items)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DicomFolderSource(tmp_path / "nope", "site").items()


def test_image_folder_labels_from_subfolders_or_csv(tmp_path: Path) -> None:
    write_png(tmp_path / "xr/chest1.png", 1)
    write_png(tmp_path / "unknown/img.png", 2)
    by_folder = ImageFolderSource(tmp_path, "coll", labels={"xr": "XR"}).items()
    assert {Path(i.path).name: i.label for i in by_folder} == {"chest1.png": "XR", "img.png": None}
    table = tmp_path / "meta.csv"
    table.write_text("path,class,patient_id,body_part\nxr/chest1.png,XR,P9,CHEST\n")
    by_csv = {Path(i.path).name: i for i in ImageFolderSource(tmp_path, "coll", metadata_csv=table).items()}
    assert by_csv["chest1.png"].label == "XR" and by_csv["chest1.png"].patient_id == "P9"
    assert by_csv["chest1.png"].body_part == "CHEST"
    assert by_csv["img.png"].label is None and by_csv["img.png"].patient_id == "coll:unknown/img.png"


def test_image_folder_needs_exactly_one_labelling(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ImageFolderSource(tmp_path, "coll")
    with pytest.raises(ValueError, match="exactly one"):
        ImageFolderSource(tmp_path, "coll", label="XR", labels={"a": "XR"})


def settings(out_dir: Path, split: dict[str, str]) -> BuildSettings:
    return BuildSettings(
        out_dir=out_dir,
        split_of=split,
        class_map=ClassMap.default(),
        body_part_map=BodyPartMap.default(),
        preprocess={"image_size": 24, "aspect": "pad", "scaling": {"method": "minmax"}, "colour": "grey"},
        workers=0,
        progress=False,
        charts=False,
    )


def test_images_and_volumes_become_samples(tmp_path: Path) -> None:
    write_png(tmp_path / "xr/a.png", 1)
    write_png(tmp_path / "xr/b.png", 2, bits=16)
    write_png(tmp_path / "xr/odd/c.png", 3)
    (tmp_path / "xr/odd/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "vol").mkdir()
    np.save(
        tmp_path / "vol/ct1.npy", np.random.default_rng(0).integers(-1000, 1000, (20, 30, 5)).astype(np.int16)
    )
    items = ImageFolderSource(tmp_path / "xr", "xr_coll", label="XR", body_part="CHEST").items()
    items += VolumeSource(tmp_path / "vol", "vols", label="CT", slice_axis=2).items()
    build_shards(items, settings(tmp_path / "out", {"xr_coll": "train", "vols": "train"}))
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["splits"]["train"]["by_dataset"] == {"vols": {"CT": 5}, "xr_coll": {"XR": 3}}
    assert summary["inputs"]["rejected_files"] == 1
    assert "broken.png" in (tmp_path / "out/rejects.csv").read_text()
    with tarfile.open(tmp_path / "out/shards/train-000000.tar") as tar:
        pngs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")]
    assert {np.asarray(Image.open(io.BytesIO(p))).shape for p in pngs} == {(24, 24)}


def test_manifest_rows_collapse_to_the_file_on_disk() -> None:
    rows = [
        {"path": "a.dcm", "note": "older blob version of this path", "usable": "0"},
        {"path": "a.dcm", "note": "current", "usable": "1"},
        {"path": "b.dcm", "note": "", "usable": "1"},
    ]
    assert [(r["path"], r["note"]) for r in current_rows(rows)] == [("a.dcm", "current"), ("b.dcm", "")]
    assert dataset_name("OHIF/viewer-testdata-dicomweb") == "OHIF+viewer-testdata-dicomweb"


def test_manifest_source_labels_and_pre_rejects(tmp_path: Path) -> None:
    fields = [
        "path",
        "kind",
        "class",
        "modality",
        "body_part",
        "patient_id",
        "series_uid",
        "usable",
        "source_repo",
        "note",
    ]
    rows = [
        ["dicom/o+r/ct.dcm", "dicom", "CT", "CT", "CHEST", "P1", "S1", "1", "o/r", ""],
        ["dicom/o+r/us.dcm", "dicom", "other", "US", "", "P1", "S2", "0", "o/r", "ultrasound"],
        ["dicom/o+r/phantom.dcm", "dicom", "CT", "CT", "", "", "", "0", "o/r", "phantom"],
        ["xray/x+y/1.png", "xray", "XR", "X-ray / filename prefix CR", "CHEST", "", "", "1", "x/y", ""],
    ]
    with (tmp_path / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerows(rows)
    items = {Path(i.path).name: i for i in ManifestSource(tmp_path).items()}
    assert (
        items["ct.dcm"].label == "CT" and items["ct.dcm"].dataset == "o+r" and items["ct.dcm"].kind == "dicom"
    )
    assert items["us.dcm"].label is None and PRE_REJECTED not in items["us.dcm"].extra  # its header decides
    assert items["phantom.dcm"].extra[PRE_REJECTED] == {
        "reason": "marked unusable in manifest",
        "detail": "phantom",
    }
    assert items["1.png"].kind == "image" and items["1.png"].modality == "XR"
    assert items["1.png"].patient_id == "x+y:xray/x+y/1.png"
    only = ManifestSource(tmp_path, datasets=["x+y"]).items()
    assert [i.dataset for i in only] == ["x+y"]
    with pytest.raises(ValueError, match="no files for datasets"):
        ManifestSource(tmp_path, datasets=["nope"]).items()


def test_constant_and_non_finite_slices_are_rejected_per_slice(tmp_path: Path) -> None:
    volume = np.random.default_rng(1).normal(size=(16, 16, 4)).astype(np.float32)
    volume[:, :, 1] = 7.0
    volume[:, :, 2] = np.nan
    volume[0, 0, 3] = np.inf  # one bad pixel does not make a slice unusable
    (tmp_path / "vol").mkdir()
    np.save(tmp_path / "vol/mr.npy", volume)
    items = VolumeSource(tmp_path / "vol", "vols", label="MR").items()
    build_shards(items, settings(tmp_path / "out", {"vols": "train"}))
    with (tmp_path / "out/rejects.csv").open() as handle:
        rows = {(r["index"], r["reason"]) for r in csv.DictReader(handle)}
    assert rows == {("1", "blank slice"), ("2", "empty slice")}
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["splits"]["train"]["samples"] == 2
    assert summary["inputs"]["partly_rejected_files"] == 1
