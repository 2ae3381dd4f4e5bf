"""Small on-disk pools for the prepare tests: hand-written DICOM files and a throw-away dataset config.

Kept tiny (16x16 to 96x96 pixels) so a whole prepare run takes a second or two on two cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_dicom(
    path: Path,
    *,
    modality: str = "CT",
    patient_id: str = "P1",
    series_uid: str | None = None,
    seed: int = 0,
    frames: int = 1,
    size: int = 48,
    body_part: str = "CHEST",
) -> Path:
    """A minimal valid DICOM image (signed 16-bit, intercept -1024 for CT) with random-texture pixels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 2000, (frames, size, size), dtype=np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path), str(seed)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=[patient_id, str(path.parent)])
    ds.BodyPartExamined = body_part
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = (pixels if frames > 1 else pixels[0]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_pool(root: Path, files_per_dataset: int = 4, frames: int = 3, size: int = 48) -> dict[str, str]:
    """Three sites (two train, one val) of CT and MR files; returns the split map."""
    split = {"site_a": "train", "site_b": "train", "site_c": "val"}
    seed = 0
    for dataset in split:
        for i in range(files_per_dataset):
            modality = "CT" if i % 2 == 0 else "MR"
            patient = f"{dataset}-P{i // 2}"
            seed += 1
            write_dicom(
                root / dataset / patient / f"im{i}.dcm",
                modality=modality,
                patient_id=patient,
                seed=seed,
                frames=frames,
                size=size,
            )
    return split


def write_pool_config(conf_dir: Path, name: str, data_root: Path, split: dict[str, str]) -> Path:
    """``conf_dir/dataset/<name>.yaml``: one DicomFolderSource per site folder, for ``hydra.searchpath``."""
    lines = [f"name: {name}", "sources:"]
    for dataset in split:
        lines += [
            "  - _target_: modality.sources.folders.DicomFolderSource",
            f"    root: '{data_root / dataset}'",
            f"    dataset: {dataset}",
        ]
    lines.append("split:")
    lines += [f"  {dataset}: {s}" for dataset, s in split.items()]
    path = conf_dir / "dataset" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
