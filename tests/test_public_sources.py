"""Sources for the reference study's public datasets, each on a tiny fixture built in its published layout."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from modality.labels import BodyPartMap
from modality.paths import shared_data_root
from modality.records import InputItem
from modality.sources.manifest import PRE_REJECTED
from modality.sources.public.brats import BraTS2020Source
from modality.sources.public.chexpert import CheXpertSource
from modality.sources.public.mrnet import MRNetSource
from modality.sources.public.mura import MURASource
from modality.sources.public.nih_chestxray14 import NIHChestXray14Source
from modality.sources.public.oai import OAISource
from modality.sources.public.rsna_boneage import RSNABoneAgeSource

BODY_PARTS = BodyPartMap.default()


def write_image(path: Path, size: tuple[int, int] = (12, 10), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(size[0] * size[1]) % 251).astype(np.uint8).reshape(size[1], size[0])
    Image.fromarray(pixels).convert(mode).save(path)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_mr_dicom(path: Path, patient_id: str, modality: str = "MR", body_part: str = "KNEE") -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype=np.uint16).reshape(8, 8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def read_all_headers(items: list[InputItem]) -> int:
    """Slices the project's readers find in the items (skipping pre-rejected ones), or skip before they exist."""
    readers = pytest.importorskip("modality.readers")
    return sum(len(readers.read_headers(item)) for item in items if PRE_REJECTED not in item.extra)


def test_chexpert_reads_both_tables_and_resolves_paths(tmp_path) -> None:
    root = tmp_path / "CheXpert-v1.0-small"
    listed = [
        ("train", "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"),
        ("train", "CheXpert-v1.0-small/train/patient00001/study2/view1_lateral.jpg"),
        ("train", "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg"),
        ("valid", "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"),
    ]
    for _, relative in listed[:-1]:
        write_image(tmp_path / relative, mode="RGB")  # CheXpert JPEGs are greyscale, but be robust to RGB
    write_image(tmp_path / listed[-1][1])
    for split in ("train", "valid"):
        write_csv(
            root / f"{split}.csv",
            ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding"],
            [[p, "Male", 60, "Frontal", "PA", 1.0] for s, p in listed if s == split],
        )
    # a listed file that is missing on disk is offered pre-rejected, not dropped
    with (root / "train.csv").open("a", encoding="utf-8") as handle:
        handle.write(
            "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Female,50,Frontal,AP,\n"
        )
    items = CheXpertSource(root).items()
    assert len(items) == 5
    assert {item.dataset for item in items} == {"chexpert_train", "chexpert_valid"}
    assert all(item.label == "XR" and item.kind == "image" for item in items)
    assert {item.patient_id for item in items} == {
        "chexpert:patient00001",
        "chexpert:patient00002",
        "chexpert:patient00003",
        "chexpert:patient64541",
    }
    assert {BODY_PARTS.normalise(item.body_part) for item in items} == {"chest"}
    study_uids = {item.study_uid for item in items if item.patient_id == "chexpert:patient00001"}
    assert study_uids == {"chexpert:patient00001/study1", "chexpert:patient00001/study2"}
    missing = [item for item in items if PRE_REJECTED in item.extra]
    assert [m.patient_id for m in missing] == ["chexpert:patient00003"]
    assert read_all_headers(items) == 4


def test_mura_body_parts_come_from_the_folders(tmp_path) -> None:
    root = tmp_path / "MURA-v1.1"
    files = [
        "train/XR_ELBOW/patient00011/study1_negative/image1.png",
        "train/XR_ELBOW/patient00011/study1_negative/image2.png",
        "train/XR_WRIST/patient00012/study2_positive/image1.png",
        "valid/XR_HUMERUS/patient11186/study1_positive/image1.png",
    ]
    for relative in files:
        write_image(root / relative)
    (root / "train/XR_ELBOW/patient00011/study1_negative/._image1.png").write_bytes(b"\x00\x05")
    items = MURASource(root).items()
    assert len(items) == 4
    assert [item.body_part for item in items] == ["ELBOW", "ELBOW", "WRIST", "HUMERUS"]
    assert {BODY_PARTS.normalise(item.body_part) for item in items} == {"upper_limb"}
    assert {item.dataset for item in items} == {"mura_train", "mura_valid"}
    assert items[0].patient_id == "mura:patient00011" and items[0].extra["finding"] == "negative"
    assert items[2].study_uid == "mura:patient00012/WRIST/study2"
    assert all(item.label == "XR" for item in items)
    assert read_all_headers(items) == 4


