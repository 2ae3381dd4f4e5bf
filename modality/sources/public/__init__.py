"""The reference study's other public datasets, each read in the layout its publisher distributes.

One module per dataset (CheXpert, MURA, NIH ChestX-ray14, RSNA Bone Age, MRNet, BraTS 2020, OAI). Every source
returns :class:`~modality.records.InputItem` objects with the class the dataset vouches for, the body part it
states, and a patient id prefixed with the dataset family (``chexpert:patient00001``): several datasets number
their patients the same way (``patientNNNNN``), and prepare's patient guard compares ids across datasets.

Files a metadata table lists but that are missing on disk, and files that are not images (segmentation
masks), are still returned, marked with ``extra["rejected"]`` so prepare records them in ``rejects.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from modality.records import PRE_REJECTED

#: Radiograph code stated for PNG/JPEG collections, which do not record whether a plate (CR) or a flat-panel
#: detector (DX) acquired them; both map to XR in the class map.
RADIOGRAPH_CODE = "DX"


def require_directory(path: str | Path, what: str) -> Path:
    """The dataset root, or a clear error naming what was expected there."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} not found: {root} is not a directory")
    return root


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a metadata CSV, after checking its header names the columns the source relies on."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; found {reader.fieldnames}")
        return list(reader)


def missing_file(path: Path, listed_in: Path) -> dict[str, dict[str, str]]:
    """``extra`` for a listed file absent on disk: prepare records it instead of crashing on it."""
    return {PRE_REJECTED: {"reason": "listed file missing", "detail": f"{path} listed in {listed_in.name}"}}


__all__ = ["PRE_REJECTED", "RADIOGRAPH_CODE", "missing_file", "read_csv_rows", "require_directory"]