def test_nih_chestxray14_uses_the_entry_table_and_official_split(tmp_path) -> None:
    root = tmp_path / "nih"
    names = ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    for name in names:
        write_image(root / "images_001" / "images" / name)
    write_csv(
        root / "Data_Entry_2017.csv",
        ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "View Position"],
        [[names[0], "Cardiomegaly", 0, 1, 58, "PA"], [names[1], "No Finding", 1, 1, 58, "PA"],
         [names[2], "Hernia", 0, 2, 81, "AP"], ["00000003_000.png", "No Finding", 0, 3, 20, "PA"]],
    )  # fmt: skip
    (root / "train_val_list.txt").write_text("\n".join([*names[:2], "00000003_000.png"]) + "\n")
    (root / "test_list.txt").write_text(names[2] + "\n")
    items = NIHChestXray14Source(root).items()
    by_name = {Path(item.path).name: item for item in items}
    assert by_name[names[0]].dataset == "nih_chestxray14_train_val"
    assert by_name[names[2]].dataset == "nih_chestxray14_test"
    assert by_name[names[1]].patient_id == "nih_cxr14:00001" == by_name[names[0]].patient_id
    assert by_name[names[1]].study_uid == "nih_cxr14:00001/1"
    assert PRE_REJECTED in by_name["00000003_000.png"].extra
    assert {BODY_PARTS.normalise(item.body_part) for item in items} == {"chest"}
    assert read_all_headers(items) == 3


def test_rsna_boneage_hands_are_upper_limb(tmp_path) -> None:
    root = tmp_path / "rsna"
    for case in (1377, 1378):
        write_image(root / "boneage-training-dataset" / f"{case}.png", size=(16, 20))
    write_csv(
        root / "boneage-training-dataset.csv",
        ["id", "boneage", "male"],
        [[1377, 180, "False"], [1378, 12, "True"]],
    )
    items = RSNABoneAgeSource(root).items()
    assert [item.patient_id for item in items] == ["rsna_boneage:training:1377", "rsna_boneage:training:1378"]
    assert {item.dataset for item in items} == {"rsna_boneage_training"}
    assert {BODY_PARTS.normalise(item.body_part) for item in items} == {"upper_limb"}
    assert items[0].extra["boneage_months"] == "180"
    assert read_all_headers(items) == 2


def test_mrnet_volumes_give_one_sample_per_slice_along_axis_0(tmp_path) -> None:
    root = tmp_path / "MRNet-v1.0"
    for split, exam in (("train", "0000"), ("valid", "1130")):
        for n_slices, plane in zip((5, 4, 3), ("axial", "coronal", "sagittal"), strict=True):
            path = root / split / plane / f"{exam}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(
                path,
                np.zeros((n_slices, 16, 16), dtype=np.uint8)
                + np.arange(n_slices, dtype=np.uint8)[:, None, None],
            )
    items = MRNetSource(root).items()
    assert len(items) == 6
    assert all(item.kind == "npy" and item.label == "MR" and item.slice_axis == 0 for item in items)
    assert {item.patient_id for item in items} == {"mrnet:0000", "mrnet:1130"}
    assert {item.dataset for item in items} == {"mrnet_train", "mrnet_valid"}
    assert len({item.series_uid for item in items}) == 6
    assert {BODY_PARTS.normalise(item.body_part) for item in items} == {"lower_limb"}
    assert read_all_headers(items) == 2 * (5 + 4 + 3)


def test_brats_lists_four_sequences_and_rejects_the_segmentation(tmp_path) -> None:
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    volume = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    for case in ("BraTS20_Training_001", "BraTS20_Training_002"):
        (root / case).mkdir(parents=True)
        suffix = ".nii.gz" if case.endswith("2") else ".nii"  # both compressions occur in the wild
        for sequence in ("t1", "t1ce", "t2", "flair", "seg"):
            nib.save(nib.Nifti1Image(volume, np.eye(4)), root / case / f"{case}_{sequence}{suffix}")
    items = BraTS2020Source(root).items()
    images = [item for item in items if PRE_REJECTED not in item.extra]
    rejected = [item for item in items if PRE_REJECTED in item.extra]
    assert len(images) == 8 and len(rejected) == 2
    assert all(Path(item.path).name.split("_")[-1].startswith("seg") for item in rejected)
    assert {item.extra["sequence"] for item in images} == {"t1", "t1ce", "t2", "flair"}
    assert all(item.slice_axis == 2 and item.kind == "nifti" and item.label == "MR" for item in images)
    assert {item.patient_id for item in items} == {
        "brats20:BraTS20_Training_001",
        "brats20:BraTS20_Training_002",
    }
    assert {BODY_PARTS.normalise(item.body_part) for item in items} == {"head_neck"}
    assert read_all_headers(images) == 8 * 4  # 4 axial slices per (6, 5, 4) volume


def test_oai_lists_dicom_without_extensions_and_lets_headers_label(tmp_path) -> None:
    root = tmp_path / "oai"
    write_mr_dicom(root / "00m" / "0.C.2" / "9000099" / "20040101" / "10249006" / "001", "9000099")
    write_mr_dicom(root / "00m" / "0.C.2" / "9000099" / "20040101" / "10249006" / "002", "9000099")
    write_mr_dicom(root / "00m" / "0.E.1" / "9000099" / "20040101" / "10300001" / "001", "9000099", "CR")
    (root / "00m" / "contents.csv").write_text("folder,description\n")
    items = OAISource(root).items()
    assert len(items) == 3
    assert all(item.kind == "dicom" and item.label is None and item.dataset == "oai" for item in items)
    readers = pytest.importorskip("modality.readers")
    headers = [h for item in items for h in readers.read_headers(item)]
    assert sorted(h.modality for h in headers) == ["CR", "MR", "MR"]
    assert {h.patient_id for h in headers} == {"9000099"}
    assert {BODY_PARTS.normalise(h.body_part_raw) for h in headers} == {"lower_limb"}


def test_missing_roots_are_clear_errors(tmp_path) -> None:
    for source in (
        CheXpertSource,
        MURASource,
        NIHChestXray14Source,
        RSNABoneAgeSource,
        MRNetSource,
        BraTS2020Source,
        OAISource,
    ):
        with pytest.raises(FileNotFoundError, match=r"not found|no "):
            source(tmp_path / "absent").items()


@pytest.mark.parametrize(
    ("pool", "target"),
    [
        ("chexpert", "CheXpertSource"),
        ("mura", "MURASource"),
        ("nih_chestxray14", "NIHChestXray14Source"),
        ("rsna_boneage", "RSNABoneAgeSource"),
        ("mrnet", "MRNetSource"),
        ("brats2020", "BraTS2020Source"),
        ("oai", "OAISource"),
        ("idc_plan", "IDCDownloadSource"),
        ("shared_xray", "ManifestSource"),
    ],
)
def test_dataset_configs_compose_and_instantiate(pool: str, target: str, tmp_path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import modality.prepare  # noqa: F401  (registers the shared_data_root resolver)
    from modality.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=[f"dataset={pool}", f"paths.data_dir={tmp_path}"])
    assert cfg.dataset.name == pool
    source = instantiate(cfg.dataset.sources[0])
    assert type(source).__name__ == target
    assert set(cfg.dataset.split.values()) <= {"train", "val", "test"}


def test_shared_radiographs_read_cleanly() -> None:
    root = shared_data_root()
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"shared corpus not found at {root}")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import modality.prepare  # noqa: F401  (registers the shared_data_root resolver)
    from modality.paths import CONFIG_DIR
    from modality.readers import read_slices

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=["dataset=shared_xray"])
    items = [item for source in cfg.dataset.sources for item in instantiate(source).items()]
    manifest = pd.read_csv(root / "manifest.csv")
    radiographs = manifest[manifest["kind"] == "xray"]
    assert len(items) == len(radiographs) == 73
    assert set(cfg.dataset.split) == {item.dataset for item in items}
    expected_class = dict(zip(radiographs["path"], radiographs["class"], strict=True))
    for item in items:
        assert item.label == expected_class[str(Path(item.path).relative_to(root))] == "XR"
        slices = read_slices(item)  # raises RejectedInput on any problem: none is expected
        assert len(slices) == 1 and slices[0].pixels.ndim == 2 and slices[0].pixels.size > 0


def test_shared_radiographs_prepare_with_no_rejects(tmp_path) -> None:
    if not (shared_data_root() / "manifest.csv").is_file():
        pytest.skip("shared corpus not found")
    import json

    from modality.prepare import build_in_subprocess, is_prepared

    out = tmp_path / "prepared"
    build_in_subprocess("shared_xray", out, overrides=["progress=false", "charts=false"])
    assert is_prepared(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["files"] == summary["inputs"]["written_files"] == 73
    assert summary["inputs"]["rejected_files"] == 0
    assert {split: info["by_class"] for split, info in summary["splits"].items()} == {
        "train": {"XR": 55},
        "val": {"XR": 13},
        "test": {"XR": 5},
    }
